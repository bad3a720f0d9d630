"""Fused SwiGLU activation ``y = silu(gate) * up`` as one Triton kernel.

The MLP of Qwen2 computes ``down(silu(gate(x)) * up(x))``. When gate and up come from one fused
[M, 2I] projection, this kernel reads both halves in place (no split copies) and writes [M, I]
once; math runs in fp32 with one final rounding (Hugging Face rounds silu to bf16 first, so
results can differ from it by one bf16 ulp).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["silu_mul"]


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, y_ptr, inter, stride_g, stride_u, stride_y,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    # sigmoid from exp(-|g|) <= 1, so nothing overflows for large |g|.
    e = tl.exp(-tl.abs(g))
    sigmoid = tl.where(g >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    y = g * sigmoid * u
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def _interpreted() -> bool:
    return not isinstance(_silu_mul_kernel, triton.runtime.JITFunction)


def _rows(t: torch.Tensor, width: int) -> torch.Tensor:
    t2 = t.reshape(-1, width)
    return t2 if t2.stride(1) == 1 else t2.contiguous()


def silu_mul(gate_up: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(gate) * up`` in fp32 math, output in the input dtype.

    Args:
        gate_up: bf16/fp16 [..., 2I] holding gate in the first half and up in the second (when
            ``up`` is None), or the gate [..., I] itself.
        up: None, or bf16/fp16 [..., I] matching ``gate_up`` in shape and dtype.

    Returns:
        y [..., I] in the input dtype.
    """
    if not isinstance(gate_up, torch.Tensor) or gate_up.dim() < 1:
        raise ValueError("gate_up must be a tensor [..., 2I] (or the gate [..., I] with up=...)")
    if gate_up.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"silu_mul takes bf16 or fp16 inputs, got {gate_up.dtype}")
    if up is None:
        width = gate_up.shape[-1]
        if width % 2 != 0:
            raise ValueError(f"fused gate_up last dim must be even (2I), got {width}")
        inter = width // 2
        both = _rows(gate_up, width)
        gate2, up2 = both[:, :inter], both[:, inter:]
    else:
        if (not isinstance(up, torch.Tensor) or up.shape != gate_up.shape
                or up.dtype != gate_up.dtype or up.device != gate_up.device):
            raise ValueError(f"up must match gate in shape {tuple(gate_up.shape)}, dtype and device")
        inter = gate_up.shape[-1]
        gate2, up2 = _rows(gate_up, inter), _rows(up, inter)
    if gate_up.device.type != "cuda" and not _interpreted():
        raise ValueError(f"Triton kernels need CUDA tensors (got {gate_up.device}); for CPU set "
                         "TRITON_INTERPRET=1 before importing mpo.infer.kernels, or use silu_mul_ref")
    rows = gate2.shape[0]
    y = torch.empty((rows, inter), dtype=gate_up.dtype, device=gate_up.device)
    if rows > 0 and inter > 0:
        block = min(1024, triton.next_power_of_2(inter))
        _silu_mul_kernel[(rows, triton.cdiv(inter, block))](
            gate2, up2, y, inter, gate2.stride(0), up2.stride(0), y.stride(0),
            BLOCK=block, num_warps=4,
        )
    return y.reshape(*gate_up.shape[:-1], inter)
