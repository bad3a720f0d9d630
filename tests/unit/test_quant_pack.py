"""Quantizer math and the AutoAWQ GEMM packing layout (REFERENCE §5)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mpo.quant.pack import (
    AWQ_PACK_ORDER,
    AWQ_UNPACK_ORDER,
    AWQLinearWeights,
    dequantize_awq_gemm,
    pack_awq_gemm,
    unpack_awq_gemm,
)
from mpo.quant.quantizer import (
    dequantize_weight,
    pseudo_quantize,
    quantize_weight,
    quantize_with_params,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- quantizer


def test_quantize_hand_worked_group():
    # One group of 4: min -1, max 2 -> scale 3/15 = 0.2, zero = round(1/0.2) = 5,
    # q = round(w / 0.2) + 5 = [0, 5, 8, 15].
    w = torch.tensor([[-1.0, 0.0, 0.6, 2.0]])
    q, scales, zeros = quantize_weight(w, group_size=4)
    assert q.dtype == torch.int32 and zeros.dtype == torch.int32 and scales.dtype == torch.float32
    assert q.tolist() == [[0, 5, 8, 15]]
    assert scales.shape == (1, 1) and scales.item() == pytest.approx(0.2)
    assert zeros.tolist() == [[5]]
    assert dequantize_weight(q, scales, zeros, group_size=4)[0].tolist() == pytest.approx(
        [-1.0, 0.0, 0.6, 2.0], abs=1e-6
    )


def test_quantize_constant_group_uses_min_scale():
    w = torch.zeros(1, 4)
    q, scales, zeros = quantize_weight(w, group_size=4)
    assert scales.item() == pytest.approx(1e-5)
    assert zeros.item() == 0 and q.eq(0).all()


def test_quantize_layout_is_group_major():
    # Row o, group g gets the range [0, 15 * (o + 1) * (g + 1)], so the scale is (o + 1)(g + 1).
    out_features, num_groups, group_size = 3, 2, 4
    w = torch.zeros(out_features, num_groups * group_size)
    for o in range(out_features):
        for g in range(num_groups):
            w[o, g * group_size] = 15.0 * (o + 1) * (g + 1)
    _, scales, zeros = quantize_weight(w, group_size=group_size)
    assert scales.shape == (num_groups, out_features)
    expected = torch.tensor(
        [[(o + 1) * (g + 1) for o in range(out_features)] for g in range(num_groups)]
    )
    torch.testing.assert_close(scales, expected.float())
    assert zeros.eq(0).all()


@pytest.mark.parametrize("shape,group_size", [((16, 128), 128), ((24, 256), 64), ((8, 96), 32)])
def test_dequantized_within_half_step(shape, group_size):
    w = torch.randn(*shape, generator=_gen(1))
    q, scales, zeros = quantize_weight(w, group_size=group_size)
    assert int(q.min()) >= 0 and int(q.max()) <= 15
    w_hat = dequantize_weight(q, scales, zeros, group_size=group_size)
    # Normal weights straddle 0 in every group, so zero is exact and the error is rounding only.
    half_step_OI = (scales.t() / 2).repeat_interleave(group_size, dim=1)
    assert ((w_hat - w).abs() <= half_step_OI * (1 + 1e-5) + 1e-7).all()


def test_quantize_matches_independent_formula():
    w = torch.randn(8, 64, generator=_gen(2)) * 0.05
    q, scales, zeros = quantize_weight(w, group_size=32)
    for o in range(8):
        for g in range(2):
            block = w[o, g * 32 : (g + 1) * 32].double()
            scale = max(float(block.max() - block.min()) / 15, 1e-5)
            zero = min(max(round(-float(block.min()) / scale), 0), 15)
            expect = [min(max(round(float(v) / scale) + zero, 0), 15) for v in block]
            assert scales[g, o].item() == pytest.approx(scale, rel=1e-6)
            assert zeros[g, o].item() == zero
            assert q[o, g * 32 : (g + 1) * 32].tolist() == expect


def test_quantize_deterministic_and_pseudo_quantize_dtype():
    w = torch.randn(16, 128, generator=_gen(3)).to(torch.bfloat16)
    a = quantize_weight(w, group_size=64)
    b = quantize_weight(w, group_size=64)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    wq = pseudo_quantize(w, group_size=64)
    assert wq.dtype == torch.bfloat16 and wq.shape == w.shape
    # Quantizing an fp32 pseudo-quantized weight again lands on the same grid (same min/max).
    wq32 = pseudo_quantize(w.float(), group_size=64)
    torch.testing.assert_close(pseudo_quantize(wq32, group_size=64), wq32, atol=1e-5, rtol=0)


def test_quantize_with_params_reproduces_quantize_weight():
    w = torch.randn(8, 64, generator=_gen(4))
    q, scales, zeros = quantize_weight(w, group_size=32)
    assert torch.equal(quantize_with_params(w, scales, zeros, group_size=32), q)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(weight_OI=torch.randn(4, 100), group_size=128), "divisible"),
        (dict(weight_OI=torch.randn(4, 128), group_size=0), "group_size"),
        (dict(weight_OI=torch.randn(128), group_size=128), "2-D"),
        (dict(weight_OI=torch.ones(4, 128, dtype=torch.int32), group_size=128), "floating"),
        (dict(weight_OI=torch.randn(4, 128), group_size=128, bits=9), "bits"),
    ],
)
def test_quantize_bad_inputs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantize_weight(**kwargs)


def test_dequantize_bad_shapes():
    q = torch.zeros(8, 64, dtype=torch.int32)
    with pytest.raises(ValueError, match="scales_GO"):
        dequantize_weight(q, torch.ones(8, 2), torch.zeros(2, 8, dtype=torch.int32), group_size=32)
    with pytest.raises(ValueError, match="group_size"):
        dequantize_weight(q, torch.ones(2, 8), torch.zeros(2, 8, dtype=torch.int32), group_size=48)


# ---------------------------------------------------------------- packing


def test_orders_are_inverse_permutations():
    assert sorted(AWQ_PACK_ORDER) == list(range(8))
    assert [AWQ_PACK_ORDER[AWQ_UNPACK_ORDER[j]] for j in range(8)] == list(range(8))


def test_pack_hand_written_layout():
    # q_IO[0, j] = j: packed column 0 holds columns 0..7, nibble i <- column PACK_ORDER[i] =
    # (0, 2, 4, 6, 1, 3, 5, 7), i.e. hex digits (low to high) 0 2 4 6 1 3 5 7 -> 0x75316420.
    # Column 1 holds 8..15: nibbles 8 A C E 9 B D F -> 0xFDB9ECA8, whose top bit makes it negative:
    # 0xFDB9ECA8 - 2**32 = -38146904.
    out_features, in_features = 16, 4
    q_OI = torch.zeros(out_features, in_features, dtype=torch.int32)
    q_OI[:, 0] = torch.arange(out_features) % 16
    zeros_GO = (torch.arange(out_features, dtype=torch.int32) % 16)[None, :]
    qweight, qzeros = pack_awq_gemm(q_OI, zeros_GO)
    assert qweight.dtype == torch.int32 and qweight.shape == (in_features, 2)
    assert qweight[0].tolist() == [0x75316420, -38146904]
    assert qweight[0, 1].item() == 0xFDB9ECA8 - (1 << 32)
    assert qweight[1:].eq(0).all()
    assert qzeros.shape == (1, 2) and qzeros[0].tolist() == [0x75316420, -38146904]


def test_pack_single_nibbles():
    # A lone 15 in column j lands in nibble i = UNPACK_ORDER[j % 8] of packed column j // 8.
    for j in range(16):
        q_OI = torch.zeros(16, 1, dtype=torch.int32)
        q_OI[j, 0] = 15
        qweight, _ = pack_awq_gemm(q_OI, torch.zeros(1, 16, dtype=torch.int32))
        word = 15 << (4 * AWQ_UNPACK_ORDER[j % 8])
        if word >= 1 << 31:
            word -= 1 << 32
        expected = [0, 0]
        expected[j // 8] = word
        assert qweight[0].tolist() == expected, j


@pytest.mark.parametrize(
    "out_features,in_features,group_size", [(8, 32, 32), (64, 256, 128), (24, 96, 32)]
)
def test_pack_unpack_round_trip(out_features, in_features, group_size):
    g = _gen(out_features + in_features)
    q_OI = torch.randint(0, 16, (out_features, in_features), generator=g, dtype=torch.int32)
    q_OI[:, 0] = 15  # top nibble values set everywhere in row 0 of q_IO: sign bit in use
    num_groups = in_features // group_size
    zeros_GO = torch.randint(0, 16, (num_groups, out_features), generator=g, dtype=torch.int32)
    qweight, qzeros = pack_awq_gemm(q_OI, zeros_GO)
    assert (qweight < 0).any()
    assert qweight.shape == (in_features, out_features // 8)
    assert qzeros.shape == (in_features // group_size, out_features // 8)
    q_IO, zeros_back = unpack_awq_gemm(qweight, qzeros)
    assert q_IO.dtype == torch.int32 and torch.equal(q_IO, q_OI.t())
    assert torch.equal(zeros_back, zeros_GO)


def test_dequantize_awq_gemm_matches_linear():
    torch.manual_seed(0)
    linear = nn.Linear(256, 64)
    q, scales, zeros = quantize_weight(linear.weight, group_size=128)
    qweight, qzeros = pack_awq_gemm(q, zeros)
    w_IO = dequantize_awq_gemm(qweight, qzeros, scales, group_size=128)
    assert w_IO.shape == (256, 64) and w_IO.dtype == torch.float32
    torch.testing.assert_close(w_IO, dequantize_weight(q, scales, zeros, 128).t())
    half_step_IO = (scales / 2).repeat_interleave(128, dim=0)
    assert ((w_IO - linear.weight.detach().t()).abs() <= half_step_IO * (1 + 1e-5) + 1e-7).all()
    # y = x @ W_IO + b is the linear's output up to the rounding error: |dy| <= |x| @ (scale/2).
    x = torch.randn(5, 256)
    err = (x @ w_IO + linear.bias - linear(x)).abs()
    assert (err <= x.abs() @ half_step_IO * (1 + 1e-4) + 1e-5).all()


def test_awq_linear_weights_from_linear():
    torch.manual_seed(1)
    linear = nn.Linear(128, 32).to(torch.bfloat16)
    weights = AWQLinearWeights.from_linear(linear, group_size=64)
    assert weights.qweight.shape == (128, 4) and weights.qzeros.shape == (2, 4)
    assert weights.scales.dtype == torch.float16 and weights.scales.shape == (2, 32)
    assert weights.bias.dtype == torch.float16
    w_IO = weights.dequantize()
    half_step_IO = (weights.scales.float() / 2).repeat_interleave(64, dim=0)
    assert ((w_IO - linear.weight.float().t()).abs() <= half_step_IO * 1.01).all()
    sd = weights.state_dict("model.layers.0.mlp.up_proj.")
    names = ("qweight", "qzeros", "scales", "bias")
    assert set(sd) == {f"model.layers.0.mlp.up_proj.{k}" for k in names}
    no_bias = AWQLinearWeights.from_linear(nn.Linear(128, 32, bias=False), group_size=128)
    assert no_bias.bias is None and "bias" not in no_bias.state_dict()


def test_validate_names_bad_tensor():
    weights = AWQLinearWeights.from_linear(nn.Linear(128, 16), group_size=128)
    weights.validate()
    bad = AWQLinearWeights(**{**vars(weights), "scales": weights.scales.float()})
    with pytest.raises(ValueError, match="scales.*float16"):
        bad.validate()
    bad = AWQLinearWeights(**{**vars(weights), "qweight": weights.qweight[:64]})
    with pytest.raises(ValueError, match="qweight.*shape"):
        bad.validate()
    bad = AWQLinearWeights(**{**vars(weights), "qzeros": weights.qzeros.to(torch.int64)})
    with pytest.raises(ValueError, match="qzeros.*int32"):
        bad.validate()
    bad = AWQLinearWeights(**{**vars(weights), "bias": torch.zeros(8, dtype=torch.float16)})
    with pytest.raises(ValueError, match="bias"):
        bad.validate()
    with pytest.raises(ValueError, match="out_features"):
        AWQLinearWeights(**{**vars(weights), "out_features": 12}).validate()


def test_pack_bad_inputs():
    zeros = torch.zeros(1, 12, dtype=torch.int32)
    zeros8 = torch.zeros(1, 8, dtype=torch.int32)
    with pytest.raises(ValueError, match="divisible by 8"):
        pack_awq_gemm(torch.zeros(12, 32, dtype=torch.int32), zeros)
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_awq_gemm(torch.full((8, 32), 16, dtype=torch.int32), zeros8)
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_awq_gemm(torch.full((8, 32), -1, dtype=torch.int32), zeros8)
    with pytest.raises(ValueError, match="integer"):
        pack_awq_gemm(torch.zeros(8, 32), torch.zeros(1, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="divide"):
        pack_awq_gemm(torch.zeros(8, 32, dtype=torch.int32), torch.zeros(3, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="columns"):
        pack_awq_gemm(torch.zeros(8, 32, dtype=torch.int32), torch.zeros(1, 16, dtype=torch.int32))
    qweight, qzeros = pack_awq_gemm(torch.zeros(8, 96, dtype=torch.int32), zeros8)
    with pytest.raises(ValueError, match="group_size"):
        dequantize_awq_gemm(qweight, qzeros, torch.ones(1, 8), group_size=64)
    with pytest.raises(ValueError, match="scales"):
        dequantize_awq_gemm(qweight, qzeros, torch.ones(2, 8), group_size=96)
