"""Fused residual-add + RMSNorm (Qwen2 semantics) as one Triton kernel: one program per row.

For each row (hidden size H)::

    h = x + residual                    # rounded to x's dtype, as the model adds in bf16
    y = round(h * rsqrt(mean(h^2) + eps)) * weight   # statistics and products in fp32
    return round(y), h                  # h is the residual stream for the next block

The intermediate rounding of the normalized row before the weight multiply copies Qwen2RMSNorm
(``weight * hidden.to(input_dtype)``), so outputs match the Hugging Face module to the last bit
up to rsqrt's rounding. One read of x and residual, one write of y and h: the unfused version
reads h twice more and launches ~6 kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["rms_norm", "MAX_HIDDEN"]

# One program holds a whole row in registers; past this a row would spill heavily.
MAX_HIDDEN = 65536


@triton.jit
def _rms_norm_kernel(
    x_ptr, r_ptr, w_ptr, y_ptr, h_ptr, H, eps,
    stride_x, stride_r, stride_y, stride_h,
    HAS_RESIDUAL: tl.constexpr, BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    h = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        h += tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        h_low = h.to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + row * stride_h + cols, h_low, mask=mask)
        # Normalize the rounded sum: that is the residual the model carries forward.
        h = h_low.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(h * h, axis=0) / H + eps)
    normed = (h * inv_rms).to(y_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = (normed * w).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + row * stride_y + cols, y, mask=mask)


def _interpreted() -> bool:
    return not isinstance(_rms_norm_kernel, triton.runtime.JITFunction)


def _rows(t: torch.Tensor, h: int) -> torch.Tensor:
    """[..., H] -> [rows, H] with unit stride along H (copy only when needed)."""
    t2 = t.reshape(-1, h)
    return t2 if t2.stride(1) == 1 else t2.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``h = x + residual; y = RMSNorm(h) * weight`` (Qwen2RMSNorm semantics).

    Args:
        x: bf16/fp16 tensor [..., H].
        weight: float tensor [H] (norm gain).
        eps: variance epsilon (Qwen2.5: 1e-6), >= 0.
        residual: tensor like x, or None (then h = x).

    Returns:
        ``(y, h)``, both [..., H] in x's dtype; h is the new residual (x itself when residual is
        None, no copy).
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError("x must be a tensor [..., H] with H > 0")
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"x must be bf16 or fp16, got {x.dtype}")
    hidden = x.shape[-1]
    if hidden > MAX_HIDDEN:
        raise ValueError(f"hidden size {hidden} exceeds MAX_HIDDEN={MAX_HIDDEN} for one-row programs")
    if (not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (hidden,)
            or not weight.is_floating_point()):
        raise ValueError(f"weight must be a float tensor [H] = [{hidden}], got "
                         f"{getattr(weight, 'shape', type(weight))}")
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")
    if residual is not None and (not isinstance(residual, torch.Tensor)
                                 or residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual must match x in shape {tuple(x.shape)} and dtype {x.dtype}")
    tensors = [x, weight] + ([residual] if residual is not None else [])
    if any(t.device != x.device for t in tensors):
        raise ValueError("x, weight and residual must be on the same device")
    if x.device.type != "cuda" and not _interpreted():
        raise ValueError(f"Triton kernels need CUDA tensors (got {x.device}); for CPU set "
                         "TRITON_INTERPRET=1 before importing mpo.infer.kernels, or use rms_norm_ref")

    x2 = _rows(x, hidden)
    rows = x2.shape[0]
    y = torch.empty((rows, hidden), dtype=x.dtype, device=x.device)
    if residual is None:
        r2, h2 = x2, x2  # unused by the kernel (HAS_RESIDUAL=False)
    else:
        r2 = _rows(residual, hidden)
        h2 = torch.empty((rows, hidden), dtype=x.dtype, device=x.device)
    if rows > 0:
        block_h = triton.next_power_of_2(hidden)
        num_warps = min(16, max(1, block_h // 512))
        _rms_norm_kernel[(rows,)](
            x2, r2, weight, y, h2, hidden, float(eps),
            x2.stride(0), r2.stride(0), y.stride(0), h2.stride(0),
            HAS_RESIDUAL=residual is not None, BLOCK_H=block_h, num_warps=num_warps,
        )
    new_residual = x if residual is None else h2.reshape(x.shape)
    return y.reshape(x.shape), new_residual
