"""Plain-torch twins of the Triton kernels: the definition each kernel is tested against.

They favour obviousness over speed: dequantize the whole weight to fp32 then matmul, normalize in
fp32. They run on any device, so they also serve as the CPU fallback an engine may choose.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mpo.quant.pack import dequantize_awq_gemm

__all__ = ["w4a16_gemm_ref", "rms_norm_ref", "silu_mul_ref"]


def w4a16_gemm_ref(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor,
                   scales: torch.Tensor, bias: torch.Tensor | None = None,
                   group_size: int = 128) -> torch.Tensor:
    """``x @ W_IO + bias`` with W dequantized to fp32 (AutoAWQ GEMM layout), fp32 matmul.

    Args:
        x: float [..., K]; qweight int32 [K, N/8]; qzeros int32 [K/g, N/8]; scales [K/g, N];
        bias: [N] or None.

    Returns:
        [..., N] in x's dtype.
    """
    w_IO = dequantize_awq_gemm(qweight, qzeros, scales, group_size=group_size)
    if x.shape[-1] != w_IO.shape[0]:
        raise ValueError(f"x has {x.shape[-1]} features but the weight is [K={w_IO.shape[0]}, N]")
    y = x.float() @ w_IO.to(x.device)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2 decoder-layer ``h = x + residual`` then Qwen2RMSNorm; returns ``(y, h)``.

    Same rounding points as the model: h in x's dtype, normalized row rounded to x's dtype before
    the weight multiply, product rounded again.
    """
    h = x if residual is None else (x.float() + residual.float()).to(x.dtype)
    hf = h.float()
    normed = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    y = (normed.float() * weight.float()).to(x.dtype)
    return y, h


def silu_mul_ref(gate_up: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(gate) * up`` in fp32, rounded once to the input dtype; [..., 2I] or (gate, up)."""
    if up is None:
        gate, up = gate_up.chunk(2, dim=-1)
    else:
        gate = gate_up
    return (F.silu(gate.float()) * up.float()).to(gate_up.dtype)
