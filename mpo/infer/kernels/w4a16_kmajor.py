"""W4A16 decode kernel over a K-major repack of an AutoAWQ linear: ``y = x @ W_IO + bias``.

The AutoAWQ GEMM layout (``mpo.infer.kernels.w4a16``) packs eight *output columns* per int32, so a
kernel must unpack nibble by nibble and shuffle them into column order. For decode (M small,
weight-bandwidth bound) the engine repacks each linear once at load time into:

- ``qweight`` int32 [N, K/8]: row n holds W[:, n]. K is cut into blocks of 128 rows; in a block,
  word c (0..15) holds K rows 8c .. 8c + 7, with K row ``8c + 4a + 2b + h`` in nibble ``4h + 2b + a``.
  So one shift of a word brings nibbles (i, i + 4), i = a + 2b, to the same bit offset of its two
  16-bit halves, and those two halves are adjacent K rows, which is how a tensor-core operand
  register pairs its two 16-bit values.
- ``scales`` [N, K/g] (the checkpoint's dtype) and ``zeros`` uint8 [N, K/g]: per output row, so a
  program reads them contiguously with its weights.

Math. Per pair of weights: one shift, one ``lop3`` that masks both nibbles into the top mantissa
bits of a packed pair of 1.0s (giving ``1 + q/16``, no int->float conversion), and one packed
subtract of ``1 + z/16``, leaving ``(q - z)/16`` exactly in bf16/fp16. ``tl.dot`` multiplies that by
x in fp32 (exact products, fp32 accumulation); each group's partial is scaled by ``16 * scale``.
Nothing dequantized is rounded, so the result matches the fp32 twin to fp32 accumulation error.
Rows of x past M are masked, so M = 1 runs as one 16-row tensor-core tile.

K is split over programs and the fp32 partials are reduced by the last program of each tile (an
atomic counter, as ``w4a16_gemv_splitk`` does), so an op is one launch. ``pdl`` launches it with
programmatic dependent launch (measured slower in a decode chain: bench/chain_decode_linears.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from mpo.infer.kernels.splitk import W4A16Config, _num_sms, _split_for, _split_plan, _splitk_finish, _store_output
from mpo.infer.kernels.w4a16 import KERNELS_INTERPRETED
from mpo.quant.pack import unpack_awq_gemm

__all__ = [
    "KBLOCK",
    "KMajorW4",
    "kmajor_config",
    "repack_kmajor",
    "unpack_kmajor",
    "w4a16_kmajor_gemm",
    "w4a16_kmajor_ref",
]

KBLOCK = 128  # K elements per repack block: 16 words x 8 nibbles
WORDS = 16  # int32 words per block and row


@dataclass
class KMajorW4:
    """One linear repacked for the decode kernel (see the module docstring for the layout).

    Attributes:
        qweight: int32 [N, K/8]; scales: [N, K/g] (fp16 or bf16); zeros: uint8 [N, K/g] in [0, 15].
        group_size: g, K rows per scale/zero group (power of two >= 16).
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1] * 8

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]


