"""GPU tests of mpo.infer.kernels: the same checks as tests/unit/test_kernels.py, compiled natively,
plus InternVL2.5-4B's real linear shapes, the GPU launch heuristics and CUDA-graph capture.

If the kernels were already imported in interpreter mode in this process (tests/unit/test_kernels.py
collected first), each test is delegated to one child pytest of this file without TRITON_INTERPRET.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mpo.infer.kernels import (
    KERNELS_INTERPRETED,
    W4A16Config,
    rms_norm,
    rms_norm_ref,
    silu_mul,
    silu_mul_ref,
    w4a16_gemm,
    w4a16_gemm_ref,
    w4a16_gemm_tiled,
    w4a16_gemv_splitk,
)
from mpo.infer.kernels.w4a16_kmajor import repack_kmajor, w4a16_kmajor_gemm, w4a16_kmajor_ref
from mpo.quant.pack import pack_awq_gemm
from mpo.quant.quantizer import quantize_weight

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

_CHILD_FLAG = "MPO_KERNEL_GPU_TESTS_CHILD"
if KERNELS_INTERPRETED and os.environ.get(_CHILD_FLAG):
    raise RuntimeError("the child GPU test process still imported the kernels in interpreter mode")

G = 128
ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
DEV = "cuda"


@functools.cache
def _child_outcomes() -> dict[str, tuple[str, str]]:
    """Run this file in a fresh native-mode pytest; map test name -> (outcome, message)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env[_CHILD_FLAG] = "1"
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider",
             f"--junitxml={report}"],
            env=env, cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True,
            timeout=900,
        )
        if not report.exists():
            raise AssertionError(f"child pytest wrote no report:\n{proc.stdout[-3000:]}\n"
                                 f"{proc.stderr[-3000:]}")
        outcomes = {}
        for case in ET.parse(report).getroot().iter("testcase"):
            bad = [c for c in case if c.tag in ("failure", "error", "skipped")]
            outcomes[case.get("name")] = (
                (bad[0].tag, (bad[0].get("message") or "")[:2000]) if bad else ("passed", ""))
    return outcomes


def _delegated(request) -> bool:
    """True when this test already ran (and is asserted) in the native-mode child."""
    if not KERNELS_INTERPRETED:
        return False
    outcome, message = _child_outcomes().get(request.node.name, ("missing", "not reported"))
    assert outcome == "passed", f"child run: {outcome}: {message}"
    return True


@functools.lru_cache(maxsize=16)
def _quantized_linear(n: int, k: int, seed: int, bias: bool, group_size: int = G):
    """Random AWQ linear on the GPU: (qweight, qzeros, scales, bias|None, W_IO fp32 from q/z/s).

    Cached: quantizing an 11008 x 2048 weight on the CPU is the slow part of these tests.
    """
    gen = torch.Generator().manual_seed(seed)
    q_OI, scales_GO, zeros_GO = quantize_weight(torch.randn(n, k, generator=gen) * 0.05, group_size)
    qweight, qzeros = pack_awq_gemm(q_OI, zeros_GO)
    scales16 = scales_GO.half()
    groups = torch.arange(k) // group_size
    w_IO = (q_OI.t().float() - zeros_GO[groups].float()) * scales16[groups].float()
    b = (torch.randn(n, generator=gen) * 0.5).half() if bias else None
    to = lambda t: None if t is None else t.to(DEV)  # noqa: E731
    return to(qweight), to(qzeros), to(scales16), to(b), to(w_IO)


def _check_against_twin(y, x, qweight, qzeros, scales, bias, w_IO, group_size=G):
    exact = x.float() @ w_IO + (bias.float() if bias is not None else 0.0)
    atol = 1e-5 * (x.float().abs() @ w_IO.abs()).max().item()
    assert y.dtype == x.dtype and torch.isfinite(y.float()).all()
    err = (y.float() - exact).abs()
    # Natively the fp32 result is rounded to nearest: half an ulp plus accumulation-order noise.
    bound = 0.5 * ULP[x.dtype] * exact.abs() + atol
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3g}"
    twin = w4a16_gemm_ref(x, qweight, qzeros, scales, bias, group_size=group_size)
    torch.testing.assert_close(y.float(), twin.float(), rtol=ULP[x.dtype], atol=2 * atol)


def _hand_linear(descending: bool):
    word = 0x8ACE9BDF - 2**32 if descending else 0x75316420
    qweight = torch.full((128, 2), word, dtype=torch.int32, device=DEV)
    qzeros = torch.full((1, 2), 0x88888888 - 2**32, dtype=torch.int32, device=DEV)
    scales = torch.full((1, 16), 0.5, dtype=torch.float16, device=DEV)
    return qweight, qzeros, scales


