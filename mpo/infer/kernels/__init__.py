"""Inference kernels: W4A16 GEMM/GEMV (AutoAWQ GEMM layout and the K-major decode repack), fused
RMSNorm, fused SiLU*mul.

Triton kernels need CUDA tensors, or ``TRITON_INTERPRET=1`` set before this package is imported
(then they also run on CPU tensors, slowly). ``reference`` holds plain-torch twins of each kernel.
"""

from mpo.infer.kernels.act import silu_mul
from mpo.infer.kernels.norm import rms_norm
from mpo.infer.kernels.reference import rms_norm_ref, silu_mul_ref, w4a16_gemm_ref
from mpo.infer.kernels.w4a16 import (
    KERNELS_INTERPRETED,
    SKINNY_MAX_M,
    W4A16Config,
    default_config,
    w4a16_gemm,
    w4a16_gemm_tiled,
    w4a16_gemv_splitk,
)
from mpo.infer.kernels.w4a16_kmajor import KMajorW4, repack_kmajor, w4a16_kmajor_gemm, w4a16_kmajor_ref

__all__ = [
    "KERNELS_INTERPRETED",
    "KMajorW4",
    "SKINNY_MAX_M",
    "W4A16Config",
    "default_config",
    "repack_kmajor",
    "rms_norm",
    "rms_norm_ref",
    "silu_mul",
    "silu_mul_ref",
    "w4a16_gemm",
    "w4a16_gemm_ref",
    "w4a16_gemm_tiled",
    "w4a16_gemv_splitk",
    "w4a16_kmajor_gemm",
    "w4a16_kmajor_ref",
]
