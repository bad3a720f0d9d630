"""Launch configuration and the split-K machinery shared by the W4A16 kernels (``w4a16``, ``w4a16_kmajor``).

A decode GEMV splits K over programs to keep enough weight bytes in flight; each program writes an
fp32 partial and the last program of a tile (an atomic count in ``_TILE_LOCKS``) sums the partials in
slice order and writes y, so an op is one launch and its result is deterministic.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@triton.jit
def _store_output(acc, bias_ptr, y_ptr, rm, rn, mask_n, mask, stride_ym, stride_yn,
                  HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _splitk_finish(acc, bias_ptr, y_ptr, part_ptr, lock_ptr, rm, rn, mask_n, mask, M, N, pid_s, pid_m, pid_n,
                   split_k, stride_ym, stride_yn, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """Write this K slice's fp32 partial [BLOCK_M, BLOCK_N]; the last slice of the tile to finish
    (an atomic count) sums all partials in slice order and writes y, so the op stays one launch (a
    separate reduce kernel costs a launch per linear per token) and its result is deterministic."""
    offs = rm[:, None] * N + rn[None, :]
    tl.store(part_ptr + pid_s * M * N + offs, acc, mask=mask)
    tl.debug_barrier()  # every thread's partial is written before the count is released
    tile = pid_m * tl.num_programs(0) + pid_n
    done = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel", scope="gpu")
    if done == split_k - 1:
        total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for s in range(split_k):
            # .cg reads L2, where the other programs' partials are; L1 may hold stale lines.
            total += tl.load(part_ptr + s * M * N + offs, mask=mask, other=0.0, cache_modifier=".cg")
        _store_output(total, bias_ptr, y_ptr, rm, rn, mask_n, mask, stride_ym, stride_yn, HAS_BIAS)
        tl.atomic_xchg(lock_ptr + tile, 0)  # self-resetting: ready for the next launch


@dataclass(frozen=True)
class W4A16Config:
    """Launch configuration. Blocks are powers of two; ``block_k`` is capped at the group size.

    Attributes:
        block_m: rows of x per program (tiled: >= 16; split-K: 1 for FMA GEMV or >= 16 for tl.dot).
        block_n: output columns per program (multiple of 8, >= 16).
        block_k: K elements per inner step (>= 16).
        split_k: K slices (split-K kernel only; 1 writes y directly).
        num_warps: warps per program.
        num_stages: software-pipeline depth (ignored by the interpreter).
        group_m: row-tiles walked together for L2 reuse (tiled kernel only).
    """

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _split_for(num_groups: int, tiles: int, target_programs: int) -> int:
    """K slices so that tiles * slices reaches ~target_programs, at most one slice per group."""
    return max(1, min(num_groups, round(target_programs / max(tiles, 1))))


# Per-device tile counters of the split-K kernel. They reset themselves after each use, so one
# buffer serves every call on a stream; split-K GEMMs running concurrently on different streams
# of one device would share counters and must not overlap.
_TILE_LOCKS: dict[torch.device, torch.Tensor] = {}


def _tile_locks(device: torch.device, count: int) -> torch.Tensor:
    locks = _TILE_LOCKS.get(device)
    if locks is None or locks.numel() < count:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise ValueError("the split-K counters must be allocated before CUDA-graph capture: "
                             "run w4a16_gemm once at this shape outside the capture (warm-up)")
        locks = torch.zeros(max(count, 4096), dtype=torch.int32, device=device)
        _TILE_LOCKS[device] = locks
    return locks


def _split_plan(num_chunks: int, cfg: W4A16Config, y: torch.Tensor):
    """Split-K launch plan over ``num_chunks`` K chunks for output ``y`` [M, N]:
    ``(chunks_per_split, split_k, grid, partials, locks)``; with one slice, ``partials`` and ``locks``
    are placeholders the kernel does not touch (USE_SPLIT=False)."""
    m, n = y.shape
    per_split = triton.cdiv(num_chunks, min(cfg.split_k, num_chunks))
    split_k = triton.cdiv(num_chunks, per_split)  # no empty slices
    grid = (triton.cdiv(n, cfg.block_n), split_k, triton.cdiv(m, cfg.block_m))
    if split_k == 1:
        return per_split, split_k, grid, y, y
    partials = torch.empty((split_k, m, n), dtype=torch.float32, device=y.device)
    return per_split, split_k, grid, partials, _tile_locks(y.device, grid[0] * grid[2])
