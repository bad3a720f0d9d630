"""Decode-step attention ops of the fast engine: rotary + KV write, and split-KV attention.

One new token per row, rows of different lengths in one static cache (`kv_cache.StaticKVCache`):

- `rope_store`: rotary embedding on the new token's query and key, key and value written into the
  row's cache slot, in one launch (the unfused torch version is ~15 small kernels per layer, which
  at batch 1 costs more GPU time than the layer's attention).
- `decode_attention`: flash-decoding. Each (row, kv head, chunk of the row's keys) is one program
  that attends all query heads of that kv head's group at once (grouped-query attention without
  repeating K/V), keeps a running max / sum in fp32 and writes a partial output and its
  log-sum-exp; a second kernel merges the chunks. Work follows each row's true length, not the
  cache capacity, and long rows spread over many SMs even at batch 1 (SDPA's masked kernels run
  one program per (row, head): two programs for a batch-1 step of a 2-kv-head model).

Both are Triton kernels on CUDA tensors; on CPU tensors they run in Triton's interpreter (slow,
for tests). `*_ref` are the plain-torch definitions they are tested against.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

__all__ = ["KERNELS_INTERPRETED", "decode_attention", "decode_attention_ref", "default_num_splits",
           "fused_ops_supported", "rope_store", "rope_store_ref"]

BLOCK_N = 64  # keys per inner iteration of the attention kernel
MIN_KEYS_PER_SPLIT = 128


@triton.jit
def _rope_store_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr,
    stride_qb, stride_kb, stride_vb, stride_cb, stride_sb, stride_ob,
    stride_kcb, stride_kch, stride_kcs, stride_vcb, stride_vch, stride_vcs,
    NUM_HEADS: tl.constexpr, HALF: tl.constexpr,
):
    # grid (rows, query heads + kv heads): a query head is rotated into q_out; a kv head is rotated
    # (key) or copied (value) into the row's cache slot at its position.
    b = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    i = tl.arange(0, HALF)
    c1 = tl.load(cos_ptr + b * stride_cb + i).to(tl.float32)
    c2 = tl.load(cos_ptr + b * stride_cb + HALF + i).to(tl.float32)
    s1 = tl.load(sin_ptr + b * stride_sb + i).to(tl.float32)
    s2 = tl.load(sin_ptr + b * stride_sb + HALF + i).to(tl.float32)
    if head < NUM_HEADS:
        src = q_ptr + b * stride_qb + head * (2 * HALF)
        x1 = tl.load(src + i).to(tl.float32)
        x2 = tl.load(src + HALF + i).to(tl.float32)
        dst = q_out_ptr + b * stride_ob + head * (2 * HALF)
        tl.store(dst + i, (x1 * c1 - x2 * s1).to(q_out_ptr.dtype.element_ty))
        tl.store(dst + HALF + i, (x2 * c2 + x1 * s2).to(q_out_ptr.dtype.element_ty))
    else:
        kv = head - NUM_HEADS
        pos = tl.load(pos_ptr + b).to(tl.int64)
        src = k_ptr + b * stride_kb + kv * (2 * HALF)
        x1 = tl.load(src + i).to(tl.float32)
        x2 = tl.load(src + HALF + i).to(tl.float32)
        dst = k_cache_ptr + b * stride_kcb + kv * stride_kch + pos * stride_kcs
        tl.store(dst + i, (x1 * c1 - x2 * s1).to(k_cache_ptr.dtype.element_ty))
        tl.store(dst + HALF + i, (x2 * c2 + x1 * s2).to(k_cache_ptr.dtype.element_ty))
        vsrc = v_ptr + b * stride_vb + kv * (2 * HALF)
        vdst = v_cache_ptr + b * stride_vcb + kv * stride_vch + pos * stride_vcs
        tl.store(vdst + i, tl.load(vsrc + i).to(v_cache_ptr.dtype.element_ty))
        tl.store(vdst + HALF + i, tl.load(vsrc + HALF + i).to(v_cache_ptr.dtype.element_ty))


@triton.jit
def _attn_split_kernel(
    q_ptr, k_ptr, v_ptr, len_ptr, o_ptr, lse_ptr,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    scale, chunk,
    KV_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    # grid (rows * kv heads, splits): the GROUP query heads of one kv head over one key chunk.
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid // KV_HEADS).to(tl.int64)
    kh = pid % KV_HEADS
    length = tl.load(len_ptr + b).to(tl.int32)
    start = split * chunk
    end = tl.minimum(start + chunk, length)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, HEAD_DIM)
    heads = kh * GROUP + g
    gmask = g < GROUP
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=gmask[:, None], other=0.0)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    k_base = k_ptr + b * stride_kb + kh * stride_kh
    v_base = v_ptr + b * stride_vb + kh * stride_vh
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < end
        k = tl.load(k_base + n[:, None] * stride_ks + d[None, :], mask=nmask[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)  # 0 on the first block (m_i = -inf, m_new finite)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + n[:, None] * stride_vs + d[None, :], mask=nmask[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    # An empty chunk (past the row's length) reports lse = -inf and weighs nothing in the merge.
    has_keys = l_i > 0
    safe_l = tl.where(has_keys, l_i, 1.0)
    out = acc / safe_l[:, None]
    lse = tl.where(has_keys, m_i + tl.log(safe_l), float("-inf"))
    tl.store(o_ptr + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + d[None, :], out,
             mask=gmask[:, None])
    tl.store(lse_ptr + b * stride_lb + heads * stride_lh + split, lse, mask=gmask)


@triton.jit
def _attn_merge_kernel(
    o_ptr, lse_ptr, out_ptr,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_yb, stride_yh,
    num_splits,
    NUM_HEADS: tl.constexpr, SPLITS_P2: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // NUM_HEADS).to(tl.int64)
    h = pid % NUM_HEADS
    s = tl.arange(0, SPLITS_P2)
    smask = s < num_splits
    lse = tl.load(lse_ptr + b * stride_lb + h * stride_lh + s, mask=smask, other=float("-inf"))
    top = tl.max(lse, axis=0)  # finite: chunk 0 always holds the row's first key
    w = tl.exp(lse - top)
    d = tl.arange(0, HEAD_DIM)
    parts = tl.load(o_ptr + b * stride_ob + h * stride_oh + s[:, None] * stride_os + d[None, :],
                    mask=smask[:, None], other=0.0)
    out = tl.sum(parts * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + b * stride_yb + h * stride_yh + d, out.to(out_ptr.dtype.element_ty))


# Decided when the kernels were decorated (import time): TRITON_INTERPRET=1 makes them run on CPU
# tensors in Triton's interpreter (tests); otherwise they need CUDA tensors.
KERNELS_INTERPRETED = not isinstance(_attn_split_kernel, triton.runtime.JITFunction)


def _check_device(t: torch.Tensor) -> None:
    if t.device.type != "cuda" and not KERNELS_INTERPRETED:
        raise ValueError(f"decode kernels need CUDA tensors (got {t.device}); use the *_ref twins on CPU, "
                         "or set TRITON_INTERPRET=1 before importing mpo.infer.decode_ops")


def fused_ops_supported(head_dim: int, num_heads: int, num_kv_heads: int, dtype: torch.dtype) -> bool:
    """Whether `rope_store` / `decode_attention` handle this attention shape and dtype on CUDA."""
    pow2 = head_dim >= 32 and head_dim & (head_dim - 1) == 0
    return (pow2 and num_heads % num_kv_heads == 0 and dtype in (torch.bfloat16, torch.float16)
            and not KERNELS_INTERPRETED)


def _check_last_dim_contiguous(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride in its last dimension, got strides {t.stride()}")


def rope_store(q_BX: torch.Tensor, k_BX: torch.Tensor, v_BX: torch.Tensor, cos_BD: torch.Tensor, sin_BD: torch.Tensor,
               positions_B: torch.Tensor, cache_k_BKSD: torch.Tensor, cache_v_BKSD: torch.Tensor) -> torch.Tensor:
    """Rotate the new token's query and key; write key and value at each row's position.

    Args:
        q_BX: [B, H * D] queries of the new token (row slices of a fused projection are fine).
        k_BX, v_BX: [B, KV * D].
        cos_BD, sin_BD: [B, D] rotary tables at each row's position (Hugging Face layout: the two
            halves of D repeat the same frequencies).
        positions_B: int64 [B], slot each row's key/value goes to.
        cache_k_BKSD, cache_v_BKSD: one layer's cache [B, KV, S, D], written in place.

    Returns:
        Rotated queries [B, H, D] in q's dtype.
    """
    rows, kv_heads, _, head_dim = cache_k_BKSD.shape
    num_heads = q_BX.shape[-1] // head_dim
    _check_last_dim_contiguous(q=q_BX, k=k_BX, v=v_BX, cos=cos_BD, sin=sin_BD, cache_k=cache_k_BKSD,
                               cache_v=cache_v_BKSD)
    q_out = torch.empty((rows, num_heads, head_dim), dtype=q_BX.dtype, device=q_BX.device)
    _check_device(q_BX)
    _rope_store_kernel[(rows, num_heads + kv_heads)](
        q_BX, k_BX, v_BX, cos_BD, sin_BD, positions_B, q_out, cache_k_BKSD, cache_v_BKSD,
        q_BX.stride(0), k_BX.stride(0), v_BX.stride(0), cos_BD.stride(0), sin_BD.stride(0), q_out.stride(0),
        cache_k_BKSD.stride(0), cache_k_BKSD.stride(1), cache_k_BKSD.stride(2),
        cache_v_BKSD.stride(0), cache_v_BKSD.stride(1), cache_v_BKSD.stride(2),
        NUM_HEADS=num_heads, HALF=head_dim // 2, num_warps=1,
    )
    return q_out


def rope_store_ref(q_BX, k_BX, v_BX, cos_BD, sin_BD, positions_B, cache_k_BKSD, cache_v_BKSD) -> torch.Tensor:
    """Plain-torch `rope_store`: same fp32 math, one rounding to the output dtype."""
    rows, kv_heads, _, head_dim = cache_k_BKSD.shape
    half = head_dim // 2

    def rotate(x_BND: torch.Tensor) -> torch.Tensor:
        x = x_BND.float()
        c, s = cos_BD.float()[:, None], sin_BD.float()[:, None]
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * c[..., :half] - x2 * s[..., :half], x2 * c[..., half:] + x1 * s[..., half:]], dim=-1)

    q = rotate(q_BX.reshape(rows, -1, head_dim)).to(q_BX.dtype)
    k = rotate(k_BX.reshape(rows, kv_heads, head_dim)).to(cache_k_BKSD.dtype)
    index = positions_B.view(rows, 1, 1, 1).expand(rows, kv_heads, 1, head_dim)
    cache_k_BKSD.scatter_(2, index, k.unsqueeze(2))
    cache_v_BKSD.scatter_(2, index, v_BX.reshape(rows, kv_heads, 1, head_dim).to(cache_v_BKSD.dtype))
    return q


def default_num_splits(rows: int, kv_heads: int, capacity: int, num_sms: int) -> int:
    """Key chunks per (row, kv head): enough programs to cover ~2 waves of SMs, each chunk at
    least MIN_KEYS_PER_SPLIT keys of the capacity (a chunk past a row's length exits at once)."""
    wanted = max(1, math.ceil(2 * num_sms / (rows * kv_heads)))
    return max(1, min(wanted, math.ceil(capacity / MIN_KEYS_PER_SPLIT), 256))


def decode_attention(q_BHD: torch.Tensor, cache_k_BKSD: torch.Tensor, cache_v_BKSD: torch.Tensor,
                     lengths_B: torch.Tensor, scale: float, num_splits: int = 1) -> torch.Tensor:
    """Attention of one query token per row over the first lengths_B[r] slots of its cache.

    Args:
        q_BHD: [B, H, D] rotated queries; head h reads kv head h // (H / KV).
        cache_k_BKSD, cache_v_BKSD: [B, KV, S, D] one layer's cache.
        lengths_B: int [B], keys per row (>= 1; the new token's own key included).
        scale: softmax scale (1/sqrt(D) for Qwen2).
        num_splits: key chunks per (row, kv head) (`default_num_splits`); fixed for a graph.

    Returns:
        [B, H, D] in q's dtype.
    """
    rows, num_heads, head_dim = q_BHD.shape
    kv_heads, capacity = cache_k_BKSD.shape[1], cache_k_BKSD.shape[2]
    if num_heads % kv_heads:
        raise ValueError(f"{num_heads} query heads do not group over {kv_heads} kv heads")
    _check_last_dim_contiguous(q=q_BHD, cache_k=cache_k_BKSD, cache_v=cache_v_BKSD)
    group = num_heads // kv_heads
    num_splits = max(1, min(int(num_splits), math.ceil(capacity / BLOCK_N)))
    chunk = math.ceil(math.ceil(capacity / num_splits) / BLOCK_N) * BLOCK_N
    device = q_BHD.device
    o_part = torch.empty((rows, num_heads, num_splits, head_dim), dtype=torch.float32, device=device)
    lse_part = torch.empty((rows, num_heads, num_splits), dtype=torch.float32, device=device)
    _check_device(q_BHD)
    _attn_split_kernel[(rows * kv_heads, num_splits)](
        q_BHD, cache_k_BKSD, cache_v_BKSD, lengths_B, o_part, lse_part,
        q_BHD.stride(0), q_BHD.stride(1),
        cache_k_BKSD.stride(0), cache_k_BKSD.stride(1), cache_k_BKSD.stride(2),
        cache_v_BKSD.stride(0), cache_v_BKSD.stride(1), cache_v_BKSD.stride(2),
        o_part.stride(0), o_part.stride(1), o_part.stride(2),
        lse_part.stride(0), lse_part.stride(1),
        float(scale), chunk,
        KV_HEADS=kv_heads, GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_N=BLOCK_N, HEAD_DIM=head_dim, num_warps=4,
    )
    out = torch.empty_like(q_BHD)
    _attn_merge_kernel[(rows * num_heads,)](
        o_part, lse_part, out,
        o_part.stride(0), o_part.stride(1), o_part.stride(2), lse_part.stride(0), lse_part.stride(1),
        out.stride(0), out.stride(1), num_splits,
        NUM_HEADS=num_heads, SPLITS_P2=max(2, triton.next_power_of_2(num_splits)), HEAD_DIM=head_dim, num_warps=1,
    )
    return out


def decode_attention_ref(q_BHD: torch.Tensor, cache_k_BKSD: torch.Tensor, cache_v_BKSD: torch.Tensor,
                         lengths_B: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain-torch `decode_attention` (SDPA with a length mask, query heads grouped per kv head)."""
    rows, num_heads, head_dim = q_BHD.shape
    kv_heads, capacity = cache_k_BKSD.shape[1], cache_k_BKSD.shape[2]
    q = q_BHD.reshape(rows, kv_heads, num_heads // kv_heads, head_dim)
    slots = torch.arange(capacity, device=q_BHD.device)
    mask = (slots[None, :] < lengths_B[:, None]).view(rows, 1, 1, capacity)
    out = F.scaled_dot_product_attention(q, cache_k_BKSD, cache_v_BKSD, attn_mask=mask, scale=scale)
    return out.reshape(rows, num_heads, head_dim)
