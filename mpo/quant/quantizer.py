"""Asymmetric group-wise integer quantizer for linear weights (the AWQ / AutoAWQ quantizer).

A weight matrix ``W`` of shape [out, in] is cut into groups of ``group_size`` consecutive input
columns. Each (output row, group) gets its own scale and zero point::

    scale = max((max - min) / (2**bits - 1), 1e-5)
    zero  = clamp(round(-min / scale), 0, 2**bits - 1)
    q     = clamp(round(w / scale) + zero, 0, 2**bits - 1)
    w    ~= (q - zero) * scale

Scales and zeros are returned "group-major" ([in / group_size, out]) because that is how the
AutoAWQ GEMM checkpoint stores them (see ``mpo.quant.pack``). All math runs in fp32 whatever the
input dtype, so bf16/fp16 weights quantize identically to their fp32 upcast.
"""

from __future__ import annotations

import torch

__all__ = [
    "MIN_SCALE",
    "quantize_weight",
    "quantize_with_params",
    "dequantize_weight",
    "pseudo_quantize",
]

# Floor on the step size: a constant group (max == min) would otherwise divide by zero.
MIN_SCALE = 1e-5


def _check_bits(bits: int) -> int:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in [1, 8], got {bits!r}")
    return (1 << bits) - 1


def _check_weight(weight_OI: torch.Tensor, group_size: int) -> None:
    if not isinstance(weight_OI, torch.Tensor) or weight_OI.dim() != 2:
        shape = tuple(weight_OI.shape) if isinstance(weight_OI, torch.Tensor) else type(weight_OI)
        raise ValueError(f"weight_OI must be a 2-D tensor [out, in], got {shape}")
    if not weight_OI.is_floating_point():
        raise ValueError(f"weight_OI must be a floating-point tensor, got {weight_OI.dtype}")
    if not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    in_features = weight_OI.shape[1]
    if in_features % group_size != 0:
        raise ValueError(
            f"in_features={in_features} is not divisible by group_size={group_size}; "
            "pick a group size that divides the input dimension (e.g. 128 or 64)"
        )


def _check_group_params(
    scales_GO: torch.Tensor, zeros_GO: torch.Tensor, expected: tuple[int, int]
) -> None:
    for name, t in (("scales_GO", scales_GO), ("zeros_GO", zeros_GO)):
        if tuple(t.shape) != expected:
            raise ValueError(
                f"{name} must have shape {expected} [in / group_size, out], got {tuple(t.shape)}"
            )


