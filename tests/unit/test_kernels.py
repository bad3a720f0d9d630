"""CPU tests of mpo.infer.kernels: the Triton kernels run under the Triton interpreter.

TRITON_INTERPRET must be set before the kernels are decorated (at import), so this module sets it
first thing. If triton or the kernels were already imported natively in this process (e.g. a GPU
test module collected earlier), every test here is delegated to one child pytest process of this
file with the variable set, and each test asserts its own outcome there.
"""

from __future__ import annotations

import os
import sys

_INTERPRET_WAS = os.environ.get("TRITON_INTERPRET")
_TRITON_NATIVE_BEFORE = "triton" in sys.modules and (_INTERPRET_WAS or "0").lower() not in (
    "1", "true", "yes", "on")
os.environ["TRITON_INTERPRET"] = "1"

import functools  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import xml.etree.ElementTree as ET  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mpo.infer.kernels import (  # noqa: E402
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
from mpo.infer.kernels import act as _act  # noqa: E402
import triton  # noqa: E402

from mpo.infer.kernels import w4a16_kmajor as _kmajor  # noqa: E402
from mpo.infer.kernels.w4a16_kmajor import (  # noqa: E402
    repack_kmajor,
    unpack_kmajor,
    w4a16_kmajor_gemm,
    w4a16_kmajor_ref,
)
from mpo.infer.kernels import norm as _norm  # noqa: E402
from mpo.quant.pack import pack_awq_gemm, unpack_awq_gemm  # noqa: E402
from mpo.quant.quantizer import quantize_weight  # noqa: E402

# Put the variable back so modules imported after this one (other test files) jit natively; the
# autouse fixture below sets it again while each test here runs.
if _INTERPRET_WAS is None:
    del os.environ["TRITON_INTERPRET"]
else:
    os.environ["TRITON_INTERPRET"] = _INTERPRET_WAS

_CHILD_FLAG = "MPO_KERNEL_TESTS_CHILD"
_IN_PROCESS = (not _TRITON_NATIVE_BEFORE and KERNELS_INTERPRETED
               and _norm._interpreted() and _act._interpreted()
               and not isinstance(_kmajor._kmajor_kernel, triton.runtime.JITFunction))
if not _IN_PROCESS and os.environ.get(_CHILD_FLAG):
    raise RuntimeError("the child test process could not import the kernels in interpreter mode")

G = 128
# One bf16/fp16 ulp relative to the value (eps is the gap above 1.0).
ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


@pytest.fixture(autouse=True)
def _interpret_env(monkeypatch):
    # The interpreter reads TRITON_INTERPRET again at launch time (lazy imports inside triton).
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@functools.cache
def _child_outcomes() -> dict[str, tuple[str, str]]:
    """Run this file in a fresh interpreter-mode pytest; map test name -> (outcome, message)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        env = {**os.environ, "TRITON_INTERPRET": "1", _CHILD_FLAG: "1"}
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider",
             f"--junitxml={report}"],
            env=env, cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True,
            timeout=600,
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
    """True when this test already ran (and is asserted) in the interpreter-mode child."""
    if _IN_PROCESS:
        return False
    outcome, message = _child_outcomes().get(request.node.name, ("missing", "not reported"))
    assert outcome == "passed", f"child run: {outcome}: {message}"
    return True


def _quantized_linear(n: int, k: int, seed: int, bias: bool, g: int = G):
    """Random AWQ linear: (qweight, qzeros, scales fp16, bias fp16|None, W_IO fp32 from q/z/s)."""
    gen = torch.Generator().manual_seed(seed)
    q_OI, scales_GO, zeros_GO = quantize_weight(torch.randn(n, k, generator=gen) * 0.05, g)
    qweight, qzeros = pack_awq_gemm(q_OI, zeros_GO)
    scales16 = scales_GO.half()
    # Independent of pack.py's unpacking: straight from the quantizer's integers.
    groups = torch.arange(k) // g
    w_IO = (q_OI.t().float() - zeros_GO[groups].float()) * scales16[groups].float()
    b = (torch.randn(n, generator=gen) * 0.5).half() if bias else None
    return qweight, qzeros, scales16, b, w_IO


def _assert_close_ulps(actual, expected_fp32, dtype, ulps: float, atol: float):
    """|actual - expected| <= ulps * ulp(expected) + atol, elementwise."""
    assert actual.dtype == dtype
    err = (actual.float() - expected_fp32).abs()
    bound = ulps * ULP[dtype] * expected_fp32.abs() + atol
    assert torch.isfinite(actual.float()).all()
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3g}"


def _check_against_twin(y, x, qweight, qzeros, scales, bias, w_IO):
    exact = x.float() @ w_IO + (bias.float() if bias is not None else 0.0)
    # fp32 accumulation of exact products: order-dependent error bounded by ~K * 2^-24 * sum|x w|.
    atol = 1e-5 * (x.float().abs() @ w_IO.abs()).max().item()
    # Output rounding: half an ulp natively; the interpreter truncates to bf16, so one ulp.
    _assert_close_ulps(y, exact, x.dtype, ulps=1.0, atol=atol)
    twin = w4a16_gemm_ref(x, qweight, qzeros, scales, bias, group_size=G)
    _assert_close_ulps(twin, exact, x.dtype, ulps=0.5, atol=atol)
    torch.testing.assert_close(y.float(), twin.float(), rtol=2 * ULP[x.dtype], atol=2 * atol)


# --- W4A16 GEMM -------------------------------------------------------------------------------

def _hand_linear(descending: bool):
    """N=16, K=128 (one group): column j holds q = j % 8 (or 15 - j % 8), zero 8, scale 0.5."""
    # Nibble i holds column ORDER[i] = (0, 2, 4, 6, 1, 3, 5, 7)[i]: value j in column j packs to
    # 0x75316420; value 15 - j packs to 0x8ACE9BDF, whose top nibble sets the int32 sign bit.
    word = 0x8ACE9BDF - 2**32 if descending else 0x75316420
    qweight = torch.full((128, 2), word, dtype=torch.int32)
    qzeros = torch.full((1, 2), 0x88888888 - 2**32, dtype=torch.int32)
    scales = torch.full((1, 16), 0.5, dtype=torch.float16)
    return qweight, qzeros, scales


@pytest.mark.parametrize("descending", [False, True])
@pytest.mark.parametrize("fn", [w4a16_gemm, w4a16_gemm_tiled, w4a16_gemv_splitk, w4a16_gemm_ref])
def test_w4a16_hand_worked(request, fn, descending):
    if _delegated(request):
        return
    qweight, qzeros, scales = _hand_linear(descending)
    x = torch.ones(2, 128, dtype=torch.bfloat16)
    x[1] = 2.0
    # Bias tells the two packed columns apart; all sums stay exactly representable in bf16.
    bias = 1024.0 * (torch.arange(16) // 8)
    y = fn(x, qweight, qzeros, scales, bias.half(), group_size=128)
    # y[0, c] = 128 rows * (q - 8) * 0.5 + bias = 64 * (q - 8) + bias; row 1 doubles the matmul.
    q = torch.arange(16) % 8
    q = 15 - q if descending else q
    base = 64.0 * (q - 8)
    expected = torch.stack([base, 2 * base]) + bias
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected.float(), rtol=0, atol=0)


_GEMM_CASES = [(m, n, k) for m in (1, 3, 17, 33) for n, k in ((72, 128), (200, 384))]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,k", _GEMM_CASES)
def test_w4a16_gemm_matches_twin(request, m, n, k, dtype, bias):
    if _delegated(request):
        return
    qweight, qzeros, scales, b, w_IO = _quantized_linear(n, k, seed=m * 1000 + n, bias=bias)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    y = w4a16_gemm(x, qweight, qzeros, scales, b, group_size=G)
    assert y.shape == (m, n)
    _check_against_twin(y, x, qweight, qzeros, scales, b, w_IO)


@pytest.mark.parametrize(
    "kind,m,cfg",
    [
        ("tiled", 1, W4A16Config(16, 64, 64)),          # tiled kernel, one ragged row tile
        ("tiled", 40, W4A16Config(32, 128, 32, num_warps=4, group_m=1)),  # 4 K steps per group
        ("splitk", 1, W4A16Config(1, 64, 32, split_k=3)),  # FMA GEMV, one group per slice
        ("splitk", 3, W4A16Config(16, 32, 64, split_k=2)),  # dot path, uneven slices (2 + 1)
        ("splitk", 33, W4A16Config(16, 64, 128, split_k=8)),  # 3 row tiles; split capped at 3
        ("splitk", 5, W4A16Config(1, 128, 16, split_k=1)),  # FMA with 5 row programs, direct write
    ],
)
def test_w4a16_explicit_configs(request, kind, m, cfg):
    if _delegated(request):
        return
    n, k = 200, 384
    qweight, qzeros, scales, b, w_IO = _quantized_linear(n, k, seed=7, bias=True)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    fn = w4a16_gemm_tiled if kind == "tiled" else w4a16_gemv_splitk
    y = fn(x, qweight, qzeros, scales, b, group_size=G, config=cfg)
    _check_against_twin(y, x, qweight, qzeros, scales, b, w_IO)


def test_w4a16_splitk_counters_reset_and_deterministic(request):
    if _delegated(request):
        return
    from mpo.infer.kernels import w4a16 as w4a16_module

    qweight, qzeros, scales, b, _ = _quantized_linear(136, 512, seed=8, bias=True)
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    cfg = W4A16Config(16, 64, 64, split_k=4)
    first = w4a16_gemv_splitk(x, qweight, qzeros, scales, b, group_size=G, config=cfg)
    # The last program of each tile resets its counter, so a second call starts from zero.
    assert int(w4a16_module._TILE_LOCKS[x.device].abs().sum()) == 0
    second = w4a16_gemv_splitk(x, qweight, qzeros, scales, b, group_size=G, config=cfg)
    assert torch.equal(first, second)  # partials are summed in slice order, not finish order


def test_w4a16_leading_dims_strided_and_empty(request):
    if _delegated(request):
        return
    n, k = 64, 256
    qweight, qzeros, scales, _, w_IO = _quantized_linear(n, k, seed=3, bias=False)
    base = torch.randn(2, 3, 2 * k, generator=torch.Generator().manual_seed(5)).half()
    x = base[..., ::2]  # non-contiguous view [2, 3, K]
    y = w4a16_gemm(x, qweight, qzeros, scales, group_size=G)
    assert y.shape == (2, 3, n)
    _check_against_twin(y.reshape(6, n), x.reshape(6, k), qweight, qzeros, scales, None, w_IO)
    empty = w4a16_gemm(torch.empty(0, k, dtype=torch.half), qweight, qzeros, scales, group_size=G)
    assert empty.shape == (0, n) and empty.dtype == torch.half


def test_w4a16_group_size_64(request):
    if _delegated(request):
        return
    gen = torch.Generator().manual_seed(11)
    n, k, g = 48, 192, 64
    q_OI, scales_GO, zeros_GO = quantize_weight(torch.randn(n, k, generator=gen), g)
    qweight, qzeros = pack_awq_gemm(q_OI, zeros_GO)
    scales = scales_GO.half()
    x = torch.randn(5, k, generator=gen).to(torch.bfloat16)
    for m_rows in (1, 5):
        y = w4a16_gemm(x[:m_rows], qweight, qzeros, scales, group_size=g)
        twin = w4a16_gemm_ref(x[:m_rows], qweight, qzeros, scales, group_size=g)
        torch.testing.assert_close(y.float(), twin.float(), rtol=2 * ULP[torch.bfloat16], atol=1e-3)


def _bad_input_cases():
    qweight, qzeros, scales, _, _ = _quantized_linear(64, 256, seed=0, bias=False)
    x = torch.randn(2, 256).to(torch.bfloat16)
    return {
        "fp32 activations": dict(x=x.float()),
        "K mismatch": dict(x=x[:, :128]),
        "K not a multiple of group": dict(x=torch.randn(2, 200).bfloat16(),
                                          qweight=torch.zeros(200, 8, dtype=torch.int32)),
        "N not a multiple of 8 (scales)": dict(scales=torch.ones(2, 60, dtype=torch.half)),
        "qweight not int32": dict(qweight=qweight.long()),
        "qzeros wrong shape": dict(qzeros=qzeros[:1]),
        "bias wrong shape": dict(bias=torch.zeros(63, dtype=torch.half)),
        "group size not power of two": dict(group_size=96),
    }, (x, qweight, qzeros, scales)


@pytest.mark.parametrize("case", list(_bad_input_cases()[0]))
def test_w4a16_rejects_bad_inputs(request, case):
    if _delegated(request):
        return
    cases, (x, qweight, qzeros, scales) = _bad_input_cases()
    args = dict(x=x, qweight=qweight, qzeros=qzeros, scales=scales, bias=None, group_size=G)
    args.update(cases[case])
    with pytest.raises(ValueError):
        w4a16_gemm(**args)


def test_w4a16_rejects_bad_configs(request):
    if _delegated(request):
        return
    qweight, qzeros, scales, _, _ = _quantized_linear(64, 256, seed=0, bias=False)
    x = torch.randn(2, 256).to(torch.bfloat16)
    for fn, cfg in [(w4a16_gemm_tiled, W4A16Config(8, 64, 64)),      # tl.dot needs 16 rows
                    (w4a16_gemv_splitk, W4A16Config(1, 64, 256)),    # block_k > group size
                    (w4a16_gemv_splitk, W4A16Config(1, 48, 32)),     # not a power of two
                    (w4a16_gemv_splitk, W4A16Config(1, 64, 32, split_k=0))]:
        with pytest.raises(ValueError):
            fn(x, qweight, qzeros, scales, group_size=G, config=cfg)


# --- W4A16 K-major decode kernel -------------------------------------------------------------


def _kmajor_linear(n: int, k: int, g: int, seed: int, bias: bool):
    """(KMajorW4, bias fp16|None, W_IO fp32, the 4-bit values [K, N] before packing)."""
    qweight, qzeros, scales, b, w_IO = _quantized_linear(n, k, seed, bias, g)
    return repack_kmajor(qweight, qzeros, scales, g), b, w_IO, unpack_awq_gemm(qweight, qzeros)[0]


def _check_kmajor(y, x, w_IO, bias):
    exact = x.float() @ w_IO + (bias.float() if bias is not None else 0.0)
    atol = 1e-5 * (x.float().abs() @ w_IO.abs()).max().item()
    _assert_close_ulps(y, exact, x.dtype, ulps=1.0, atol=atol)


@pytest.mark.parametrize("g", [32, 64, 128, 256])
def test_kmajor_repack_round_trip(request, g):
    if _delegated(request):
        return
    w, _, _, q_IO = _kmajor_linear(40, 512, g, seed=g, bias=False)
    assert w.qweight.shape == (40, 64) and w.qweight.dtype == torch.int32
    assert w.scales.shape == (40, 512 // g) and w.zeros.dtype == torch.uint8
    assert torch.equal(unpack_kmajor(w), q_IO)


def test_kmajor_hand_worked(request):
    if _delegated(request):
        return
    # One block of 128 K rows, N = 16: row n has q = n % 16 everywhere, zero 8, scale 0.5, so with
    # x = 1 (row 0) and x = 2 (row 1): y = 128 * (n - 8) * 0.5 * x = 64 (n - 8) x, exact in bf16.
    n, k = 16, 128
    q = (torch.arange(n) % 16)[:, None].expand(n, k)
    qweight, qzeros = pack_awq_gemm(q, torch.full((1, n), 8))
    w = repack_kmajor(qweight, qzeros, torch.full((1, n), 0.5, dtype=torch.float16), 128)
    x = torch.ones(2, k, dtype=torch.bfloat16)
    x[1] = 2.0
    y = w4a16_kmajor_gemm(x, w)
    base = 64.0 * (torch.arange(n) - 8)
    torch.testing.assert_close(y.float(), torch.stack([base, 2 * base]), rtol=0, atol=0)
    torch.testing.assert_close(w4a16_kmajor_ref(x, w).float(), torch.stack([base, 2 * base]), rtol=0, atol=0)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,k,g", [(1, 72, 256, 128), (3, 200, 384, 128), (17, 48, 256, 64),
                                     (1, 40, 512, 256), (5, 24, 128, 32), (33, 200, 384, 128)])
def test_kmajor_matches_exact_product(request, m, n, k, g, dtype, bias):
    if _delegated(request):
        return
    w, b, w_IO, _ = _kmajor_linear(n, k, g, seed=m * 7 + n, bias=bias)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    y = w4a16_kmajor_gemm(x, w, b)
    assert y.shape == (m, n)
    _check_kmajor(y, x, w_IO, b)
    twin = w4a16_kmajor_ref(x, w, b)
    torch.testing.assert_close(y.float(), twin.float(), rtol=2 * ULP[dtype], atol=1e-3)


@pytest.mark.parametrize("cfg", [W4A16Config(16, 32, 16, split_k=3),    # uneven slices (2 + 1)
                                 W4A16Config(16, 64, 16, split_k=1),    # direct write, ragged N tile
                                 W4A16Config(32, 16, 16, split_k=8)])   # split capped at 3 units
def test_kmajor_explicit_configs_and_counters(request, cfg):
    if _delegated(request):
        return
    from mpo.infer.kernels import w4a16 as w4a16_module

    w, b, w_IO, _ = _kmajor_linear(200, 384, 128, seed=5, bias=True)
    x = torch.randn(3, 384, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    first = w4a16_kmajor_gemm(x, w, b, config=cfg)
    _check_kmajor(first, x, w_IO, b)
    if cfg.split_k > 1:
        assert int(w4a16_module._TILE_LOCKS[x.device].abs().sum()) == 0  # counters reset themselves
    assert torch.equal(first, w4a16_kmajor_gemm(x, w, b, config=cfg))  # slice order: deterministic


def test_kmajor_leading_dims_strided_and_empty(request):
    if _delegated(request):
        return
    w, _, w_IO, _ = _kmajor_linear(64, 256, 128, seed=3, bias=False)
    base = torch.randn(2, 3, 512, generator=torch.Generator().manual_seed(5)).half()
    x = base[..., ::2]  # non-contiguous view [2, 3, K]
    y = w4a16_kmajor_gemm(x, w)
    assert y.shape == (2, 3, 64)
    _check_kmajor(y.reshape(6, 64), x.reshape(6, 256), w_IO, None)
    assert w4a16_kmajor_gemm(torch.empty(0, 256, dtype=torch.half), w).shape == (0, 64)


def test_kmajor_rejects_bad_inputs(request):
    if _delegated(request):
        return
    qweight, qzeros, scales, _, _ = _quantized_linear(64, 256, seed=0, bias=False)
    with pytest.raises(ValueError, match="group_size"):
        repack_kmajor(qweight, qzeros, scales, 16)
    q200, z200 = pack_awq_gemm(torch.zeros(8, 192, dtype=torch.int64), torch.zeros(3, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="multiple of 128"):
        repack_kmajor(q200, z200, torch.ones(3, 8, dtype=torch.half), 64)
    with pytest.raises(ValueError, match="scales"):
        repack_kmajor(qweight, qzeros, scales[:, :8], 128)
    w = repack_kmajor(qweight, qzeros, scales, 128)
    x = torch.randn(2, 256).to(torch.bfloat16)
    for bad in (dict(x=x.float()), dict(x=x[:, :128]), dict(bias=torch.zeros(63)), dict(w=(qweight, qzeros)),
                dict(config=W4A16Config(8, 32, 16)), dict(config=W4A16Config(16, 48, 16)),
                dict(config=W4A16Config(16, 32, 16, split_k=0))):
        args = dict(x=x, w=w, bias=None, config=None)
        args.update(bad)
        with pytest.raises(ValueError):
            w4a16_kmajor_gemm(**args)


# --- RMSNorm ----------------------------------------------------------------------------------

def test_rms_norm_hand_worked(request):
    if _delegated(request):
        return
    # h = [1, 1] + [2, 3] = [3, 4]; rms = sqrt((9 + 16) / 2) = sqrt(12.5); y = h / rms * [1, 2].
    x = torch.tensor([[1.0, 1.0]], dtype=torch.float16)
    residual = torch.tensor([[2.0, 3.0]], dtype=torch.float16)
    weight = torch.tensor([1.0, 2.0])
    y, h = rms_norm(x, weight, 0.0, residual)
    torch.testing.assert_close(h, torch.tensor([[3.0, 4.0]], dtype=torch.float16))
    rms = 12.5**0.5
    torch.testing.assert_close(y.float(), torch.tensor([[3 / rms, 8 / rms]]), rtol=1e-3, atol=0)


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rms_norm_matches_twin(request, dtype, with_residual):
    if _delegated(request):
        return
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(3, 5, 200, generator=gen) * 3).to(dtype)
    residual = (torch.randn(3, 5, 200, generator=gen) * 3).to(dtype) if with_residual else None
    weight = (1 + 0.1 * torch.randn(200, generator=gen)).to(dtype)
    y, h = rms_norm(x, weight, 1e-6, residual)
    y_ref, h_ref = rms_norm_ref(x, weight, 1e-6, residual)
    assert y.shape == x.shape and y.dtype == dtype and h.dtype == dtype
    if with_residual:
        # One rounding of an exact fp32 sum; the interpreter truncates bf16, so allow one ulp.
        torch.testing.assert_close(h.float(), h_ref.float(), rtol=ULP[dtype], atol=0)
        # Judge the norm on the kernel's own h so an ulp in h does not compound below.
        y_ref, _ = rms_norm_ref(h, weight, 1e-6)
    else:
        assert h is x
    # Two roundings (normalized row, then times weight): two ulps.
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2 * ULP[dtype], atol=1e-6)
    # Independent formula: torch's own RMSNorm in fp32.
    expected = F.rms_norm(h.float(), (200,), weight.float(), eps=1e-6)
    torch.testing.assert_close(y.float(), expected, rtol=3 * ULP[dtype], atol=1e-6)


def test_rms_norm_rejects_bad_inputs(request):
    if _delegated(request):
        return
    x = torch.randn(4, 32).half()
    w = torch.ones(32)
    bad = [
        dict(x=x.float(), weight=w, eps=1e-6),
        dict(x=x, weight=torch.ones(31), eps=1e-6),
        dict(x=x, weight=w, eps=-1.0),
        dict(x=x, weight=w, eps=1e-6, residual=torch.randn(4, 31).half()),
        dict(x=x, weight=w, eps=1e-6, residual=x.bfloat16()),
    ]
    for kwargs in bad:
        with pytest.raises(ValueError):
            rms_norm(**kwargs)


# --- SiLU * mul -------------------------------------------------------------------------------

def test_silu_mul_hand_worked(request):
    if _delegated(request):
        return
    # gate [0, 1, -100, 10], up [5, 2, 3, 0.5]: silu(0)=0, silu(1)=1/(1+e^-1)=0.7310586,
    # silu(-100) ~ -3.7e-42 (zero in fp16), silu(10) = 10/(1+e^-10) = 9.9995460.
    gate_up = torch.tensor([[0.0, 1.0, -100.0, 10.0, 5.0, 2.0, 3.0, 0.5]], dtype=torch.float16)
    y = silu_mul(gate_up)
    expected = torch.tensor([[0.0, 2 * 0.7310586, 0.0, 0.5 * 9.9995460]])
    torch.testing.assert_close(y.float(), expected, rtol=1e-3, atol=0)


@pytest.mark.parametrize("two_tensors", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_silu_mul_matches_twin(request, dtype, two_tensors):
    if _delegated(request):
        return
    gen = torch.Generator().manual_seed(4)
    gate_up = (torch.randn(2, 7, 2 * 300, generator=gen) * 4).to(dtype)
    if two_tensors:
        y = silu_mul(gate_up[..., :300], gate_up[..., 300:])
    else:
        y = silu_mul(gate_up)
    assert y.shape == (2, 7, 300) and y.dtype == dtype
    y_ref = silu_mul_ref(gate_up)
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=ULP[dtype], atol=1e-6)
    gate, up = gate_up.float().chunk(2, dim=-1)
    expected = gate * torch.sigmoid(gate) * up  # independent formula
    torch.testing.assert_close(y.float(), expected, rtol=ULP[dtype], atol=1e-6)


def test_silu_mul_rejects_bad_inputs(request):
    if _delegated(request):
        return
    gate_up = torch.randn(3, 8).half()
    for args in [(gate_up[:, :7],), (gate_up.float(),), (gate_up[:, :4], gate_up[:, :3]),
                 (gate_up[:, :4], gate_up[:, 4:].bfloat16())]:
        with pytest.raises(ValueError):
            silu_mul(*args)