@pytest.mark.parametrize("descending", [False, True])
@pytest.mark.parametrize("fn", [w4a16_gemm, w4a16_gemm_tiled, w4a16_gemv_splitk])
def test_w4a16_hand_worked_gpu(request, fn, descending):
    if _delegated(request):
        return
    qweight, qzeros, scales = _hand_linear(descending)
    x = torch.ones(2, 128, dtype=torch.bfloat16, device=DEV)
    x[1] = 2.0
    bias = 1024.0 * (torch.arange(16, device=DEV) // 8)
    y = fn(x, qweight, qzeros, scales, bias.half(), group_size=128)
    q = torch.arange(16, device=DEV) % 8
    q = 15 - q if descending else q
    base = 64.0 * (q - 8)
    expected = torch.stack([base, 2 * base]) + bias
    torch.testing.assert_close(y.float(), expected.float(), rtol=0, atol=0)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", [(72, 128), (200, 384), (256, 2048), (2048, 2048), (2048, 11008)])
@pytest.mark.parametrize("m", [1, 3, 8, 16, 17, 33, 64, 256])
def test_w4a16_gemm_matches_twin_gpu(request, m, n, k, dtype, bias):
    if _delegated(request):
        return
    qweight, qzeros, scales, b, w_IO = _quantized_linear(n, k, seed=n + k, bias=bias)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype).to(DEV)
    y = w4a16_gemm(x, qweight, qzeros, scales, b, group_size=G)
    assert y.shape == (m, n)
    _check_against_twin(y, x, qweight, qzeros, scales, b, w_IO)


@pytest.mark.parametrize(
    "kind,m,cfg",
    [
        ("tiled", 1, W4A16Config(16, 64, 64)),
        ("tiled", 40, W4A16Config(32, 128, 32, num_warps=4, group_m=1)),
        ("tiled", 300, W4A16Config(128, 128, 64, num_warps=8, num_stages=4)),
        ("splitk", 1, W4A16Config(1, 64, 32, split_k=3)),
        ("splitk", 3, W4A16Config(16, 32, 64, split_k=2)),
        ("splitk", 33, W4A16Config(16, 64, 128, split_k=8)),
        ("splitk", 5, W4A16Config(1, 128, 16, split_k=1)),
        ("splitk", 1, W4A16Config(1, 256, 32, split_k=16, num_warps=8)),
    ],
)
def test_w4a16_explicit_configs_gpu(request, kind, m, cfg):
    if _delegated(request):
        return
    n, k = 200, 2048
    qweight, qzeros, scales, b, w_IO = _quantized_linear(n, k, seed=7, bias=True)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).to(DEV)
    fn = w4a16_gemm_tiled if kind == "tiled" else w4a16_gemv_splitk
    y = fn(x, qweight, qzeros, scales, b, group_size=G, config=cfg)
    _check_against_twin(y, x, qweight, qzeros, scales, b, w_IO)


def test_w4a16_group_size_64_and_strided_gpu(request):
    if _delegated(request):
        return
    n, k = 136, 512
    qweight, qzeros, scales, _, w_IO = _quantized_linear(n, k, seed=9, bias=False, group_size=64)
    base = torch.randn(2, 9, 2 * k, generator=torch.Generator().manual_seed(3)).half().to(DEV)
    x = base[..., ::2]
    for rows in (1, 9):
        y = w4a16_gemm(x[:, :rows], qweight, qzeros, scales, group_size=64)
        assert y.shape == (2, rows, n)
        _check_against_twin(y.reshape(-1, n), x[:, :rows].reshape(-1, k), qweight, qzeros,
                            scales, None, w_IO, group_size=64)


def test_w4a16_cuda_graph_replay(request):
    if _delegated(request):
        return
    qweight, qzeros, scales, b, _ = _quantized_linear(256, 2048, seed=5, bias=True)
    x = torch.randn(1, 2048, device=DEV).to(torch.bfloat16)
    expected = w4a16_gemm(x, qweight, qzeros, scales, b)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = w4a16_gemm(x, qweight, qzeros, scales, b)
    x.copy_(torch.randn(1, 2048, device=DEV).to(torch.bfloat16))
    graph.replay()
    torch.testing.assert_close(y, w4a16_gemm(x, qweight, qzeros, scales, b), rtol=0, atol=0)
    assert not torch.equal(y, expected)


def test_w4a16_splitk_counters_reset_and_deterministic_gpu(request):
    if _delegated(request):
        return
    from mpo.infer.kernels import w4a16 as w4a16_module

    qweight, qzeros, scales, b, _ = _quantized_linear(2048, 2048, seed=4, bias=True)
    for m, cfg in [(1, W4A16Config(1, 128, 32, split_k=16)), (8, W4A16Config(16, 64, 64, split_k=8))]:
        x = torch.randn(m, 2048, device=DEV).to(torch.bfloat16)
        outputs = [w4a16_gemv_splitk(x, qweight, qzeros, scales, b, config=cfg) for _ in range(20)]
        torch.cuda.synchronize()
        assert int(w4a16_module._TILE_LOCKS[x.device].abs().sum()) == 0
        # Partials are summed in slice order whichever program finishes last: bitwise repeatable.
        assert all(torch.equal(outputs[0], o) for o in outputs[1:])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 8, 16, 17, 64])