def quantize_weight(
    weight_OI: torch.Tensor, group_size: int = 128, bits: int = 4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize a linear weight to unsigned ``bits``-bit integers, asymmetric per group.

    Args:
        weight_OI: float tensor [out, in] (``nn.Linear.weight`` layout), any float dtype.
        group_size: number of consecutive input columns sharing one scale/zero; must divide ``in``.
        bits: integer width; values land in [0, 2**bits - 1] (4 -> [0, 15]).

    Returns:
        ``(q_OI, scales_GO, zeros_GO)``: ``q_OI`` int32 [out, in] in [0, 2**bits - 1];
        ``scales_GO`` float32 [in / group_size, out] (weight units per integer step);
        ``zeros_GO`` int32 [in / group_size, out] in [0, 2**bits - 1].

    Raises:
        ValueError: ``weight_OI`` is not 2-D float, ``in`` is not divisible by ``group_size``, or
            ``bits`` is outside [1, 8].
    """
    max_int = _check_bits(bits)
    _check_weight(weight_OI, group_size)
    out_features, in_features = weight_OI.shape
    num_groups = in_features // group_size
    w_OGK = weight_OI.detach().float().reshape(out_features, num_groups, group_size)
    w_max_OG = w_OGK.amax(dim=-1)
    w_min_OG = w_OGK.amin(dim=-1)
    scales_OG = ((w_max_OG - w_min_OG) / max_int).clamp(min=MIN_SCALE)
    zeros_OG = torch.round(-w_min_OG / scales_OG).clamp(0, max_int)
    q_OGK = torch.round(w_OGK / scales_OG[..., None]) + zeros_OG[..., None]
    q_OI = q_OGK.clamp(0, max_int).reshape(out_features, in_features).to(torch.int32)
    return q_OI, scales_OG.t().contiguous(), zeros_OG.t().contiguous().to(torch.int32)


def quantize_with_params(
    weight_OI: torch.Tensor,
    scales_GO: torch.Tensor,
    zeros_GO: torch.Tensor,
    group_size: int = 128,
    bits: int = 4,
) -> torch.Tensor:
    """Quantize ``weight_OI`` with given per-group scales and zeros (q = clamp(round(w/s)+z)).

    Used when the stored scales differ from the fp32 ones (e.g. rounded to fp16 for the
    checkpoint) so that the integers match what the kernel will multiply by.

    Args:
        weight_OI: float tensor [out, in].
        scales_GO: float tensor [in / group_size, out], strictly positive.
        zeros_GO: integer or float tensor [in / group_size, out].
        group_size: input columns per group.
        bits: integer width.

    Returns:
        ``q_OI`` int32 [out, in] in [0, 2**bits - 1].
    """
    max_int = _check_bits(bits)
    _check_weight(weight_OI, group_size)
    out_features, in_features = weight_OI.shape
    num_groups = in_features // group_size
    _check_group_params(scales_GO, zeros_GO, (num_groups, out_features))
    if not bool((scales_GO > 0).all()):
        raise ValueError("scales_GO must be strictly positive")
    w_OGK = weight_OI.detach().float().reshape(out_features, num_groups, group_size)
    scales_OG = scales_GO.t().float()
    zeros_OG = zeros_GO.t().float()
    q_OGK = torch.round(w_OGK / scales_OG[..., None]) + zeros_OG[..., None]
    return q_OGK.clamp(0, max_int).reshape(out_features, in_features).to(torch.int32)


def dequantize_weight(
    q_OI: torch.Tensor, scales_GO: torch.Tensor, zeros_GO: torch.Tensor, group_size: int = 128
) -> torch.Tensor:
    """Reconstruct a float weight: ``(q - zero) * scale`` per (row, group).

    Args:
        q_OI: integer tensor [out, in].
        scales_GO: float tensor [in / group_size, out].
        zeros_GO: integer tensor [in / group_size, out].
        group_size: input columns per group.

    Returns:
        float32 tensor [out, in].
    """
    if q_OI.dim() != 2:
        raise ValueError(f"q_OI must be 2-D [out, in], got shape {tuple(q_OI.shape)}")
    out_features, in_features = q_OI.shape
    if not isinstance(group_size, int) or group_size <= 0 or in_features % group_size != 0:
        raise ValueError(
            f"group_size={group_size!r} must be a positive divisor of in_features={in_features}"
        )
    num_groups = in_features // group_size
    _check_group_params(scales_GO, zeros_GO, (num_groups, out_features))
    q_OGK = q_OI.float().reshape(out_features, num_groups, group_size)
    w_OGK = (q_OGK - zeros_GO.t().float()[..., None]) * scales_GO.t().float()[..., None]
    return w_OGK.reshape(out_features, in_features)


def pseudo_quantize(weight_OI: torch.Tensor, group_size: int = 128, bits: int = 4) -> torch.Tensor:
    """Quantize then dequantize (fake quantization), for measuring quantization error.

    Args:
        weight_OI: float tensor [out, in]; math runs in fp32.

    Returns:
        tensor [out, in] with the same dtype and device as ``weight_OI``.
    """
    q_OI, scales_GO, zeros_GO = quantize_weight(weight_OI, group_size=group_size, bits=bits)
    return dequantize_weight(q_OI, scales_GO, zeros_GO, group_size=group_size).to(weight_OI.dtype)
