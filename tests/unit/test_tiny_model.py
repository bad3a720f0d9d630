"""Tiny checkpoint fixture: loads with plain transformers Auto classes, deterministic, real fields."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from mpo.model.load import load_model, load_processor, read_checkpoint_config
from mpo.model.shapes import SHAPES, internvl_config
from mpo.model.tiny import write_tiny_checkpoint


def test_cli_writes_loadable_checkpoint(tmp_path):
    out = tmp_path / "tiny"
    proc = subprocess.run([sys.executable, "-m", "mpo.model.tiny", str(out), "--seed", "3"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    model = AutoModelForImageTextToText.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    assert type(model).__name__ == "InternVLForConditionalGeneration"
    tok = processor.tokenizer
    for token in ["<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>"]:
        assert tok.convert_tokens_to_ids(token) is not None
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert tok.pad_token_id not in (tok.eos_token_id, model.config.image_token_id)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "internvl" and cfg["text_config"]["model_type"] == "qwen2"
    assert (out / "model.safetensors").is_file()

    # end to end through the HF processor: image tokens match features, generation runs
    img = Image.new("RGB", (900, 450), (255, 0, 0))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True)
    inputs = processor(images=[img], text=[text], return_tensors="pt")
    assert inputs["pixel_values"].shape[0] == 3  # 2x1 grid + thumbnail
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 3 * 256
    out_ids = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out_ids.shape[1] == inputs["input_ids"].shape[1] + 3 or tok.eos_token_id in out_ids[0].tolist()


def test_seed_determinism(tmp_path):
    a = write_tiny_checkpoint(tmp_path / "a", seed=1)
    b = write_tiny_checkpoint(tmp_path / "b", seed=1)
    c = write_tiny_checkpoint(tmp_path / "c", seed=2)
    ma, mb, mc = (load_model(p, dtype="float32") for p in (a, b, c))
    sa, sb, sc = ma.state_dict(), mb.state_dict(), mc.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_load_model_dtype_and_errors(tiny_model_dir, tmp_path):
    model = load_model(tiny_model_dir, dtype="bf16", attn_implementation="eager")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert load_processor(tiny_model_dir).tokenizer.pad_token == "<|endoftext|>"
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "internvl_chat"}))
    with pytest.raises(ValueError, match="mpo.model.convert"):
        read_checkpoint_config(tmp_path)
    with pytest.raises(ValueError, match="dtype"):
        load_model(tiny_model_dir, dtype="int3")
    with pytest.raises(ValueError, match="attn_implementation"):
        load_model(tiny_model_dir, attn_implementation="magic")


def test_real_shapes_match_reference():
    """1B and 4B configs carry REFERENCE.md's numbers (built as configs; weights are GPU-bench only)."""
    cfg4 = internvl_config("4b", image_token_id=151667)
    t = cfg4.text_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads, t.intermediate_size) == (2048, 36, 16, 2, 11008)
    assert t.rope_parameters["rope_theta"] == 1e6 and not cfg4.tie_word_embeddings
    v = cfg4.vision_config
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size) == (1024, 24, 16, 4096)
    assert cfg4.image_seq_length == 256 == SHAPES["4b"].tokens_per_tile
    cfg1 = internvl_config("1b", image_token_id=151667)
    assert (cfg1.text_config.hidden_size, cfg1.text_config.num_hidden_layers) == (896, 24)
    with torch.device("meta"):
        from transformers import InternVLForConditionalGeneration

        n = sum(p.numel() for p in InternVLForConditionalGeneration(cfg4).parameters())
    assert 3.6e9 < n < 3.8e9  # released InternVL2.5-4B: 3.71B with an untied lm_head
    with pytest.raises(ValueError, match="unknown model shape"):
        internvl_config("7x", image_token_id=1)


def test_bad_cli_args(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mpo.model.tiny", str(tmp_path / "x"), "--image-size", "100"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "multiple of 28" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("name", ["demo", "demo_large"])
def test_demo_shapes_quantize_every_decoder_linear_with_group_128(name):
    """The demo's shapes: 224-px tiles of 64 image tokens, LLM widths multiples of 128 (AWQ group size)."""
    shape = SHAPES[name]
    assert shape.vision.image_size == 224 and shape.tokens_per_tile == 64
    text = shape.text
    assert text.hidden_size % 128 == 0 and text.intermediate_size % 128 == 0
    assert text.num_heads % text.num_kv_heads == 0 and text.hidden_size // text.num_heads >= 32
