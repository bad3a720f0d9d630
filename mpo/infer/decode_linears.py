"""Decode-time linears: projections fused into one GEMM, and AWQ linears in the K-major layout.

A decode step multiplies one or a few token rows by every weight of the model, so what it costs is
reading the weights. Two things make that cheaper than running the model's own modules:

- fusing the projections that read the same input (q/k/v, gate/up) into one GEMM (`fuse_linears`);
- for AWQ models on CUDA, repacking each linear once into the layout the decode kernel streams
  fastest (`KMajorLinear`, `mpo.infer.kernels.w4a16_kmajor`). The checkpoint-layout `WQLinear`s
  stay in the model for prefill, so the int4 weights are held twice (the repacked copy is what
  decode reads): ~1.4 GB more for the 4B model.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["KMajorLinear", "decode_linear", "fuse_linears"]


def _fuse_dense(linears: list[nn.Linear]) -> nn.Linear | None:
    first = linears[0]
    if any(m.in_features != first.in_features or m.weight.dtype != first.weight.dtype
           or m.weight.device != first.weight.device or (m.bias is None) != (first.bias is None) for m in linears):
        return None
    sizes = [m.out_features for m in linears]
    fused = nn.Linear(first.in_features, sum(sizes), bias=first.bias is not None, device="meta")
    fused.weight = nn.Parameter(torch.cat([m.weight.detach() for m in linears]), requires_grad=False)
    for m, rows in zip(linears, fused.weight.split(sizes)):
        m.weight = nn.Parameter(rows, requires_grad=False)
    if first.bias is not None:
        fused.bias = nn.Parameter(torch.cat([m.bias.detach() for m in linears]), requires_grad=False)
        for m, part in zip(linears, fused.bias.split(sizes)):
            m.bias = nn.Parameter(part, requires_grad=False)
    return fused


def _awq_compatible(linears: list[nn.Module]) -> bool:
    first = linears[0]
    return all(type(m).__name__ == "WQLinear" for m in linears) and not any(
        m.in_features != first.in_features or m.group_size != first.group_size
        or (m.bias is None) != (first.bias is None) or m.qweight.device != first.qweight.device for m in linears)


def _concat_awq(linears: list[nn.Module]):
    """AutoAWQ GEMM tensors are [in (or groups), out / 8 | out]: concatenating along the output axis
    gives the fused linear's tensors (each packed int32 holds 8 columns of one linear)."""
    from mpo.quant.pack import AWQLinearWeights

    if len(linears) == 1:
        m = linears[0]
        return AWQLinearWeights(qweight=m.qweight, qzeros=m.qzeros, scales=m.scales, bias=m.bias,
                                in_features=m.in_features, out_features=m.out_features, group_size=m.group_size)
    first = linears[0]
    return AWQLinearWeights(
        qweight=torch.cat([m.qweight for m in linears], dim=1).contiguous(),
        qzeros=torch.cat([m.qzeros for m in linears], dim=1).contiguous(),
        scales=torch.cat([m.scales for m in linears], dim=1).contiguous(),
        bias=None if first.bias is None else torch.cat([m.bias for m in linears]).contiguous(),
        in_features=first.in_features, out_features=sum(m.out_features for m in linears),
        group_size=first.group_size)


def fuse_linears(linears: list[nn.Module]) -> nn.Module | None:
    """One linear computing all of `linears` at once (outputs concatenated), or None.

    Plain `nn.Linear`s of one input size, dtype and device: their weights (and biases) move into
    the fused module's buffer and each original keeps a view of its rows, so the originals still
    work and no memory is duplicated. AWQ `WQLinear`s: the packed tensors are concatenated along
    the output axis into a new `WQLinear` (a copy: ~ the q/k/v or gate/up share of the int4
    weights, since packed column blocks cannot be views). Anything else: None.
    """
    if len(linears) < 2:
        return None
    if all(type(m) is nn.Linear for m in linears):
        return _fuse_dense(linears)
    if _awq_compatible(linears):
        from mpo.quant.awq_linear import WQLinear

        return WQLinear.from_awq_weights(_concat_awq(linears), use_kernel=linears[0].use_kernel)
    return None


class KMajorLinear(nn.Module):
    """An AWQ linear repacked for the decode kernel: ``y = x @ W_IO + bias``.

    Holds a `KMajorW4` (``qweight`` int32 [N, K/8], ``scales`` [N, K/g], ``zeros`` uint8 [N, K/g]) and
    the bias. Runs `w4a16_kmajor_gemm` on bf16/fp16 CUDA inputs and its fp32 twin otherwise.
    Build it with `from_awq` (one or several `WQLinear`s of one input size, outputs concatenated).
    """

    def __init__(self, weights, bias: torch.Tensor | None):
        super().__init__()
        self.weights = weights
        self.bias = bias
        self.in_features, self.out_features = weights.in_features, weights.out_features

    @classmethod
    def from_awq(cls, linears: list[nn.Module]) -> KMajorLinear:
        from mpo.infer.kernels.w4a16_kmajor import repack_kmajor

        awq = _concat_awq(linears)
        return cls(repack_kmajor(awq.qweight, awq.qzeros, awq.scales, awq.group_size), awq.bias)

    @staticmethod
    def supports(linears: list[nn.Module]) -> bool:
        """Whether `from_awq` can repack these (AWQ linears of one input size, K % 128 == 0, g >= 32)."""
        from mpo.infer.kernels.w4a16_kmajor import KBLOCK

        g = linears[0].group_size if linears and hasattr(linears[0], "group_size") else 0
        return (bool(linears) and _awq_compatible(linears) and linears[0].in_features % KBLOCK == 0
                and g >= 32 and g & (g - 1) == 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> y [..., N] in x's dtype."""
        if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
            from mpo.infer.kernels.w4a16_kmajor import w4a16_kmajor_gemm

            return w4a16_kmajor_gemm(x, self.weights, self.bias)
        from mpo.infer.kernels.w4a16_kmajor import w4a16_kmajor_ref

        return w4a16_kmajor_ref(x, self.weights, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, group_size={self.weights.group_size}")


def decode_linear(linears: list[nn.Module]) -> nn.Module | None:
    """The module decode should run for `linears` (outputs concatenated), or None for "the model's own".

    AWQ linears on CUDA that the K-major kernel supports: a `KMajorLinear` (also for a single
    linear). Otherwise, several linears: `fuse_linears` (None if they cannot be fused); one: None.
    """
    on_cuda = all(getattr(m, "qweight", None) is not None and m.qweight.is_cuda for m in linears)
    if on_cuda and KMajorLinear.supports(linears):
        return KMajorLinear.from_awq(linears)
    return fuse_linears(linears)