@pytest.mark.parametrize("n,k,g", [(2560, 2048, 128), (2048, 11008, 128), (200, 384, 64), (40, 512, 256)])
def test_kmajor_matches_exact_product_gpu(request, m, n, k, g, dtype):
    if _delegated(request):
        return
    qweight, qzeros, scales, bias, w_IO = _quantized_linear(n, k, seed=n, bias=True, group_size=g)
    w = repack_kmajor(qweight, qzeros, scales, g)
    gen = torch.Generator().manual_seed(m + n)
    x = torch.randn(m, k, generator=gen).to(dtype).to(DEV)
    y = w4a16_kmajor_gemm(x, w, bias)
    exact = x.float() @ w_IO + bias.float()
    atol = 1e-5 * (x.float().abs() @ w_IO.abs()).max().item()
    err = (y.float() - exact).abs()
    assert bool((err <= 0.5 * ULP[dtype] * exact.abs() + atol).all()), (err - 0.5 * ULP[dtype] * exact.abs()).max()
    torch.testing.assert_close(y.float(), w4a16_kmajor_ref(x, w, bias).float(), rtol=ULP[dtype], atol=2 * atol)


def test_kmajor_graph_replay_pdl_and_determinism_gpu(request):
    if _delegated(request):
        return
    from mpo.infer.kernels import w4a16 as w4a16_module

    qweight, qzeros, scales, b, _ = _quantized_linear(2048, 2048, seed=6, bias=True)
    w = repack_kmajor(qweight, qzeros, scales, G)
    x = torch.randn(1, 2048, device=DEV).to(torch.bfloat16)
    plain = w4a16_kmajor_gemm(x, w, b)
    for pdl in (1, 2):  # programmatic dependent launch: same result, bit for bit
        assert torch.equal(plain, w4a16_kmajor_gemm(x, w, b, pdl=pdl))
    assert all(torch.equal(plain, w4a16_kmajor_gemm(x, w, b)) for _ in range(20))
    torch.cuda.synchronize()
    assert int(w4a16_module._TILE_LOCKS[x.device].abs().sum()) == 0
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = w4a16_kmajor_gemm(x, w, b)
    x.copy_(torch.randn(1, 2048, device=DEV).to(torch.bfloat16))
    graph.replay()
    torch.testing.assert_close(y, w4a16_kmajor_gemm(x, w, b), rtol=0, atol=0)
    assert not torch.equal(y, plain)


def test_kernels_reject_cpu_tensors_natively(request):
    if _delegated(request):
        return
    qweight, qzeros, scales, _, _ = _quantized_linear(64, 256, seed=0, bias=False)
    x = torch.randn(2, 256).to(torch.bfloat16)
    with pytest.raises(ValueError):
        w4a16_gemm(x, qweight.cpu(), qzeros.cpu(), scales.cpu())
    with pytest.raises(ValueError):
        w4a16_gemm(x.to(DEV), qweight.cpu(), qzeros, scales)  # mixed devices
    with pytest.raises(ValueError):
        rms_norm(x, torch.ones(256, dtype=torch.bfloat16), 1e-6)
    with pytest.raises(ValueError):
        silu_mul(x)


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden", [200, 2048, 3584])
def test_rms_norm_matches_twin_gpu(request, hidden, dtype, with_residual):
    if _delegated(request):
        return
    gen = torch.Generator().manual_seed(hidden)
    x = (torch.randn(4, 33, hidden, generator=gen) * 3).to(dtype).to(DEV)
    residual = ((torch.randn(4, 33, hidden, generator=gen) * 3).to(dtype).to(DEV)
                if with_residual else None)
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype).to(DEV)
    y, h = rms_norm(x, weight, 1e-6, residual)
    y_ref, h_ref = rms_norm_ref(x, weight, 1e-6, residual)
    if with_residual:
        torch.testing.assert_close(h, h_ref, rtol=0, atol=0)  # one correctly rounded add
    else:
        assert h is x
    # rsqrt and the row-sum order may move the normalized value across a rounding boundary.
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2 * ULP[dtype], atol=1e-6)
    expected = F.rms_norm(h_ref.float(), (hidden,), weight.float(), eps=1e-6)
    torch.testing.assert_close(y.float(), expected, rtol=2 * ULP[dtype], atol=1e-6)


@pytest.mark.parametrize("two_tensors", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_silu_mul_matches_twin_gpu(request, dtype, two_tensors):
    if _delegated(request):
        return
    gen = torch.Generator().manual_seed(4)
    gate_up = (torch.randn(3, 17, 2 * 11008, generator=gen) * 4).to(dtype).to(DEV)
    y = silu_mul(gate_up[..., :11008], gate_up[..., 11008:]) if two_tensors else silu_mul(gate_up)
    assert y.shape == (3, 17, 11008) and y.dtype == dtype
    torch.testing.assert_close(y.float(), silu_mul_ref(gate_up).float(), rtol=ULP[dtype], atol=1e-6)
    special = torch.tensor([[0.0, 1.0, -100.0, 10.0, 5.0, 2.0, 3.0, 0.5]], dtype=dtype, device=DEV)
    expected = torch.tensor([[0.0, 2 * 0.7310586, 0.0, 0.5 * 9.9995460]], device=DEV)
    torch.testing.assert_close(silu_mul(special).float(), expected, rtol=1e-2, atol=0)
