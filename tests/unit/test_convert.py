"""Original InternVL2.5 (remote-code layout) → native: logits equal a direct re-implementation."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import Qwen2Config, Qwen2ForCausalLM

from mpo.model.convert import ConversionError, native_config
from mpo.model.load import load_model, load_processor
from mpo.model.tokenizer import train_tiny_tokenizer

VIS = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=56,
           patch_size=14, qkv_bias=True, qk_normalization=False, norm_type="layer_norm", layer_norm_eps=1e-6,
           hidden_act="gelu", model_type="intern_vit_6b", architectures=["InternVisionModel"], drop_path_rate=0.0)
LLM = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=64, intermediate_size=128,
           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=768, rope_theta=1e6,
           rms_norm_eps=1e-6, max_position_embeddings=512, tie_word_embeddings=False, torch_dtype="float32")


def original_state_dict(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random weights under the original InternVLChatModel names and shapes."""
    D, I, P = VIS["hidden_size"], VIS["intermediate_size"], VIS["patch_size"]
    n_patches = (VIS["image_size"] // P) ** 2
    r = lambda *s: torch.randn(*s, generator=gen) * 0.2  # noqa: E731
    sd = {
        "vision_model.embeddings.class_embedding": r(1, 1, D),
        "vision_model.embeddings.patch_embedding.weight": r(D, 3, P, P),
        "vision_model.embeddings.patch_embedding.bias": r(D),
        "vision_model.embeddings.position_embedding": r(1, n_patches + 1, D),
    }
    for i in range(VIS["num_hidden_layers"]):
        p = f"vision_model.encoder.layers.{i}."
        sd.update({p + "attn.qkv.weight": r(3 * D, D), p + "attn.qkv.bias": r(3 * D), p + "attn.proj.weight": r(D, D),
                   p + "attn.proj.bias": r(D), p + "mlp.fc1.weight": r(I, D), p + "mlp.fc1.bias": r(I),
                   p + "mlp.fc2.weight": r(D, I), p + "mlp.fc2.bias": r(D), p + "norm1.weight": 1 + r(D),
                   p + "norm1.bias": r(D), p + "norm2.weight": 1 + r(D), p + "norm2.bias": r(D), p + "ls1": r(D),
                   p + "ls2": r(D)})
    H = LLM["hidden_size"]
    sd.update({"mlp1.0.weight": 1 + r(4 * D), "mlp1.0.bias": r(4 * D), "mlp1.1.weight": r(H, 4 * D),
               "mlp1.1.bias": r(H), "mlp1.3.weight": r(H, H), "mlp1.3.bias": r(H)})
    llm = Qwen2ForCausalLM(Qwen2Config(**{k: v for k, v in LLM.items() if k != "architectures"}))
    for k, v in llm.state_dict().items():
        sd["language_model." + k] = r(*v.shape) if v.dim() > 1 else v + r(*v.shape)
    return sd


def write_original(path, sd, tokenizer):
    path.mkdir(parents=True)
    config = {"architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "downsample_ratio": 0.5,
              "force_image_size": VIS["image_size"], "ps_version": "v2", "select_layer": -1, "template": "internvl2_5",
              "max_dynamic_patch": 6, "use_thumbnail": True, "vision_config": VIS, "llm_config": LLM}
    (path / "config.json").write_text(json.dumps(config))
    half = len(sd) // 2
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    for name, ks in shards.items():
        save_file({k: sd[k].contiguous() for k in ks}, str(path / name))
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: n for n, ks in shards.items() for k in ks}}))
    tokenizer.save_pretrained(path)