def repack_kmajor(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                  group_size: int) -> KMajorW4:
    """AutoAWQ GEMM tensors (``qweight`` [K, N/8], ``qzeros`` [K/g, N/8], ``scales`` [K/g, N]) ->
    ``KMajorW4`` on the same device. K must be a multiple of 128 (the repack block)."""
    if not isinstance(group_size, int) or group_size < 32 or group_size & (group_size - 1):
        raise ValueError(f"group_size must be a power of two >= 32 for the K-major repack, got {group_size!r}")
    q_IO, zeros_GO = unpack_awq_gemm(qweight, qzeros)
    k, n = q_IO.shape
    if k % KBLOCK or k % group_size:
        raise ValueError(f"K={k} must be a multiple of {KBLOCK} (repack block) and of group_size={group_size}")
    if tuple(scales.shape) != (k // group_size, n) or not scales.is_floating_point():
        raise ValueError(f"scales must be a float tensor [K/g, N] = {(k // group_size, n)}, got {tuple(scales.shape)}")
    # K row 8c + 4a + 2b + h of a block -> word c, nibble 4h + 2b + a (the order the kernel's joins
    # rebuild): [N, blocks, c, a, b, h] -> [N, blocks, c, h, b, a].
    q = q_IO.t().reshape(n, k // KBLOCK, WORDS, 2, 2, 2).permute(0, 1, 2, 5, 4, 3).to(torch.int64)
    shifts = torch.arange(8, device=q.device, dtype=torch.int64) * 4
    words = (q.reshape(n, k // KBLOCK, WORDS, 8) << shifts).sum(-1)  # < 2**32
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return KMajorW4(qweight=words.reshape(n, k // 8).contiguous(), scales=scales.t().contiguous(),
                    zeros=zeros_GO.t().to(torch.uint8).contiguous(), group_size=group_size)


def unpack_kmajor(w: KMajorW4) -> torch.Tensor:
    """int32 [K, N] of the 4-bit values (inverse of the repack; for tests and the twin)."""
    n, words = w.qweight.shape
    u = w.qweight.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(8, device=u.device, dtype=torch.int64) * 4
    nib = (u.reshape(n, words // WORDS, WORDS, 1) >> shifts) & 0xF  # [N, blocks, c, nibble 4h + 2b + a]
    nib = nib.reshape(n, words // WORDS, WORDS, 2, 2, 2).permute(0, 1, 2, 5, 4, 3)  # [N, blocks, c, a, b, h]
    return nib.reshape(n, words * 8).t().to(torch.int32)


def w4a16_kmajor_ref(x: torch.Tensor, w: KMajorW4, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-torch twin: dequantize to fp32 [K, N], fp32 matmul, round once to x's dtype."""
    q = unpack_kmajor(w).float()
    groups = torch.arange(q.shape[0], device=q.device) // w.group_size
    w_IO = (q - w.zeros.t().float()[groups]) * w.scales.t().float()[groups]
    y = x.float() @ w_IO.to(x.device)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


@triton.jit
def _pair_minus_zero(p, zz, I: tl.constexpr, X_BF16: tl.constexpr, INTERPRET: tl.constexpr):
    """Words [R, W] and packed zero pairs [R, 1] -> (lo, hi) = ``(q - z) / 16`` of nibbles I, I + 4.

    Three instructions per two weights: a shift moves both nibbles of the pair to the top mantissa
    bits of a packed pair of 16-bit floats (bits 3..6 of a bf16, 6..9 of an fp16), one lop3
    (0xEA = a & b | c) masks them and ORs in 1.0, giving ``1 + q/16``; a packed subtract of
    ``1 + z/16`` leaves ``(q - z)/16``, exact. The PTX strings are spelled out (no str() in jit code).
    """
    if INTERPRET:  # no inline PTX on the host: the same values through integer math
        z = (zz & 0xF).to(tl.float32)
        lo = (((p >> (4 * I)) & 0xF).to(tl.float32) - z) * 0.0625
        hi = (((p >> (4 * I + 16)) & 0xF).to(tl.float32) - z) * 0.0625
        return lo, hi
    if X_BF16:
        if I == 0:
            shift: tl.constexpr = "shl.b32 t, $2, 3;"
        elif I == 1:
            shift: tl.constexpr = "shr.b32 t, $2, 1;"
        elif I == 2:
            shift: tl.constexpr = "shr.b32 t, $2, 5;"
        else:
            shift: tl.constexpr = "shr.b32 t, $2, 9;"
        return tl.inline_asm_elementwise(
            "{ .reg .b32 t; " + shift + " lop3.b32 t, t, 0x00780078, 0x3F803F80, 0xEA; "
            "sub.rn.bf16x2 t, t, $3; mov.b32 {$0, $1}, t; }",
            "=h,=h,r,r", [p, zz], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=1)
    else:
        if I == 0:
            shift: tl.constexpr = "shl.b32 t, $2, 6;"
        elif I == 1:
            shift: tl.constexpr = "shl.b32 t, $2, 2;"
        elif I == 2:
            shift: tl.constexpr = "shr.b32 t, $2, 2;"
        else:
            shift: tl.constexpr = "shr.b32 t, $2, 6;"
        return tl.inline_asm_elementwise(
            "{ .reg .b32 t; " + shift + " lop3.b32 t, t, 0x03C003C0, 0x3C003C00, 0xEA; "
            "sub.rn.f16x2 t, t, $3; mov.b32 {$0, $1}, t; }",
            "=h,=h,r,r", [p, zz], dtype=(tl.float16, tl.float16), is_pure=True, pack=1)


@triton.jit
def _zero_pairs(z, X_BF16: tl.constexpr, INTERPRET: tl.constexpr):
    """uint8 zero points [R] -> uint32 [R, 1]: ``1 + z/16`` in both 16-bit halves (z itself when interpreted)."""
    zi = z.to(tl.uint32)
    if INTERPRET:
        return zi[:, None]
    if X_BF16:
        half = (zi << 3) | 0x3F80
    else:
        half = (zi << 6) | 0x3C00
    return (half | (half << 16))[:, None]


@triton.jit
def _kmajor_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, y_ptr, part_ptr, lock_ptr,
    M, N, num_units, units_per_split, split_k,
    stride_xm, stride_xk, stride_qn, stride_sn, stride_zn, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, USE_SPLIT: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRET: tl.constexpr, PDL: tl.constexpr,
):
    # A unit is max(GROUP, 128) K rows (whole groups, whole repack blocks); a step is one tl.dot
    # over min(GROUP, 128) K rows = W words per output row, all in one group.
    UNIT: tl.constexpr = GROUP if GROUP > 128 else 128
    STEP: tl.constexpr = GROUP if GROUP < 128 else 128
    W: tl.constexpr = STEP // 8
    STEPS: tl.constexpr = UNIT // STEP
    X_BF16: tl.constexpr = x_ptr.dtype.element_ty == tl.bfloat16
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rw = tl.arange(0, W)
    rk = tl.arange(0, STEP)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_n = rn < N
    mask_m = rm < M
    u_start = pid_s * units_per_split
    u_end = tl.minimum(u_start + units_per_split, num_units)
    if PDL > 0:
        # Programmatic dependent launch: let the next kernel start launching; with PDL == 2 also
        # pull this program's weights (which no earlier kernel writes) into L2 first; then wait for
        # the previous kernel before reading x or writing anything.
        gdc_launch_dependents()
        if PDL == 2:
            for u in range(u_start, u_end):
                wp = qw_ptr + rn[:, None] * stride_qn + (u * (UNIT // 8) + tl.arange(0, UNIT // 8))[None, :]
                tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [wp], dtype=tl.int32,
                                          is_pure=False, pack=1)
        gdc_wait()
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for u in range(u_start, u_end):
        for t in tl.static_range(STEPS):
            k0 = u * UNIT + t * STEP
            g = k0 // GROUP
            if t == 0 or GROUP < 128:  # a group starts
                z = tl.load(z_ptr + rn * stride_zn + g, mask=mask_n, other=0)
                zz = _zero_pairs(z, X_BF16, INTERPRET)
                acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            p = tl.load(qw_ptr + rn[:, None] * stride_qn + (k0 // 8 + rw)[None, :],
                        mask=mask_n[:, None], other=0).to(tl.uint32, bitcast=True)
            lo0, hi0 = _pair_minus_zero(p, zz, 0, X_BF16, INTERPRET)
            lo1, hi1 = _pair_minus_zero(p, zz, 1, X_BF16, INTERPRET)
            lo2, hi2 = _pair_minus_zero(p, zz, 2, X_BF16, INTERPRET)
            lo3, hi3 = _pair_minus_zero(p, zz, 3, X_BF16, INTERPRET)
            # Joins stack a new last axis: word c's 8 values land in K order 8c + 4(i % 2) + 2(i // 2) + h,
            # so the two halves of one register (lo_i, hi_i) are adjacent K rows, as an MMA operand pairs them.
            w = tl.join(tl.join(tl.join(lo0, lo1), tl.join(lo2, lo3)), tl.join(tl.join(hi0, hi1), tl.join(hi2, hi3)))
            w = tl.reshape(w, (BLOCK_N, STEP))
            x = tl.load(x_ptr + rm[:, None] * stride_xm + (k0 + rk)[None, :] * stride_xk,
                        mask=mask_m[:, None], other=0.0)
            if INTERPRET:  # the interpreter has no 16-bit float dot
                acc_g = tl.dot(x.to(tl.float32), tl.trans(w), acc_g, input_precision="ieee")
            else:
                acc_g = tl.dot(x, tl.trans(w), acc_g)
            if t == STEPS - 1 or GROUP < 128:  # the group ends: acc_g = sum (q - z) x / 16
                s = tl.load(s_ptr + rn * stride_sn + g, mask=mask_n, other=0.0).to(tl.float32)
                acc += acc_g * (16.0 * s)[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if USE_SPLIT:
        _splitk_finish(acc, bias_ptr, y_ptr, part_ptr, lock_ptr, rm, rn, mask_n, mask, M, N, pid_s, pid_m, pid_n,
                       split_k, stride_ym, stride_yn, HAS_BIAS, BLOCK_M, BLOCK_N)
    else:
        _store_output(acc, bias_ptr, y_ptr, rm, rn, mask_n, mask, stride_ym, stride_yn, HAS_BIAS)


def kmajor_config(m: int, n: int, k: int, group_size: int, device: torch.device) -> W4A16Config:
    """Default launch config (``block_k`` is unused: the kernel steps over whole groups).

    Up to M = 16 (decode): 16 rows (one tensor-core tile, rows past M masked) x 32 outputs per
    program, K split until ~4 programs per SM. Above: 32 x 64 tiles, K split only while the tiles
    leave SMs idle. Measured with bench/sweep_kmajor.py on an H100 over the 4B shapes: within ~10%
    of the best config per shape at M = 1, 8 and 64.
    """
    unit = max(group_size, KBLOCK)
    num_units = k // unit
    num_sms = 4 if device.type != "cuda" else _num_sms(device.index or 0)
    if m <= 16:
        tiles = triton.cdiv(n, 32)
        return W4A16Config(16, 32, 16, _split_for(num_units, tiles, 4 * num_sms), 4, 3)
    tiles = triton.cdiv(n, 64) * triton.cdiv(m, 32)
    split = _split_for(num_units, tiles, 3 * num_sms) if tiles < 2 * num_sms else 1
    return W4A16Config(32, 64, 16, split, 4, 3)


def _check(x, w: KMajorW4, bias, cfg: W4A16Config | None) -> None:
    if not isinstance(w, KMajorW4):
        raise ValueError(f"w must be a KMajorW4 (repack_kmajor), got {type(w).__name__}")
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError("x must be a bf16/fp16 tensor [..., K]")
    if x.shape[-1] != w.in_features:
        raise ValueError(f"x has {x.shape[-1]} features but the linear takes K={w.in_features}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (w.out_features,)):
        raise ValueError(f"bias must be a tensor [N] = [{w.out_features}] or None")
    tensors = [x, w.qweight, w.scales, w.zeros] + ([bias] if bias is not None else [])
    if any(t.device != x.device for t in tensors):
        raise ValueError("x, the repacked weights and bias must be on the same device")
    if x.device.type != "cuda" and not KERNELS_INTERPRETED:
        raise ValueError(f"Triton kernels need CUDA tensors (got {x.device}); for CPU set TRITON_INTERPRET=1 "
                         "before importing mpo.infer.kernels, or use w4a16_kmajor_ref")
    if cfg is not None:
        if cfg.block_n < 16 or cfg.block_n & (cfg.block_n - 1):
            raise ValueError(f"config.block_n={cfg.block_n} must be a power of two >= 16")
        if cfg.block_m < 16 or cfg.block_m & (cfg.block_m - 1):
            raise ValueError(f"config.block_m={cfg.block_m} must be a power of two >= 16 (tensor-core tile)")
        if cfg.split_k < 1:
            raise ValueError(f"config.split_k must be >= 1, got {cfg.split_k}")


def w4a16_kmajor_gemm(x: torch.Tensor, w: KMajorW4, bias: torch.Tensor | None = None,
                      config: W4A16Config | None = None, pdl: int = 0) -> torch.Tensor:
    """``y = x @ W_IO + bias`` from a ``KMajorW4`` (decode path; any M works).

    Args:
        x: bf16/fp16 [..., K]. w: the repacked linear. bias: float [N] or None.
        config: launch config; ``kmajor_config`` when None (``block_k`` ignored).
        pdl: programmatic dependent launch (Hopper+): 0 off; 1 wait for the previous kernel at the
            start; 2 first prefetch this program's weights into L2. Same result bit for bit.

    Returns:
        y [..., N] in x's dtype, fp32 accumulation.
    """
    _check(x, w, bias, config)
    if pdl not in (0, 1, 2):
        raise ValueError(f"pdl must be 0, 1 or 2, got {pdl!r}")
    k, n = w.in_features, w.out_features
    m = x.numel() // k
    x2 = x.reshape(m, k)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*x.shape[:-1], n)
    cfg = config or kmajor_config(m, n, k, w.group_size, x.device)
    num_units = k // max(w.group_size, KBLOCK)
    per_split, split_k, grid, partials, locks = _split_plan(num_units, cfg, y)
    _kmajor_kernel[grid](
        x2, w.qweight, w.scales, w.zeros, bias if bias is not None else w.scales, y, partials, locks,
        m, n, num_units, per_split, split_k,
        x2.stride(0), x2.stride(1), w.qweight.stride(0), w.scales.stride(0), w.zeros.stride(0),
        y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, USE_SPLIT=split_k > 1, GROUP=w.group_size,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, INTERPRET=KERNELS_INTERPRETED, PDL=int(pdl),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **({"launch_pdl": True} if pdl else {}),
    )
    return y.reshape(*x.shape[:-1], n)
