"""AutoAWQ "GEMM" checkpoint layout: packing 4-bit weights and zero points into int32.

Layout (read by lmdeploy TurboMind, vLLM and transformers), for a linear with ``in`` inputs,
``out`` outputs and group size ``g``:

- ``qweight`` int32 [in, out / 8]: the integer weights transposed to [in, out], eight 4-bit values
  per int32. Nibble i (bits 4i..4i+3) of packed column c holds column ``8c + AWQ_PACK_ORDER[i]``.
- ``qzeros`` int32 [in / g, out / 8]: zero points [in / g, out] packed the same way.
- ``scales`` fp16 [in / g, out]; ``bias`` fp16 [out] or absent.

Dequantized: ``W_IO[i, o] = (q[i, o] - zero[i // g, o]) * scale[i // g, o]`` and the linear is
``y = x @ W_IO + bias``.

A value of 8..15 in nibble 7 sets bit 31, so a packed word can be negative as int32. Packing is
done in int64 and wrapped to int32 explicitly (two's complement), never through an overflowing
int32 shift.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mpo.quant.quantizer import dequantize_weight, quantize_weight, quantize_with_params

__all__ = [
    "AWQ_PACK_ORDER",
    "AWQ_UNPACK_ORDER",
    "PACK_FACTOR",
    "pack_awq_gemm",
    "unpack_awq_gemm",
    "dequantize_awq_gemm",
    "AWQLinearWeights",
]

AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_UNPACK_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)
# 32 bits / 4 bits per value.
PACK_FACTOR = 8
_BITS = 4
_NIBBLE_MASK = 0xF

# UNPACK is the inverse permutation of PACK: column j lives in nibble UNPACK[j].
assert all(AWQ_PACK_ORDER[AWQ_UNPACK_ORDER[j]] == j for j in range(PACK_FACTOR))
assert AWQ_UNPACK_ORDER == tuple(j // 2 + (PACK_FACTOR // 2) * (j % 2) for j in range(PACK_FACTOR))


def _check_int_matrix(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t)
        raise ValueError(f"{name} must be a 2-D tensor, got {shape}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")


def _pack_cols(values_RC: torch.Tensor, name: str) -> torch.Tensor:
    """Pack 4-bit values [rows, cols] into int32 [rows, cols / 8] in AWQ order."""
    rows, cols = values_RC.shape
    if cols % PACK_FACTOR != 0:
        raise ValueError(
            f"{name}: out_features={cols} must be divisible by {PACK_FACTOR} to pack 8 nibbles "
            "per int32"
        )
    v = values_RC.to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) > _NIBBLE_MASK):
        raise ValueError(
            f"{name} values must lie in [0, 15] for 4-bit packing, got range "
            f"[{int(v.min())}, {int(v.max())}]"
        )
    v_RCE = v.reshape(rows, cols // PACK_FACTOR, PACK_FACTOR)
    packed = torch.zeros(rows, cols // PACK_FACTOR, dtype=torch.int64, device=v.device)
    for nibble, col in enumerate(AWQ_PACK_ORDER):
        packed |= v_RCE[..., col] << (_BITS * nibble)
    # packed is in [0, 2**32); map the upper half onto negative int32 (two's complement).
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def _unpack_cols(packed_RC: torch.Tensor) -> torch.Tensor:
    """Inverse of ``_pack_cols``: int32 [rows, cols] -> int32 [rows, cols * 8] in [0, 15]."""
    rows, cols = packed_RC.shape
    # Reinterpret as unsigned 32-bit in int64 so right shifts do not drag the sign bit in.
    u = packed_RC.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(PACK_FACTOR, device=u.device, dtype=torch.int64) * _BITS
    nibbles_RCE = (u[..., None] >> shifts) & _NIBBLE_MASK
    # AWQ_UNPACK_ORDER[j] = j // 2 + 4 * (j % 2), computed on the device: a host tensor copied to the GPU
    # would fail inside CUDA graph capture (the fp32 fallback of WQLinear dequantizes on every call).
    steps = torch.arange(PACK_FACTOR, device=u.device, dtype=torch.int64)
    order = steps // 2 + (PACK_FACTOR // 2) * (steps % 2)
    # Column j of each block of 8 is nibble UNPACK[j].
    values_RCE = nibbles_RCE.index_select(-1, order)
    return values_RCE.reshape(rows, cols * PACK_FACTOR).to(torch.int32)


def pack_awq_gemm(q_OI: torch.Tensor, zeros_GO: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack 4-bit weights and zero points into the AutoAWQ GEMM layout.

    Args:
        q_OI: integer tensor [out, in], values in [0, 15] (``quantize_weight`` output).
        zeros_GO: integer tensor [in / g, out], values in [0, 15]; ``g = in / zeros_GO.shape[0]``.

    Returns:
        ``(qweight, qzeros)``: int32 [in, out / 8] and int32 [in / g, out / 8].

    Raises:
        ValueError: non-integer input, values outside [0, 15], ``out`` not divisible by 8, or
            shapes of ``q_OI`` and ``zeros_GO`` that disagree.
    """
    _check_int_matrix("q_OI", q_OI)
    _check_int_matrix("zeros_GO", zeros_GO)
    out_features, in_features = q_OI.shape
    num_groups, zeros_out = zeros_GO.shape
    if zeros_out != out_features:
        raise ValueError(
            f"zeros_GO has {zeros_out} columns but q_OI has out_features={out_features}; "
            "zeros_GO must be [in / group_size, out]"
        )
    if num_groups == 0 or in_features % num_groups != 0:
        raise ValueError(
            f"zeros_GO has {num_groups} groups, which does not divide in_features={in_features}; "
            "in_features must be divisible by group_size"
        )
    qweight = _pack_cols(q_OI.t(), "q_OI")
    qzeros = _pack_cols(zeros_GO, "zeros_GO")
    return qweight, qzeros