def reference_forward(sd, input_ids, pixel_values, image_token_id):
    """The original InternVLChatModel forward, written out directly on the original tensors."""
    D, heads = VIS["hidden_size"], VIS["num_attention_heads"]
    x = F.conv2d(pixel_values, sd["vision_model.embeddings.patch_embedding.weight"],
                 sd["vision_model.embeddings.patch_embedding.bias"], stride=VIS["patch_size"])
    B = x.shape[0]
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["vision_model.embeddings.class_embedding"].expand(B, 1, -1), x], dim=1)
    x = x + sd["vision_model.embeddings.position_embedding"]
    for i in range(VIS["num_hidden_layers"]):
        p = f"vision_model.encoder.layers.{i}."
        h = F.layer_norm(x, (D,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-6)
        qkv = F.linear(h, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]).reshape(B, -1, 3, heads, D // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        att = ((q * (D // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1) @ v
        att = F.linear(att.transpose(1, 2).reshape(B, -1, D), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        x = x + att * sd[p + "ls1"]
        h = F.layer_norm(x, (D,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], 1e-6)
        h = F.linear(F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])), sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        x = x + h * sd[p + "ls2"]
    x = x[:, 1:]
    side = int(x.shape[1] ** 0.5)
    x = x.reshape(B, side, side, D)
    # pixel shuffle v2, scale 0.5
    n, w, hh, c = x.shape
    x = x.view(n, w, hh // 2, c * 2).permute(0, 2, 1, 3).contiguous()
    x = x.view(n, hh // 2, w // 2, c * 4).permute(0, 2, 1, 3).contiguous()
    x = x.reshape(B, -1, c * 4)
    x = F.layer_norm(x, (4 * D,), sd["mlp1.0.weight"], sd["mlp1.0.bias"], 1e-5)
    x = F.linear(F.gelu(F.linear(x, sd["mlp1.1.weight"], sd["mlp1.1.bias"])), sd["mlp1.3.weight"], sd["mlp1.3.bias"])
    llm = Qwen2ForCausalLM(Qwen2Config(**{k: v for k, v in LLM.items() if k != "architectures"}))
    llm.load_state_dict({k[len("language_model."):]: v for k, v in sd.items() if k.startswith("language_model.")})
    embeds = llm.get_input_embeddings()(input_ids)
    embeds[input_ids == image_token_id] = x.reshape(-1, x.shape[-1])
    return llm(inputs_embeds=embeds).logits


def test_converted_logits_equal_original_forward(tmp_path):
    gen = torch.Generator().manual_seed(0)
    sd = original_state_dict(gen)
    tok = train_tiny_tokenizer()
    write_original(tmp_path / "orig", sd, tok)
    proc = subprocess.run([sys.executable, "-m", "mpo.model.convert", str(tmp_path / "orig"), str(tmp_path / "native")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    model = load_model(tmp_path / "native", dtype="float32", attn_implementation="eager").eval()
    processor = load_processor(tmp_path / "native")
    image_id = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert model.config.image_token_id == image_id and model.config.image_seq_length == 4
    assert processor.tokenizer.context_image_token == "<IMG_CONTEXT>"
    assert (tmp_path / "native" / "model.safetensors.index.json").is_file()
    n_tiles = 2
    text_ids = tok("hello there", add_special_tokens=False)["input_ids"]
    img_ids = [tok.convert_tokens_to_ids("<img>")] + [image_id] * (4 * n_tiles) + [tok.convert_tokens_to_ids("</img>")]
    input_ids = torch.tensor([text_ids + img_ids + text_ids])
    pixel_values = torch.randn(n_tiles, 3, 56, 56, generator=gen)
    with torch.no_grad():
        ours = model(input_ids=input_ids, pixel_values=pixel_values).logits
        ref = reference_forward(sd, input_ids, pixel_values, image_id)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_refuses_unsupported_llm():
    bad = {"model_type": "internvl_chat", "llm_config": {**LLM, "architectures": ["InternLM2ForCausalLM"]}, "vision_config": VIS}
    with pytest.raises(ConversionError, match="InternLM2ForCausalLM.*not supported"):
        native_config(bad, 5)
    with pytest.raises(ConversionError, match="internvl_chat"):
        native_config({"model_type": "llava"}, 5)


def test_cli_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mpo.model.convert", str(tmp_path / "none"), str(tmp_path / "out")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "config.json not found" in proc.stderr and "Traceback" not in proc.stderr
