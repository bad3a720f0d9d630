"""The AWQ checkpoint: what `write_awq_checkpoint` writes (names, dtypes, shapes, config) and what
`load_awq_model` / `Engine.load` make of it.

The source model here has decoder weights on the 4-bit grid ((q - 8) / 64 with q in 0..15 and both
ends present in every group) and every other tensor fp16, so 4-bit packing and fp16 storage are
lossless: the loaded AWQ model must reproduce the source model's logits (fp32 math order aside).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from mpo.model.load import load_model
from mpo.model.shapes import SHAPES
from mpo.model.tiny import write_tiny_checkpoint
from mpo.quant.awq_linear import WQLinear, load_awq_model
from mpo.quant.export import DECODER_LINEARS, write_awq_checkpoint
from mpo.quant.pack import AWQLinearWeights

GROUP = 128


def put_decoder_on_grid(model: nn.Module, seed: int = 0) -> None:
    """Decoder linears := (q - 8) / 64, q uniform in 0..15, with 0 and 15 in every group of 128."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            for path in DECODER_LINEARS:
                weight = layer.get_submodule(path).weight
                q = torch.randint(0, 16, weight.shape, generator=g)
                q[:, ::GROUP], q[:, 1::GROUP] = 0, 15
                weight.copy_(((q - 8) / 64).to(weight.dtype))


def grid_checkpoint(path, *, tie: bool = False):
    shape = dataclasses.replace(SHAPES["tiny"], tie_word_embeddings=tie)
    write_tiny_checkpoint(path, seed=0, shape=shape, image_size=224, dtype=torch.float16)
    model = load_model(path, dtype="float16")
    put_decoder_on_grid(model)
    model.save_pretrained(path)
    return path


def pack_decoder(model: nn.Module) -> dict[str, AWQLinearWeights]:
    """Round-to-nearest pack of every decoder linear (no search), keyed by module name."""
    packed = {}
    for i, layer in enumerate(model.model.language_model.layers):
        for path in DECODER_LINEARS:
            packed[f"model.language_model.layers.{i}.{path}"] = AWQLinearWeights.from_linear(
                layer.get_submodule(path), group_size=GROUP)
    return packed


@pytest.fixture(scope="module")
def grid_dirs(tmp_path_factory):
    """(source checkpoint, its AWQ checkpoint written without search)."""
    root = tmp_path_factory.mktemp("awq_ckpt")
    source = grid_checkpoint(root / "src")
    model = load_model(source, dtype="float32")
    write_awq_checkpoint(model, pack_decoder(model), source, root / "awq", group_size=GROUP)
    return source, root / "awq"


def _inputs(source):
    from mpo.infer.engine import Engine, Request

    engine = Engine.load(source, device="cpu", system_prompt=None)
    image = torch.rand(3, 60, 90, generator=torch.Generator().manual_seed(0))
    from PIL import Image

    pil = Image.fromarray((image.permute(1, 2, 0) * 255).to(torch.uint8).numpy())
    encoded = engine.encode(Request("What is in the picture?", images=[pil]))
    return torch.tensor([encoded.input_ids]), encoded.pixel_values


def test_checkpoint_names_dtypes_shapes(grid_dirs):
    source, awq = grid_dirs
    src = load_file(str(source / "model.safetensors"))
    out = load_file(str(awq / "model.safetensors"))
    quantized = {k[: -len(".weight")] for k in src if ".layers." in k and k.endswith("_proj.weight")
                 and k.startswith("language_model.model.")}
    assert len(quantized) == 2 * 7
    expected_names = set()
    for key in src:
        prefix = key.rpartition(".")[0]
        if prefix in quantized and key.endswith(".weight"):
            expected_names |= {f"{prefix}.qweight", f"{prefix}.qzeros", f"{prefix}.scales"}
        else:
            expected_names.add(key)
    assert set(out) == expected_names
    q_proj = "language_model.model.layers.0.self_attn.q_proj"
    assert out[f"{q_proj}.qweight"].dtype == torch.int32 and out[f"{q_proj}.qweight"].shape == (128, 128 // 8)
    assert out[f"{q_proj}.qzeros"].shape == (1, 16) and out[f"{q_proj}.qzeros"].dtype == torch.int32
    assert out[f"{q_proj}.scales"].shape == (1, 128) and out[f"{q_proj}.scales"].dtype == torch.float16
    assert out[f"{q_proj}.bias"].dtype == torch.float16  # Qwen2 q/k/v carry biases
    down = "language_model.model.layers.1.mlp.down_proj"
    assert out[f"{down}.qweight"].shape == (256, 16) and out[f"{down}.scales"].shape == (2, 128)
    assert f"{down}.bias" not in out
    # Grid weights: every step is 1/64 and every zero point 8 (nibbles 0x88888888 as int32).
    assert bool((out[f"{down}.scales"] == 1 / 64).all())
    assert bool((out[f"{down}.qzeros"] == 0x88888888 - 2**32).all())
    for name, tensor in out.items():
        if not name.endswith(("qweight", "qzeros")):
            assert tensor.dtype == torch.float16, name
            if name in src and ".layers." not in name:
                assert torch.equal(tensor, src[name]), name  # unquantized tensors pass through


def test_checkpoint_config_and_files(grid_dirs):
    source, awq = grid_dirs
    config = json.loads((awq / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm",
        "modules_to_not_convert": ["vision_tower", "multi_modal_projector", "lm_head"],
    }
    assert config["dtype"] == "float16" and config["torch_dtype"] == "float16"
    source_config = json.loads((source / "config.json").read_text())
    assert config["text_config"] == source_config["text_config"]
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja",
                 "generation_config.json"):
        assert (awq / name).read_bytes() == (source / name).read_bytes()


def test_load_awq_model_reproduces_lossless_source(grid_dirs):
    source, awq = grid_dirs
    reference = load_model(source, dtype="float32").eval()
    model = load_awq_model(awq, device="cpu", dtype=torch.float32)
    wq = [name for name, m in model.named_modules() if isinstance(m, WQLinear)]
    assert len(wq) == 14 and all(".language_model.layers." in name for name in wq)
    assert isinstance(model.model.vision_tower.encoder.layer[0].attention.q_proj, nn.Linear)
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight.dtype == torch.float32
    assert model.model.language_model.rotary_emb.inv_freq.dtype == torch.float32
    torch.testing.assert_close(model.model.language_model.rotary_emb.inv_freq,
                               reference.model.language_model.rotary_emb.inv_freq)
    input_ids, pixel_values = _inputs(source)
    with torch.no_grad():
        ref_logits = reference(input_ids=input_ids, pixel_values=pixel_values).logits
        awq_logits = model(input_ids=input_ids, pixel_values=pixel_values).logits
    torch.testing.assert_close(awq_logits, ref_logits, atol=1e-4, rtol=1e-4)


def test_sharded_and_tied_checkpoint_round_trip(tmp_path):
    source = grid_checkpoint(tmp_path / "src", tie=True)
    model = load_model(source, dtype="float32")
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    files = write_awq_checkpoint(model, pack_decoder(model), source, tmp_path / "awq", group_size=GROUP,
                                 max_shard_bytes=200_000)
    assert "model.safetensors.index.json" in files and len([f for f in files if f.startswith("model-")]) > 1
    index = json.loads((tmp_path / "awq" / "model.safetensors.index.json").read_text())
    assert "language_model.lm_head.weight" not in index["weight_map"]  # tied: written once, as embed
    loaded = load_awq_model(tmp_path / "awq", dtype=torch.float32)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.language_model.embed_tokens.weight.data_ptr()
    input_ids, pixel_values = _inputs(source)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=input_ids, pixel_values=pixel_values).logits,
                                   model(input_ids=input_ids, pixel_values=pixel_values).logits,
                                   atol=1e-4, rtol=1e-4)


