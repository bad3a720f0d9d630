"""The AWQ export pipeline on tiny models: AWQ beats RTN under activation outliers, the export is
deterministic, a lossless model survives export + engine exactly, the report and bad inputs.

Measured on the outlier model below (3 of 128 hidden channels x50 in the token embeddings and the
projector output, 4 image conversations): layer-output MSE of AWQ / RTN = 0.19 (layer 0) and
0.22 (layer 1); the test asks for < 0.5. (Without the outliers the same model gives 0.3-0.5.)
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_image, write_mmpr
from safetensors.torch import load_file
from test_awq_checkpoint import grid_checkpoint

from mpo.model.load import load_model
from mpo.model.tiny import write_tiny_checkpoint
from mpo.quant.calibrate import capture_layer_inputs
from mpo.quant.export import (
    CalibrationConfig,
    ExportConfig,
    QuantConfig,
    QualityConfig,
    export_awq,
    quantize_layer,
)

OUTLIER_CHANNELS = [5, 40, 99]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("awq_mmpr")
    records = []
    for i in range(6):
        write_image(root / f"img{i}.png", size=(64 + 8 * i, 48), color=(50 * i, 30, 200))
        records.append({"image": f"img{i}.png", "question": f"What colour is shape {i}?",
                        "chosen": "It is red and round. " * 4, "rejected": "blue"})
    return write_mmpr(root, records)


@pytest.fixture(scope="module")
def outlier_model(tmp_path_factory):
    """Tiny random InternVL whose residual stream has 3 channels x50 (text and image tokens)."""
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("awq_outlier") / "src", seed=0, image_size=224)
    model = load_model(path, dtype="float32")
    with torch.no_grad():
        model.model.language_model.embed_tokens.weight[:, OUTLIER_CHANNELS] *= 50
        model.model.multi_modal_projector.linear_2.weight[OUTLIER_CHANNELS] *= 50
        model.model.multi_modal_projector.linear_2.bias[OUTLIER_CHANNELS] *= 50
    model.save_pretrained(path)
    return path


def _config(model, out, data, **overrides) -> ExportConfig:
    calibration = CalibrationConfig(num_samples=4, block_size=64, max_response_tokens=32, system_prompt="")
    return ExportConfig(model=str(model), output_dir=str(out), data=None if data is None else str(data),
                        dtype="float32", progress=False, calibration=calibration, **overrides)


@pytest.fixture(scope="module")
def outlier_exports(outlier_model, data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("awq_outlier_out")
    reports = [export_awq(_config(outlier_model, root / f"run{i}", data_dir)) for i in range(2)]
    return root, reports


def test_awq_beats_rtn_under_activation_outliers(outlier_exports):
    _, (report, _) = outlier_exports
    assert len(report["layers"]) == 2
    for layer in report["layers"]:
        mse = layer["output_mse"]
        assert 0 < mse["awq"] < 0.5 * mse["rtn"], mse
        qkv = layer["search"]["scale"]["input_layernorm->q,k,v"]
        assert qkv["alpha"] is not None and qkv["alpha"] > 0  # the outliers are protected
        assert qkv["mse_after"] < qkv["mse_before"]


def test_report_contents(outlier_exports):
    root, (report, _) = outlier_exports
    on_disk = json.loads((root / "run0" / "awq_report.json").read_text())
    assert on_disk["layers"][0]["search"]["scale"] == report["layers"][0]["search"]["scale"]
    layer = on_disk["layers"][1]
    assert set(layer["search"]["scale"]) == {"input_layernorm->q,k,v", "post_attention_layernorm->gate,up",
                                             "up_proj->down_proj"}
    assert "grouped-query" in layer["search"]["skipped"][0]  # tiny has 2 kv heads for 4 heads
    for group in layer["search"]["scale"].values():
        assert {"alpha", "mse_before", "mse_after", "mse_fp"} <= set(group)
        assert len(group["mse_by_alpha"]) == 20
    assert set(layer["search"]["clip"]) == {"v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    for clip in layer["search"]["clip"].values():
        assert 0.5 <= clip["mean_ratio"] <= 1 and 0 <= clip["clipped_fraction"] <= 1
    assert layer["time_s"] > 0 and on_disk["total_time_s"] >= sum(x["time_s"] for x in on_disk["layers"])
    assert on_disk["calibration"]["source"] == "mmpr" and on_disk["calibration"]["num_samples"] == 4
    assert on_disk["calibration"]["num_image_tokens"] == 4 * 64
    assert on_disk["config"]["quant"]["group_size"] == 128


def test_export_is_deterministic(outlier_exports):
    root, (first, second) = outlier_exports
    a = load_file(str(root / "run0" / "model.safetensors"))
    b = load_file(str(root / "run1" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [x["search"] for x in first["layers"]] == [x["search"] for x in second["layers"]]


def test_lossless_model_survives_export_and_engine(tmp_path, data_dir):
    from mpo.infer.engine import Engine, Request, SamplingParams

    source = grid_checkpoint(tmp_path / "src")
    report = export_awq(_config(source, tmp_path / "awq", data_dir))
    for layer in report["layers"]:
        # Weights already on the grid: round-to-nearest is exact, so the search keeps it.
        assert layer["output_mse"]["awq"] == 0 and layer["output_mse"]["rtn"] == 0
        assert all(g["alpha"] is None for g in layer["search"]["scale"].values())
    reference = Engine.load(source, device="cpu", system_prompt=None)
    quantized = Engine.load(tmp_path / "awq", device="cpu", system_prompt=None)
    requests = [Request(f"What is in picture {i}?", images=[data_dir / f"img{i}.png"]) for i in range(3)]
    requests += [Request("Tell me about rivers."), Request("Count to five.")]
    params = SamplingParams(max_new_tokens=8)
    expected = [g[0].token_ids for g in reference.generate(requests, params)]
    got = [g[0].token_ids for g in quantized.generate(requests, params)]
    assert got == expected


def test_quantize_layer_feeds_quantized_or_fp_output(outlier_model):
    model = load_model(outlier_model, dtype="float32").eval()
    hidden = torch.randn(2, 16, 128, generator=torch.Generator().manual_seed(0))
    hidden[..., OUTLIER_CHANNELS] *= 50
    inputs = capture_layer_inputs(model, hidden)
    fp_layer = model.model.language_model.layers[0]
    with torch.no_grad():
        y_fp = fp_layer(hidden, **inputs.kwargs)
    for feed_quantized in (False, True):
        layer = load_model(outlier_model, dtype="float32").model.language_model.layers[0]

        def forward(h, layer=layer):
            return layer(h, **inputs.kwargs)

        quant = QuantConfig(feed_quantized_output=feed_quantized, n_grid=4)
        weights, next_x, report = quantize_layer(layer, hidden, forward, quant)
        assert set(weights) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
        # The layer now computes the dequantized checkpoint weights.
        torch.testing.assert_close(layer.mlp.down_proj.weight.t(), weights["mlp.down_proj"].dequantize())
        if feed_quantized:
            with torch.no_grad():
                torch.testing.assert_close(next_x, forward(hidden))
            assert not torch.allclose(next_x, y_fp)
        else:
            torch.testing.assert_close(next_x, y_fp)


def test_export_bad_inputs(outlier_model, outlier_exports, data_dir, tmp_path):
    root, _ = outlier_exports
    with pytest.raises(ValueError, match="already quantized"):
        export_awq(_config(root / "run0", tmp_path / "again", data_dir))
    with pytest.raises(ValueError, match="not empty"):
        export_awq(_config(outlier_model, root / "run0", data_dir))
    with pytest.raises(ValueError, match="is the source"):
        export_awq(_config(outlier_model, outlier_model, data_dir))
    with pytest.raises(ValueError, match="does not exist"):
        export_awq(_config(outlier_model, tmp_path / "x", tmp_path / "no_such_data"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        export_awq(_config(tmp_path / "no_model", tmp_path / "y", data_dir))
    with pytest.raises(ValueError, match="fp16 overflows.*n_grid=0"):
        ExportConfig(model="m", output_dir="o", dtype="float16", quant=QuantConfig(n_grid=0))
    with pytest.raises(ValueError, match="quality.num_samples"):
        ExportConfig(model="m", output_dir="o", quality=QualityConfig(num_samples=0))
