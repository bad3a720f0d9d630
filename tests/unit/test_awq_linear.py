"""WQLinear (AutoAWQ GEMM layout at inference), checkpoint names and AWQ config checks."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from torch import nn

from mpo.quant.awq_linear import WQLinear, check_awq_config, checkpoint_key_map
from mpo.quant.pack import AWQLinearWeights, pack_awq_gemm


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_wqlinear(in_features: int, out_features: int, group_size: int, seed: int, bias: bool = True):
    """A WQLinear with random integers, zeros and scales, plus those raw tensors."""
    g = _gen(seed)
    groups = in_features // group_size
    q_OI = torch.randint(0, 16, (out_features, in_features), generator=g, dtype=torch.int32)
    zeros_GO = torch.randint(0, 16, (groups, out_features), generator=g, dtype=torch.int32)
    scales_GO = (torch.rand(groups, out_features, generator=g) * 0.05 + 0.01).to(torch.float16)
    bias_O = torch.randn(out_features, generator=g).to(torch.float16) if bias else None
    layer = WQLinear(in_features, out_features, bias=bias, group_size=group_size)
    qweight, qzeros = pack_awq_gemm(q_OI, zeros_GO)
    layer.qweight.copy_(qweight)
    layer.qzeros.copy_(qzeros)
    layer.scales.copy_(scales_GO)
    if bias:
        layer.bias.copy_(bias_O)
    return layer, q_OI, zeros_GO, scales_GO, bias_O


def test_wqlinear_matches_hand_dequantized_matmul():
    layer, q_OI, zeros_GO, scales_GO, bias_O = _random_wqlinear(64, 16, 32, seed=0)
    x = torch.randn(3, 5, 64, generator=_gen(1))
    # Independent formula, element by element: W[o, i] = (q[o, i] - zero[i // g, o]) * scale[i // g, o].
    w_OI = torch.empty(16, 64)
    for o in range(16):
        for i in range(64):
            w_OI[o, i] = (q_OI[o, i] - zeros_GO[i // 32, o]).float() * scales_GO[i // 32, o].float()
    expected = x @ w_OI.t() + bias_O.float()
    y = layer(x)
    assert y.shape == (3, 5, 16) and y.dtype == torch.float32
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def test_wqlinear_hand_worked_single_group():
    # One group of 32 inputs, 8 outputs: q = 3 everywhere, zero = 1, scale = 0.5 -> W = 1.0,
    # so y[o] = sum(x) + bias[o]; with x = 1..32, sum = 528.
    layer = WQLinear(32, 8, bias=True, group_size=32)
    qweight, qzeros = pack_awq_gemm(torch.full((8, 32), 3, dtype=torch.int32), torch.ones(1, 8, dtype=torch.int32))
    layer.qweight.copy_(qweight)
    layer.qzeros.copy_(qzeros)
    layer.scales.fill_(0.5)
    layer.bias.copy_(torch.arange(8, dtype=torch.float16))
    y = layer(torch.arange(1, 33, dtype=torch.float32)[None])
    assert y.tolist() == [[528.0 + o for o in range(8)]]


def test_wqlinear_from_linear_error_within_half_step():
    linear = nn.Linear(256, 24, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(24, 256, generator=_gen(2)) * 0.05)
        linear.bias.copy_(torch.randn(24, generator=_gen(3)) * 0.1)
    packed = AWQLinearWeights.from_linear(linear, group_size=128)
    layer = WQLinear.from_awq_weights(packed)
    x = torch.randn(7, 256, generator=_gen(4))
    y_fp = x @ linear.weight.detach().t() + linear.bias.detach()
    # Each weight is within half a step of its fp value (plus 15 fp16 roundings of the step at the
    # clamped range end), so |y - y_fp| <= sum_i |x_i| * 0.51 * step_i, plus the fp16 bias rounding.
    step_OI = packed.scales.float().t().repeat_interleave(128, dim=1)
    bound = x.abs() @ (0.51 * step_OI).t() + linear.bias.detach().abs() * 2**-11 + 1e-6
    err = (layer(x) - y_fp).abs()
    assert bool((err <= bound).all()), float((err / bound).max())
    # And it is a real approximation, not a coincidence of a loose bound.
    assert float(err.mean()) < 0.2 * float(y_fp.abs().mean())
    assert "group_size=128" in repr(layer)


def test_wqlinear_keeps_input_dtype():
    layer, *_ = _random_wqlinear(64, 16, 32, seed=5)
    x = torch.randn(4, 64, generator=_gen(6))
    y16 = layer(x.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16
    # fp32 math on the bf16 input, rounded once at the end.
    torch.testing.assert_close(y16, layer(x.to(torch.bfloat16).float()).to(torch.bfloat16), atol=0, rtol=0)


def test_wqlinear_without_bias_and_state_dict_names():
    layer, *_ = _random_wqlinear(32, 8, 32, seed=7, bias=False)
    assert layer.bias is None
    assert set(layer.state_dict()) == {"qweight", "qzeros", "scales"}
    assert layer.qweight.dtype == torch.int32 and layer.scales.dtype == torch.float16


def test_wqlinear_bad_shapes():
    with pytest.raises(ValueError, match="divisible by group_size"):
        WQLinear(100, 16, bias=False, group_size=32)
    with pytest.raises(ValueError, match="divisible by 8"):
        WQLinear(64, 12, bias=False, group_size=32)
    with pytest.raises(ValueError, match="group_size"):
        WQLinear(64, 16, bias=False, group_size=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the W4A16 Triton kernel needs a CUDA device")
def test_wqlinear_kernel_matches_fallback_on_cuda():
    layer, *_ = _random_wqlinear(256, 64, 128, seed=8)
    layer = layer.cuda()
    for rows in (1, 5, 40):
        x = torch.randn(rows, 256, generator=_gen(rows)).cuda().to(torch.bfloat16)
        layer.use_kernel = True
        y_kernel = layer(x)
        layer.use_kernel = False
        y_ref = layer(x)
        torch.testing.assert_close(y_kernel.float(), y_ref.float(), atol=2e-2, rtol=2e-2)


# ---------------------------------------------------------------- names and config


def test_checkpoint_key_map_matches_save_pretrained(tiny_model_dir):
    from mpo.model.load import load_model

    model = load_model(tiny_model_dir, dtype="float32")
    keys = list(model.state_dict())
    mapping = checkpoint_key_map(model, keys)
    with safe_open(str(tiny_model_dir / "model.safetensors"), framework="pt") as fh:
        on_disk = set(fh.keys())
    assert set(mapping.values()) == on_disk
    assert mapping["lm_head.weight"] == "language_model.lm_head.weight"
    # Keys that are not in the model map through the same prefix rules.
    extra = checkpoint_key_map(model, ["model.language_model.layers.1.mlp.down_proj.qweight"])
    assert extra == {"model.language_model.layers.1.mlp.down_proj.qweight":
                     "language_model.model.layers.1.mlp.down_proj.qweight"}


def test_check_awq_config_accepts_gemm_and_refuses_others():
    good = {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "gemm"}
    assert check_awq_config(good, "ckpt") == 64
    with pytest.raises(ValueError, match="expected 'awq'"):
        check_awq_config({"quant_method": "gptq"}, "ckpt")
    with pytest.raises(ValueError, match="expected 'awq'"):
        check_awq_config(None, "ckpt")
    with pytest.raises(ValueError, match="bits=8.*GEMM"):
        check_awq_config({**good, "bits": 8, "version": "gemv"}, "ckpt")
    with pytest.raises(ValueError, match="zero_point"):
        check_awq_config({**good, "zero_point": False}, "ckpt")