def _copy_awq(awq, dst, edit):
    """Copy an AWQ checkpoint, passing its tensors through ``edit(dict) -> dict``."""
    dst.mkdir()
    for path in awq.iterdir():
        if path.name != "model.safetensors":
            (dst / path.name).write_bytes(path.read_bytes())
    save_file(edit(load_file(str(awq / "model.safetensors"))), str(dst / "model.safetensors"),
              metadata={"format": "pt"})
    return dst


def test_load_awq_model_bad_checkpoints(grid_dirs, tmp_path):
    source, awq = grid_dirs
    scales = "language_model.model.layers.0.mlp.up_proj.scales"
    with pytest.raises(ValueError, match="expected 'awq'"):
        load_awq_model(source)
    missing = _copy_awq(awq, tmp_path / "missing", lambda t: {k: v for k, v in t.items() if k != scales})
    with pytest.raises(ValueError, match="lacks tensors"):
        load_awq_model(missing)
    wrong_dtype = _copy_awq(awq, tmp_path / "dtype", lambda t: {**t, scales: t[scales].float()})
    with pytest.raises(ValueError, match="dtype"):
        load_awq_model(wrong_dtype)
    wrong_shape = _copy_awq(awq, tmp_path / "shape", lambda t: {**t, scales: t[scales][:, :64].contiguous()})
    with pytest.raises(ValueError, match="shape"):
        load_awq_model(wrong_shape)
    extra = _copy_awq(awq, tmp_path / "extra", lambda t: {**t, "language_model.model.bogus.weight": t[scales].clone()})
    with pytest.raises(ValueError, match="match no module"):
        load_awq_model(extra)
    with safe_open(str(awq / "model.safetensors"), framework="pt") as fh:
        assert scales in fh.keys()


def test_engine_loads_awq_and_refuses_other_quantization(grid_dirs, tmp_path):
    from mpo.infer.engine import Engine, Request, SamplingParams

    source, awq = grid_dirs
    engine = Engine.load(awq, device="cpu", system_prompt=None)
    assert isinstance(engine.model.model.language_model.layers[0].mlp.down_proj, WQLinear)
    out = engine.generate([Request("Say something.")], SamplingParams(max_new_tokens=3))
    assert 1 <= len(out[0][0].token_ids) <= 3
    gptq = tmp_path / "gptq"
    gptq.mkdir()
    config = json.loads((awq / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (gptq / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="gptq"):
        Engine.load(gptq, device="cpu")


def test_writer_refuses_fp16_overflow(grid_dirs, tmp_path):
    source, _ = grid_dirs
    model = load_model(source, dtype="float32")
    with torch.no_grad():
        model.model.language_model.norm.weight[0] = 1e6  # beyond fp16's 65504
    packed = pack_decoder(model)
    with pytest.raises(ValueError, match="overflows.*save_dtype=bfloat16"):
        write_awq_checkpoint(model, packed, source, tmp_path / "fp16", group_size=GROUP)
    write_awq_checkpoint(model, packed, source, tmp_path / "bf16", group_size=GROUP, save_dtype=torch.bfloat16)
    out = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert out["language_model.model.norm.weight"].dtype == torch.bfloat16
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