def unpack_awq_gemm(
    qweight: torch.Tensor, qzeros: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack the AutoAWQ GEMM layout.

    Args:
        qweight: int32 [in, out / 8].
        qzeros: int32 [in / g, out / 8].

    Returns:
        ``(q_IO, zeros_GO)``: int32 [in, out] and int32 [in / g, out], values in [0, 15].
    """
    _check_int_matrix("qweight", qweight)
    _check_int_matrix("qzeros", qzeros)
    if qweight.shape[1] != qzeros.shape[1]:
        raise ValueError(
            f"qweight has {qweight.shape[1]} packed columns but qzeros has {qzeros.shape[1]}; "
            "both must be [*, out / 8]"
        )
    return _unpack_cols(qweight), _unpack_cols(qzeros)


def dequantize_awq_gemm(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales_GO: torch.Tensor, group_size: int = 128
) -> torch.Tensor:
    """Dequantize an AutoAWQ GEMM linear to a float32 [in, out] matrix, ``y = x @ W_IO + bias``.

    Args:
        qweight: int32 [in, out / 8].
        qzeros: int32 [in / group_size, out / 8].
        scales_GO: float tensor [in / group_size, out] (fp16 in checkpoints).
        group_size: input rows per group.

    Returns:
        float32 tensor [in, out].
    """
    q_IO, zeros_GO = unpack_awq_gemm(qweight, qzeros)
    in_features, out_features = q_IO.shape
    if not isinstance(group_size, int) or group_size <= 0 or in_features % group_size != 0:
        raise ValueError(
            f"group_size={group_size!r} must be a positive divisor of in_features={in_features}"
        )
    num_groups = in_features // group_size
    for name, t in (("qzeros", zeros_GO), ("scales", scales_GO)):
        if tuple(t.shape) != (num_groups, out_features):
            raise ValueError(
                f"{name} (unpacked) must be [{num_groups}, {out_features}] for in_features="
                f"{in_features}, group_size={group_size}; got {tuple(t.shape)}"
            )
    # dequantize_weight works on [out, in]; transposing q keeps one implementation of the math.
    return dequantize_weight(q_IO.t(), scales_GO, zeros_GO, group_size=group_size).t().contiguous()


@dataclass
class AWQLinearWeights:
    """Tensors of one AWQ-quantized linear in the AutoAWQ GEMM checkpoint layout.

    Attributes:
        qweight: int32 [in, out / 8], packed 4-bit weights.
        qzeros: int32 [in / group_size, out / 8], packed 4-bit zero points.
        scales: fp16 [in / group_size, out], weight units per integer step.
        bias: fp16 [out] or None.
        in_features: input dimension of the linear.
        out_features: output dimension of the linear.
        group_size: input columns per scale/zero group.
    """

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    bias: torch.Tensor | None
    in_features: int
    out_features: int
    group_size: int = 128

    @classmethod
    def from_quantized(
        cls,
        q_OI: torch.Tensor,
        scales_GO: torch.Tensor,
        zeros_GO: torch.Tensor,
        bias: torch.Tensor | None = None,
        group_size: int = 128,
    ) -> AWQLinearWeights:
        """Pack already-quantized integers (``quantize_weight`` output) into checkpoint tensors.

        Scales are stored as fp16 as given; to make the integers consistent with fp16 scales use
        ``from_linear``, which re-rounds against the stored scales.
        """
        out_features, in_features = q_OI.shape
        qweight, qzeros = pack_awq_gemm(q_OI, zeros_GO)
        weights = cls(
            qweight=qweight,
            qzeros=qzeros,
            scales=scales_GO.detach().to(torch.float16).contiguous(),
            bias=None if bias is None else bias.detach().to(torch.float16).contiguous(),
            in_features=in_features,
            out_features=out_features,
            group_size=group_size,
        )
        weights.validate()
        return weights

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128) -> AWQLinearWeights:
        """Quantize an ``nn.Linear`` (weights already AWQ-scaled/clipped) and pack it.

        Scales are computed in fp32, rounded to fp16 (the stored precision), and the integers are
        re-derived against the fp16 scales so the checkpoint dequantizes to the nearest grid point
        of what the kernel actually multiplies by.
        """
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        weight_OI = linear.weight.detach()
        _, scales_GO, zeros_GO = quantize_weight(weight_OI, group_size=group_size, bits=_BITS)
        scales16_GO = scales_GO.to(torch.float16)
        if not bool(torch.isfinite(scales16_GO).all()) or not bool((scales16_GO > 0).all()):
            raise ValueError(
                "weight range does not fit fp16 scales (overflow or underflow); check the "
                "linear for inf/NaN or extreme values before exporting"
            )
        q_OI = quantize_with_params(
            weight_OI, scales16_GO.float(), zeros_GO, group_size=group_size, bits=_BITS
        )
        return cls.from_quantized(
            q_OI, scales16_GO, zeros_GO, bias=linear.bias, group_size=group_size
        )

    def validate(self) -> None:
        """Check dtypes and shapes of every tensor; raise ``ValueError`` naming the bad one."""
        i, o, g = self.in_features, self.out_features, self.group_size
        if not isinstance(g, int) or g <= 0:
            raise ValueError(f"group_size must be a positive integer, got {g!r}")
        if o % PACK_FACTOR != 0:
            raise ValueError(f"out_features={o} must be divisible by {PACK_FACTOR}")
        if i % g != 0:
            raise ValueError(f"in_features={i} must be divisible by group_size={g}")
        expected = {
            "qweight": (self.qweight, torch.int32, (i, o // PACK_FACTOR)),
            "qzeros": (self.qzeros, torch.int32, (i // g, o // PACK_FACTOR)),
            "scales": (self.scales, torch.float16, (i // g, o)),
        }
        if self.bias is not None:
            expected["bias"] = (self.bias, torch.float16, (o,))
        for name, (tensor, dtype, shape) in expected.items():
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
            if tensor.dtype != dtype:
                raise ValueError(f"{name} must have dtype {dtype}, got {tensor.dtype}")
            if tuple(tensor.shape) != shape:
                raise ValueError(
                    f"{name} must have shape {shape} for in_features={i}, out_features={o}, "
                    f"group_size={g}; got {tuple(tensor.shape)}"
                )

    def dequantize(self) -> torch.Tensor:
        """Float32 weight [in, out] such that ``y = x @ W_IO + bias``."""
        return dequantize_awq_gemm(self.qweight, self.qzeros, self.scales, self.group_size)

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Checkpoint tensors keyed ``{prefix}qweight``, ``qzeros``, ``scales`` (+ ``bias``)."""
        tensors = {
            f"{prefix}qweight": self.qweight,
            f"{prefix}qzeros": self.qzeros,
            f"{prefix}scales": self.scales,
        }
        if self.bias is not None:
            tensors[f"{prefix}bias"] = self.bias
        return tensors

    def to(self, device: torch.device | str) -> AWQLinearWeights:
        """Copy of these weights on ``device`` (dtypes unchanged)."""
        return AWQLinearWeights(
            qweight=self.qweight.to(device),
            qzeros=self.qzeros.to(device),
            scales=self.scales.to(device),
            bias=None if self.bias is None else self.bias.to(device),
            in_features=self.in_features,
            out_features=self.out_features,
            group_size=self.group_size,
        )
