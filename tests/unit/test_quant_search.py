"""AWQ scale/clip search and folding (REFERENCE §5) on single linears and a tiny Qwen2 layer."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from transformers import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

from mpo.quant.quantizer import pseudo_quantize
from mpo.quant.search import (
    apply_clip,
    apply_scale,
    candidate_scales,
    quantize_decoder_layer,
    search_clip,
    search_scale,
    weight_channel_mean,
)

OUTLIER_CHANNELS = [3, 77, 150, 201]
BATCH, SEQ, HIDDEN = 2, 64, 256


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _linear(in_features: int, out_features: int, weight: torch.Tensor, bias: bool = False):
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias:
            linear.bias.zero_()
    return linear


# ---------------------------------------------------------------- statistics


def test_weight_channel_mean_hand_worked():
    # Group size 2. Row 0: |[1, -2]| / 2 = [0.5, 1], |[3, -4]| / 4 = [0.75, 1]. Row 1: all 1.
    # Mean over the two rows: [0.75, 1, 0.875, 1].
    a = _linear(4, 1, torch.tensor([[1.0, -2.0, 3.0, -4.0]]))
    b = _linear(4, 1, torch.tensor([[2.0, 2.0, 2.0, 2.0]]))
    got = weight_channel_mean([a, b], group_size=2)
    torch.testing.assert_close(got, torch.tensor([0.75, 1.0, 0.875, 1.0]), atol=1e-5, rtol=0)


def test_candidate_scales_hand_worked():
    # x̄ = [1, 4], w̄ = [1, 1], α = 0.5: raw = [1, 2] / 1.0001, and dividing by sqrt(max·min)
    # gives [1/√2, √2] whatever the common factor.
    got = candidate_scales(torch.tensor([1.0, 4.0]), torch.tensor([1.0, 1.0]), 0.5)
    torch.testing.assert_close(got, torch.tensor([1 / math.sqrt(2), math.sqrt(2)]))
    # α = 0 ignores activations: s ∝ 1 / (w̄ + 1e-4), normalised so max·min = 1.
    w_mean = torch.tensor([0.25, 0.5, 1.0])
    got = candidate_scales(torch.tensor([9.0, 1.0, 3.0]), w_mean, 0.0)
    raw = 1.0 / (w_mean + 1e-4)
    torch.testing.assert_close(got, raw / (raw.max() * raw.min()).sqrt())
    # A dead channel is floored at 1e-4 before normalisation rather than becoming 0.
    got = candidate_scales(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0]), 1.0)
    assert (got > 0).all()
    assert got[1] / got[0] == pytest.approx(1.0 / 1e-4, rel=1e-3)


# ---------------------------------------------------------------- scale search


def _outlier_inputs(num_tokens: int, in_features: int, channels: list[int], seed: int):
    x = torch.randn(num_tokens, in_features, generator=_gen(seed))
    x[:, channels] *= 50
    return x


def test_search_scale_single_linear():
    in_features, out_features = 128, 32
    weight = torch.randn(out_features, in_features, generator=_gen(0)) * 0.02
    linear = _linear(in_features, out_features, weight)
    original = linear.weight.detach().clone()
    x = _outlier_inputs(96, in_features, [5, 60], seed=1)
    scales, report = search_scale(x, [linear], linear, group_size=64, n_grid=20)

    assert torch.equal(linear.weight, original), "weights must be restored after the search"
    assert scales.shape == (in_features,) and scales.dtype == torch.float32
    assert len(report["mse_by_alpha"]) == 20
    assert report["alpha"] is not None and report["alpha"] > 0
    assert report["mse_after"] == pytest.approx(min(report["mse_by_alpha"]))
    assert report["mse_after"] < 0.7 * report["mse_before"]
    # Outlier channels get the largest scales.
    assert set(scales.topk(2).indices.tolist()) == {5, 60}

    # Independent recomputation of both MSEs from the formulas.
    with torch.no_grad():
        y_fp = x @ original.t()
        y_rtn = x @ pseudo_quantize(original, 64).t()
        w_awq = pseudo_quantize(original * scales, 64) / scales
        y_awq = x @ w_awq.t()
    assert report["mse_before"] == pytest.approx(float((y_rtn - y_fp).pow(2).mean()), rel=1e-4)
    assert report["mse_after"] == pytest.approx(float((y_awq - y_fp).pow(2).mean()), rel=1e-4)
    assert report["mse_fp"] == pytest.approx(float(y_fp.pow(2).mean()), rel=1e-5)
    expected = candidate_scales(x.abs().mean(0), weight_channel_mean([linear], 64), report["alpha"])
    torch.testing.assert_close(scales, expected)


def test_search_scale_keeps_rtn_when_nothing_beats_it():
    # Uniform inputs and a weight already on the 4-bit grid: RTN is exact, no α can improve.
    in_features = 64
    grid = torch.randint(0, 16, (8, in_features), generator=_gen(2)).float() - 7.0
    linear = _linear(in_features, 8, grid * 0.01)
    x = torch.randn(32, in_features, generator=_gen(3))
    scales, report = search_scale(x, [linear], linear, group_size=64, n_grid=5)
    assert report["alpha"] is None
    assert report["mse_before"] == pytest.approx(0.0, abs=1e-12)
    assert torch.equal(scales, torch.ones(in_features))


def test_search_scale_bad_inputs():
    linear = nn.Linear(64, 8)
    x = torch.randn(16, 64)
    with pytest.raises(ValueError, match="in_features"):
        search_scale(torch.randn(16, 32), [linear], linear, group_size=32)
    with pytest.raises(ValueError, match="group_size"):
        search_scale(x, [linear], linear, group_size=48)
    with pytest.raises(ValueError, match="non-empty"):
        search_scale(x, [], linear, group_size=32)
    with pytest.raises(ValueError, match="n_grid"):
        search_scale(x, [linear], linear, group_size=32, n_grid=0)
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="inf/NaN"):
        search_scale(bad, [linear], linear, group_size=32)


# ---------------------------------------------------------------- clip search


def _outlier_linear(seed: int) -> nn.Linear:
    # Each row (one group of 32): an exact 0, weights uniform in [0, 0.3], and an outlier of 1.0 on
    # input channel 0. With min = 0 the zero point is 0 and scale = max / 15, so both the 0 and
    # the group max sit exactly on the grid: only the in-between weights carry rounding error.
    w = torch.rand(8, 32, generator=_gen(seed)) * 0.3
    w[:, 0] = 1.0
    w[:, 1] = 0.0
    return _linear(32, 8, w)


def test_search_clip_cuts_an_outlier_nobody_reads():
    # Channel 0 is never active, so clipping its weight to r costs nothing while the step r / 15
    # shrinks: the expected error falls like r², so every row clips, most of them hard.
    linear = _outlier_linear(seed=4)
    x = torch.randn(256, 32, generator=_gen(5))
    x[:, 0] = 0.0
    max_val = search_clip(x, linear, group_size=32, n_grid=20, max_shrink=0.5)
    assert max_val.shape == (8, 1)
    assert (max_val < 1.0).all() and (max_val >= 0.55 - 1e-6).all()
    assert float(max_val.mean()) <= 0.7


def test_search_clip_keeps_an_outlier_that_matters():
    # Channel 0 dominates the output (|x0| ~ 100): clipping the exactly representable outlier to r
    # adds an error (1 - r)·x0 >= 5 per token, far above the rounding error of the rest (~0.1).
    linear = _outlier_linear(seed=4)
    x = torch.randn(256, 32, generator=_gen(6))
    x[:, 0] *= 100
    max_val = search_clip(x, linear, group_size=32)
    torch.testing.assert_close(max_val, torch.ones(8, 1))


def test_search_clip_bounds_sampling_and_apply():
    linear = _linear(128, 16, torch.randn(16, 128, generator=_gen(7)))
    x = torch.randn(2, 300, 128, generator=_gen(8))
    max_val = search_clip(x, linear, group_size=32, n_sample_tokens=64)
    org_max = linear.weight.detach().reshape(16, 4, 32).abs().amax(-1)
    assert max_val.shape == (16, 4)
    ratio = max_val / org_max
    assert (ratio <= 1 + 1e-6).all() and (ratio >= 0.55 - 1e-6).all()
    assert torch.equal(max_val, search_clip(x, linear, group_size=32, n_sample_tokens=64))

    original = linear.weight.detach().clone()
    apply_clip(linear, max_val)
    bound = max_val.repeat_interleave(32, dim=1)
    torch.testing.assert_close(linear.weight.detach(), original.clamp(-bound, bound))


def test_search_clip_bad_inputs():
    linear = nn.Linear(64, 8)
    x = torch.randn(16, 64)
    with pytest.raises(ValueError, match="max_shrink"):
        search_clip(x, linear, group_size=32, max_shrink=1.0)
    with pytest.raises(ValueError, match="n_sample_tokens"):
        search_clip(x, linear, group_size=32, n_sample_tokens=0)
    with pytest.raises(ValueError, match="group_size"):
        search_clip(x, linear, group_size=24)
    with pytest.raises(ValueError, match="max_val_OG"):
        apply_clip(linear, torch.ones(4, 2))
    with pytest.raises(ValueError, match="groups"):
        apply_clip(linear, torch.ones(8, 3))


# ---------------------------------------------------------------- folding


def test_apply_scale_hand_worked_norm_and_linear():
    norm = nn.LayerNorm(4)
    with torch.no_grad():
        norm.bias.fill_(1.0)
    nxt = _linear(4, 2, torch.ones(2, 4))
    s = torch.tensor([1.0, 2.0, 4.0, 8.0])
    apply_scale(norm, [nxt], s)
    torch.testing.assert_close(norm.weight.detach(), torch.tensor([1.0, 0.5, 0.25, 0.125]))
    torch.testing.assert_close(norm.bias.detach(), torch.tensor([1.0, 0.5, 0.25, 0.125]))
    torch.testing.assert_close(nxt.weight.detach(), torch.tensor([[1.0, 2.0, 4.0, 8.0]] * 2))

    prev = _linear(3, 4, torch.ones(4, 3), bias=True)
    with torch.no_grad():
        prev.bias.fill_(2.0)
    nxt = _linear(4, 1, torch.ones(1, 4))
    apply_scale(prev, [nxt], s)
    torch.testing.assert_close(prev.weight.detach(), (1.0 / s)[:, None].expand(4, 3))
    torch.testing.assert_close(prev.bias.detach(), 2.0 / s)


def test_apply_scale_preserves_function():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.LayerNorm(64), nn.Linear(64, 32), nn.SiLU(), nn.Linear(32, 48), nn.Linear(48, 8)
    )
    x = torch.randn(10, 64)
    with torch.no_grad():
        y_ref = model(x)
        apply_scale(model[0], [model[1]], torch.rand(64, generator=_gen(9)) * 3 + 0.1)
        # Linear -> Linear across no nonlinearity.
        apply_scale(model[3], [model[4]], torch.rand(48, generator=_gen(10)) * 3 + 0.1)
        torch.testing.assert_close(model(x), y_ref, atol=1e-5, rtol=1e-4)


def test_apply_scale_bad_inputs():
    norm, linear = nn.LayerNorm(8), nn.Linear(8, 4)
    with pytest.raises(ValueError, match="positive"):
        apply_scale(norm, [linear], torch.tensor([1.0] * 7 + [0.0]))
    with pytest.raises(ValueError, match="1-D"):
        apply_scale(norm, [linear], torch.ones(2, 4))
    with pytest.raises(ValueError, match="in_features"):
        apply_scale(norm, [nn.Linear(6, 4)], torch.ones(8))
    with pytest.raises(ValueError, match="prev_op"):
        apply_scale(nn.ReLU(), [linear], torch.ones(8))
    with pytest.raises(ValueError, match="out_features"):
        apply_scale(nn.Linear(4, 6), [linear], torch.ones(8))


# ---------------------------------------------------------------- decoder layer


def _qwen2_layer(num_kv_heads: int, seed: int = 0, dtype: torch.dtype = torch.float32):
    config = Qwen2Config(
        hidden_size=HIDDEN,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=num_kv_heads,
        num_hidden_layers=1,
        vocab_size=32,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    layer = Qwen2DecoderLayer(config, layer_idx=0).eval()
    with torch.no_grad():
        for module in layer.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, 0.02)
                if module.bias is not None:
                    module.bias.normal_(0.0, 0.02)
    layer = layer.to(dtype)
    rope = Qwen2RotaryEmbedding(config)
    positions = torch.arange(SEQ)[None].expand(BATCH, SEQ)
    position_embeddings = rope(torch.zeros(1, dtype=dtype), positions)
    return layer, position_embeddings


def _hidden(seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    x = torch.randn(BATCH, SEQ, HIDDEN, generator=_gen(seed))
    x[..., OUTLIER_CHANNELS] *= 50  # activation outliers, as in real LLM residual streams
    return x.to(dtype)


def _run(layer: nn.Module, x: torch.Tensor, pe) -> torch.Tensor:
    with torch.no_grad():
        return layer(x, position_embeddings=pe).float()


def _pseudo_quantized(layer: nn.Module, group_size: int = 128) -> nn.Module:
    layer = copy.deepcopy(layer)
    with torch.no_grad():
        for module in layer.modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(pseudo_quantize(module.weight, group_size))
    return layer


def test_awq_beats_rtn_on_qwen2_layer():
    layer, pe = _qwen2_layer(num_kv_heads=2)
    x_cal, x_eval = _hidden(1), _hidden(2)  # evaluate on held-out tokens
    y_fp = _run(layer, x_eval, pe)
    mse_rtn = float((_run(_pseudo_quantized(layer), x_eval, pe) - y_fp).pow(2).mean())

    awq = copy.deepcopy(layer)
    report = quantize_decoder_layer(awq, x_cal, lambda x: awq(x, position_embeddings=pe))
    mse_awq = float((_run(_pseudo_quantized(awq), x_eval, pe) - y_fp).pow(2).mean())
    ratio = mse_awq / mse_rtn
    print(f"\nQwen2 layer output MSE: RTN {mse_rtn:.3e}, AWQ {mse_awq:.3e}, AWQ/RTN = {ratio:.3f}")
    assert ratio < 0.7

    assert set(report["scale"]) == {
        "input_layernorm->q,k,v",
        "post_attention_layernorm->gate,up",
        "up_proj->down_proj",
    }
    assert len(report["skipped"]) == 1 and "grouped-query" in report["skipped"][0]
    for group in report["scale"].values():
        assert group["mse_after"] <= group["mse_before"]
    assert set(report["clip"]) == {"v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    for stats in report["clip"].values():
        assert 0.55 - 1e-6 <= stats["mean_ratio"] <= 1.0


def test_folding_without_quantization_keeps_layer_output():
    # num_kv_heads == num_heads, so the v_proj -> o_proj fold runs too.
    layer, pe = _qwen2_layer(num_kv_heads=4, seed=1)
    x = _hidden(3)
    y_ref = _run(layer, x, pe)

    folded = copy.deepcopy(layer)
    report = quantize_decoder_layer(
        folded, x, lambda h: folded(h, position_embeddings=pe), clip=False
    )
    assert "v_proj->o_proj" in report["scale"] and report["skipped"] == [] and report["clip"] == {}
    scale_changed = any(
        not torch.equal(a, b)
        for a, b in zip(folded.state_dict().values(), layer.state_dict().values())
    )
    assert scale_changed
    torch.testing.assert_close(_run(folded, x, pe), y_ref, atol=1e-4, rtol=1e-4)

    # Arbitrary positive scales on every group, folded by hand, also leave the output unchanged.
    g = _gen(11)
    attn, mlp = layer.self_attn, layer.mlp
    def rand_scales(n: int) -> torch.Tensor:
        return torch.rand(n, generator=g) + 0.5

    apply_scale(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj], rand_scales(HIDDEN))
    apply_scale(attn.v_proj, [attn.o_proj], rand_scales(HIDDEN))
    apply_scale(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj], rand_scales(HIDDEN))
    apply_scale(mlp.up_proj, [mlp.down_proj], rand_scales(512))
    torch.testing.assert_close(_run(layer, x, pe), y_ref, atol=1e-4, rtol=1e-4)


def test_quantize_decoder_layer_deterministic():
    layer, pe = _qwen2_layer(num_kv_heads=2, seed=2)
    x = _hidden(4)
    a, b = copy.deepcopy(layer), copy.deepcopy(layer)
    report_a = quantize_decoder_layer(a, x, lambda h: a(h, position_embeddings=pe), group_size=64)
    report_b = quantize_decoder_layer(b, x, lambda h: b(h, position_embeddings=pe), group_size=64)
    assert report_a == report_b
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(ta, tb), name


def test_quantize_decoder_layer_bf16_keeps_dtype():
    layer, pe = _qwen2_layer(num_kv_heads=2, seed=3, dtype=torch.bfloat16)
    x = _hidden(5, torch.bfloat16)
    report = quantize_decoder_layer(layer, x, lambda h: layer(h, position_embeddings=pe))
    assert all(p.dtype == torch.bfloat16 for p in layer.parameters())
    assert all(math.isfinite(g["mse_after"]) for g in report["scale"].values())
    assert torch.isfinite(_run(layer, x, pe)).all()


def test_quantize_decoder_layer_bad_inputs():
    layer, pe = _qwen2_layer(num_kv_heads=2, seed=4)
    x = _hidden(6)

    def twice(h):
        layer(h, position_embeddings=pe)
        return layer(h, position_embeddings=pe)

    with pytest.raises(ValueError, match="more than once"):
        quantize_decoder_layer(layer, x, twice)
    with pytest.raises(ValueError, match="no submodule"):
        quantize_decoder_layer(nn.Linear(4, 4), x, lambda h: h)
    with pytest.raises(ValueError, match="did not run"):
        quantize_decoder_layer(layer, x, lambda h: h)
