"""W4A16 Triton kernels for the AutoAWQ "GEMM" layout: ``y = x @ W_IO + bias``.

Weights (see ``mpo.quant.pack``): ``qweight`` int32 [K, N/8], ``qzeros`` int32 [K/g, N/8],
``scales`` [K/g, N] (fp16 in checkpoints), ``W[k, n] = (q[k, n] - zero[k//g, n]) * scale[k//g, n]``.
Nibble i (bits 4i..4i+3) of packed column c holds column ``8c + ORDER[i]`` with
ORDER = [0, 2, 4, 6, 1, 3, 5, 7], so column j of a block of eight sits in nibble
``UNPACK[j] = j // 2 + 4 * (j % 2)``.

Math (both kernels): per weight, ``q - zero`` is formed exactly (both nibbles are OR-ed into the
mantissa of the same magic float: 2**23 in fp32, 128 in bf16, 1024 in fp16, so no int->float
conversion instruction is needed), multiplied by x and accumulated in fp32 over one group; the
group's fp32 partial is then multiplied by its scales. No dequantized weight is ever rounded to
16 bits, and the scale costs one multiply per group instead of one per weight.

Two kernels, one dispatcher:

- ``w4a16_gemm_tiled``: tiled tensor-core GEMM for prefill, one program per output tile.
- ``w4a16_gemv_splitk``: skinny-M / GEMV for decode: each program owns a block of N and a slice of
  the K groups and writes an fp32 partial; the last program to finish a tile (counted with an
  atomic) sums the partials and writes y, so the op stays one launch. M = 1 uses FMAs instead of a
  16-row padded ``tl.dot``.
- ``w4a16_gemm`` picks one from M and from whether the tiles alone would fill the GPU.

CPU tensors run only under ``TRITON_INTERPRET=1`` set before this module is imported (tests do this).
The interpreter cannot do bf16 arithmetic or bf16 ``tl.dot`` (it stores bf16 as raw uint16), so when
interpreted the dot operands are upcast to fp32, which gives the same exact products.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mpo.infer.kernels.splitk import (  # noqa: F401 (_TILE_LOCKS: the counters tests inspect)
    _TILE_LOCKS,
    W4A16Config,
    _num_sms,
    _split_for,
    _split_plan,
    _splitk_finish,
    _store_output,
)

__all__ = [
    "KERNELS_INTERPRETED",
    "SKINNY_MAX_M",
    "W4A16Config",
    "w4a16_gemm",
    "w4a16_gemm_tiled",
    "w4a16_gemv_splitk",
    "default_config",
]

# Largest M that always takes the split-K (decode) kernel; above it the tiled GEMM runs unless its
# tiles alone would not fill the GPU (then split-K with larger row tiles).
SKINNY_MAX_M = 16
PACK = 8  # 4-bit values per int32


@triton.jit
def _unpack_nibbles(packed, MAGIC: tl.constexpr):
    """int32 [..., C] -> uint32 [..., 8C]: nibble values OR-ed with MAGIC, natural column order.

    Nibble i holds column ORDER[i]: nibbles 0-3 are columns 0, 2, 4, 6 and nibbles 4-7 columns
    1, 3, 5, 7. ``tl.interleave`` keeps each word's eight values in the thread that loaded the
    word (a 3-D broadcast + reshape lets the compiler spread them over lanes and shuffle).
    MAGIC is OR-ed per nibble so mask and OR fuse into one instruction.
    """
    p = packed.to(tl.uint32, bitcast=True)  # logical shifts: no sign-extension fix-ups
    evens = tl.interleave(tl.interleave((p & 0xF) | MAGIC, ((p >> 8) & 0xF) | MAGIC),
                          tl.interleave(((p >> 4) & 0xF) | MAGIC, ((p >> 12) & 0xF) | MAGIC))
    odds = tl.interleave(tl.interleave(((p >> 16) & 0xF) | MAGIC, ((p >> 24) & 0xF) | MAGIC),
                         tl.interleave(((p >> 20) & 0xF) | MAGIC, (p >> 28) | MAGIC))
    return tl.interleave(evens, odds)


@triton.jit
def _nibble_operands(packed_w, packed_z, x, BLOCK_M: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """Unpacked weights and zeros as floats offset by the same constant, so w - z == q - zero.

    The offset is a magic float whose mantissa receives the nibble (no int->float instruction):
    2**23 in fp32 for the FMA path, 128 (bf16) or 1024 (fp16) in x's dtype for tl.dot. The
    interpreter cannot do 16-bit float math, so there the dot operands are plain fp32.
    """
    if BLOCK_M == 1:
        w = _unpack_nibbles(packed_w, 0x4B000000).to(tl.float32, bitcast=True)
        z = _unpack_nibbles(packed_z, 0x4B000000).to(tl.float32, bitcast=True)
    elif UPCAST_DOT:
        w = _unpack_nibbles(packed_w, 0).to(tl.float32)
        z = _unpack_nibbles(packed_z, 0).to(tl.float32)
    elif x.dtype == tl.bfloat16:
        w = _unpack_nibbles(packed_w, 0x4300).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        z = _unpack_nibbles(packed_z, 0x4300).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        w = _unpack_nibbles(packed_w, 0x6400).to(tl.uint16).to(tl.float16, bitcast=True)
        z = _unpack_nibbles(packed_z, 0x6400).to(tl.uint16).to(tl.float16, bitcast=True)
    return w, z


@triton.jit
def _accumulate_groups(
    x_ptr, qw_ptr, qz_ptr, s_ptr,
    m0, rn, rn8, M, mask_n, mask_n8, g_start, g_end,
    stride_xm, stride_xk, stride_qwk, stride_qwn, stride_qzg, stride_qzn, stride_sg, stride_sn,
    GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """fp32 [BLOCK_M, BLOCK_N] = sum over groups [g_start, g_end) of x @ dequantized W.

    Per weight: unpack, (q - zero) exactly (both offset by the same magic constant), multiply by
    x; the scale multiplies the group's fp32 partial once. BLOCK_M == 1 uses FMAs into a
    [BLOCK_K, BLOCK_N] accumulator reduced over K once at the end; BLOCK_M >= 16 uses tl.dot.
    """
    rk = tl.arange(0, BLOCK_K)
    rm = m0 + tl.arange(0, BLOCK_M)
    mask_m = rm < M
    if BLOCK_M == 1:
        acc2 = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(g_start, g_end):
        zp = tl.load(qz_ptr + g * stride_qzg + rn8 * stride_qzn, mask=mask_n8, other=0)
        s = tl.load(s_ptr + g * stride_sg + rn * stride_sn, mask=mask_n, other=0.0).to(tl.float32)
        if BLOCK_M == 1:
            acc_g2 = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        else:
            acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # Unrolled so the loop over groups is the innermost scf.for and gets software-pipelined.
        for kk in tl.static_range(0, GROUP_SIZE, BLOCK_K):
            k = g * GROUP_SIZE + kk + rk
            # K is a multiple of GROUP_SIZE (checked on the host): only rows and columns are ragged.
            packed = tl.load(qw_ptr + k[:, None] * stride_qwk + rn8[None, :] * stride_qwn,
                             mask=mask_n8[None, :], other=0)
            if BLOCK_M == 1:
                # The grid has exactly M row-programs here, so row m0 exists: no mask.
                x1 = tl.load(x_ptr + m0 * stride_xm + k * stride_xk)
                w, z = _nibble_operands(packed, zp, x1, BLOCK_M, UPCAST_DOT)
                acc_g2 += x1.to(tl.float32)[:, None] * (w - z[None, :])
            else:
                x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :] * stride_xk,
                            mask=mask_m[:, None], other=0.0)
                w, z = _nibble_operands(packed, zp, x, BLOCK_M, UPCAST_DOT)
                if UPCAST_DOT:
                    acc_g = tl.dot(x.to(tl.float32), w - z[None, :], acc_g, input_precision="ieee")
                else:
                    acc_g = tl.dot(x, w - z[None, :], acc_g)
        if BLOCK_M == 1:
            acc2 += acc_g2 * s[None, :]
        else:
            acc += acc_g * s[None, :]
    if BLOCK_M == 1:
        acc = tl.sum(acc2, axis=0)[None, :]
    return acc


@triton.jit
def _w4a16_gemm_kernel(
    x_ptr, qw_ptr, qz_ptr, s_ptr, bias_ptr, y_ptr,
    M, N, N8, num_groups,
    stride_xm, stride_xk, stride_qwk, stride_qwn, stride_qzg, stride_qzn, stride_sg, stride_sn,
    stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    # Grouped program order: GROUP_M row-tiles walk the same column-tiles together so the packed
    # weight tiles are reused from L2 instead of re-read from HBM.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_rows
    pid_n = (pid % num_pid_in_group) // group_rows

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn8 = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
    mask_m = rm < M
    mask_n = rn < N
    acc = _accumulate_groups(
        x_ptr, qw_ptr, qz_ptr, s_ptr, pid_m * BLOCK_M, rn, rn8, M, mask_n, rn8 < N8, 0, num_groups,
        stride_xm, stride_xk, stride_qwk, stride_qwn, stride_qzg, stride_qzn, stride_sg, stride_sn,
        GROUP_SIZE, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST_DOT,
    )
    _store_output(acc, bias_ptr, y_ptr, rm, rn, mask_n, mask_m[:, None] & mask_n[None, :],
                  stride_ym, stride_yn, HAS_BIAS)


@triton.jit
def _w4a16_splitk_kernel(
    x_ptr, qw_ptr, qz_ptr, s_ptr, bias_ptr, y_ptr, part_ptr, lock_ptr,
    M, N, N8, num_groups, groups_per_split, split_k,
    stride_xm, stride_xk, stride_qwk, stride_qwn, stride_qzg, stride_qzn, stride_sg, stride_sn,
    stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, USE_SPLIT: tl.constexpr, GROUP_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn8 = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
    mask_m = rm < M
    mask_n = rn < N
    mask = mask_m[:, None] & mask_n[None, :]
    g_start = pid_s * groups_per_split
    g_end = tl.minimum(g_start + groups_per_split, num_groups)
    acc = _accumulate_groups(
        x_ptr, qw_ptr, qz_ptr, s_ptr, pid_m * BLOCK_M, rn, rn8, M, mask_n, rn8 < N8, g_start, g_end,
        stride_xm, stride_xk, stride_qwk, stride_qwn, stride_qzg, stride_qzn, stride_sg, stride_sn,
        GROUP_SIZE, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST_DOT,
    )
    if USE_SPLIT:
        _splitk_finish(acc, bias_ptr, y_ptr, part_ptr, lock_ptr, rm, rn, mask_n, mask, M, N, pid_s, pid_m, pid_n,
                       split_k, stride_ym, stride_yn, HAS_BIAS, BLOCK_M, BLOCK_N)
    else:
        _store_output(acc, bias_ptr, y_ptr, rm, rn, mask_n, mask, stride_ym, stride_yn, HAS_BIAS)


# Decided when the kernels were decorated: TRITON_INTERPRET=1 at import time.
KERNELS_INTERPRETED = not isinstance(_w4a16_gemm_kernel, triton.runtime.JITFunction)


def default_config(m: int, n: int, k: int, group_size: int, device: torch.device) -> W4A16Config:
    """Heuristic launch config at shape (m, n, k); ``split_k > 1`` means the split-K kernel.

    Decode is bandwidth-bound: K is split until there are several programs per SM to keep enough
    weight bytes in flight. Prefill uses the tiled kernel when its tiles alone fill the GPU.
    """
    num_groups = k // group_size
    num_sms = 4 if device.type != "cuda" else _num_sms(device.index or 0)
    # Tuned on an H100 (bench/bench_kernels.py --sweep) over the 4B model's linear shapes: small
    # tiles with many programs beat large tiles for decode (more loads in flight per SM).
    if m == 1:
        block_n = 64
        tiles = triton.cdiv(n, block_n)
        return W4A16Config(1, block_n, 16, _split_for(num_groups, tiles, 4 * num_sms), 4, 3)
    if m <= SKINNY_MAX_M:
        block_n = 64
        tiles = triton.cdiv(n, block_n) * triton.cdiv(m, 16)
        return W4A16Config(16, block_n, min(128, group_size),
                           _split_for(num_groups, tiles, 2 * num_sms), 4, 3)
    # Prefill: 64 x 64 tiles; once they alone give >= 4 programs per SM the tiled kernel (with
    # 128-row tiles) wins, below that splitting K (at most 8 ways) fills the GPU better.
    block_k = min(64, group_size)
    block_m = min(64, _pow2_at_least(m, 16))
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, 64)
    if tiles >= 4 * num_sms:
        return W4A16Config(128, 64, block_k, 1, 4, 3)
    return W4A16Config(block_m, 64, block_k, min(8, _split_for(num_groups, tiles, 2 * num_sms)), 4, 3)


def _pow2_at_least(n: int, low: int) -> int:
    return max(low, triton.next_power_of_2(max(n, 1)))


def _check_inputs(x, qweight, qzeros, scales, bias, group_size) -> tuple[int, int, int]:
    """Validate shapes/dtypes/devices; return (M, N, K) for x flattened to [M, K]."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError("x must be a tensor [..., K]")
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"x must be bf16 or fp16 (W4A16 takes 16-bit activations), got {x.dtype}")
    if (not isinstance(group_size, int) or group_size < 16
            or group_size & (group_size - 1)):
        raise ValueError(f"group_size must be a power of two >= 16 (AWQ uses 128), got {group_size!r}")
    for name, t in (("qweight", qweight), ("qzeros", qzeros)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D int32 tensor (AutoAWQ GEMM layout)")
    k, n8 = qweight.shape
    n = n8 * PACK
    if k == 0 or k % group_size != 0:
        raise ValueError(f"K={k} (qweight rows) must be a positive multiple of group_size={group_size}")
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features but qweight is [K={k}, N/8={n8}]")
    num_groups = k // group_size
    if tuple(qzeros.shape) != (num_groups, n8):
        raise ValueError(f"qzeros must be [K/group_size, N/8] = {(num_groups, n8)}, "
                         f"got {tuple(qzeros.shape)}")
    if (not isinstance(scales, torch.Tensor) or not scales.is_floating_point()
            or tuple(scales.shape) != (num_groups, n)):
        raise ValueError(f"scales must be a float tensor [K/group_size, N] = {(num_groups, n)}, "
                         f"got {getattr(scales, 'shape', type(scales))}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (n,)
                             or not bias.is_floating_point()):
        raise ValueError(f"bias must be a float tensor [N] = [{n}] or None")
    tensors = [x, qweight, qzeros, scales] + ([bias] if bias is not None else [])
    if any(t.device != x.device for t in tensors):
        raise ValueError("x, qweight, qzeros, scales and bias must be on the same device")
    if x.device.type != "cuda" and not KERNELS_INTERPRETED:
        raise ValueError(f"Triton kernels need CUDA tensors (got {x.device}); for CPU set "
                         "TRITON_INTERPRET=1 before importing mpo.infer.kernels, or use the "
                         "reference twin w4a16_gemm_ref")
    return x.numel() // k, n, k


def _check_config(cfg: W4A16Config, group_size: int, tiled: bool) -> None:
    for name in ("block_m", "block_n", "block_k"):
        v = getattr(cfg, name)
        if v < 1 or v & (v - 1):
            raise ValueError(f"config.{name}={v} must be a power of two")
    if cfg.block_n < 16 or cfg.block_k < 16 or cfg.block_k > group_size:
        raise ValueError(f"config needs block_n >= 16 and 16 <= block_k <= group_size={group_size}")
    if (tiled or cfg.block_m > 1) and cfg.block_m < 16:
        raise ValueError("block_m must be 1 (split-K FMA GEMV) or >= 16 (tl.dot)")
    if cfg.split_k < 1:
        raise ValueError(f"config.split_k must be >= 1, got {cfg.split_k}")


def _launch_tiled(x2, qweight, qzeros, scales, bias, y, group_size, cfg):
    m, k = x2.shape
    n = y.shape[1]
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    _w4a16_gemm_kernel[grid](
        x2, qweight, qzeros, scales, bias if bias is not None else scales, y,
        m, n, n // PACK, k // group_size,
        x2.stride(0), x2.stride(1), qweight.stride(0), qweight.stride(1),
        qzeros.stride(0), qzeros.stride(1), scales.stride(0), scales.stride(1),
        y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, GROUP_SIZE=group_size, BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        UPCAST_DOT=KERNELS_INTERPRETED, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def _launch_splitk(x2, qweight, qzeros, scales, bias, y, group_size, cfg):
    m, k = x2.shape
    n = y.shape[1]
    num_groups = k // group_size
    groups_per_split, split_k, grid, partials, locks = _split_plan(num_groups, cfg, y)
    _w4a16_splitk_kernel[grid](
        x2, qweight, qzeros, scales, bias if bias is not None else scales, y, partials, locks,
        m, n, n // PACK, num_groups, groups_per_split, split_k,
        x2.stride(0), x2.stride(1), qweight.stride(0), qweight.stride(1),
        qzeros.stride(0), qzeros.stride(1), scales.stride(0), scales.stride(1),
        y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, USE_SPLIT=split_k > 1, GROUP_SIZE=group_size,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        UPCAST_DOT=KERNELS_INTERPRETED, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def _run(x, qweight, qzeros, scales, bias, group_size, cfg, tiled: bool) -> torch.Tensor:
    m, n, k = x.numel() // x.shape[-1], scales.shape[1], x.shape[-1]
    x2 = x.reshape(m, k)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m > 0:
        launch = _launch_tiled if tiled else _launch_splitk
        launch(x2, qweight, qzeros, scales, bias, y, group_size, cfg)
    return y.reshape(*x.shape[:-1], n)


def w4a16_gemm_tiled(x, qweight, qzeros, scales, bias=None, group_size: int = 128,
                     config: W4A16Config | None = None) -> torch.Tensor:
    """Tiled tensor-core W4A16 GEMM (prefill path): one program per output tile, full K.

    Args:
        x: bf16/fp16 activations [..., K].
        qweight: int32 [K, N/8]; qzeros: int32 [K/g, N/8]; scales: float [K/g, N] (fp16 in AWQ).
        bias: float [N] or None.
        group_size: g, input rows per scale/zero group (power of two >= 16).
        config: launch config (``split_k`` ignored); a prefill default when None.

    Returns:
        y [..., N] in x's dtype, fp32-accumulated ``x @ W_IO + bias``.
    """
    m, n, k = _check_inputs(x, qweight, qzeros, scales, bias, group_size)
    cfg = config or default_config(max(m, SKINNY_MAX_M + 1), n, k, group_size, x.device)
    _check_config(cfg, group_size, tiled=True)
    return _run(x, qweight, qzeros, scales, bias, group_size, cfg, tiled=True)


def w4a16_gemv_splitk(x, qweight, qzeros, scales, bias=None, group_size: int = 128,
                      config: W4A16Config | None = None) -> torch.Tensor:
    """Split-K skinny-M W4A16 GEMV/GEMM (decode path); any M works, meant for small M.

    Each program reduces ``block_m`` rows x ``block_n`` columns over K / split_k and writes an fp32
    partial; the last program to finish a tile sums the partials and writes y (one launch).
    ``block_m == 1`` runs FMAs (no 16-row padding of tl.dot). Arguments and result as in
    ``w4a16_gemm_tiled``; config defaults to the decode heuristic for min(M, 16) rows.
    """
    m, n, k = _check_inputs(x, qweight, qzeros, scales, bias, group_size)
    cfg = config or default_config(min(max(m, 1), SKINNY_MAX_M), n, k, group_size, x.device)
    _check_config(cfg, group_size, tiled=False)
    return _run(x, qweight, qzeros, scales, bias, group_size, cfg, tiled=False)


def w4a16_gemm(x, qweight, qzeros, scales, bias=None, group_size: int = 128) -> torch.Tensor:
    """``y = x @ W_IO + bias`` for an AutoAWQ GEMM-layout linear; picks kernel and tiles from M.

    Args:
        x: bf16/fp16 activations [..., K] (M = product of leading dims; any M >= 0).
        qweight: int32 [K, N/8] packed 4-bit weights (K multiple of group_size, N multiple of 8).
        qzeros: int32 [K/group_size, N/8] packed zero points.
        scales: float [K/group_size, N] (fp16 in AWQ checkpoints).
        bias: float [N] or None.
        group_size: input rows per group (AWQ: 128).

    Returns:
        y [..., N] in x's dtype (fp32 accumulation). Small M (and prefill shapes whose tiles would
        not fill the GPU) run the split-K kernel, the rest the tiled GEMM; see ``default_config``.
    """
    m, n, k = _check_inputs(x, qweight, qzeros, scales, bias, group_size)
    cfg = default_config(max(m, 1), n, k, group_size, x.device)
    tiled = m > SKINNY_MAX_M and cfg.split_k == 1
    return _run(x, qweight, qzeros, scales, bias, group_size, cfg, tiled=tiled)
