"""Convert an original InternVL2.5 remote-code checkpoint to the native transformers layout.

    python -m mpo.model.convert SRC DST

SRC is an `InternVLChatModel` directory (`vision_model.*` with fused `qkv`, `mlp1.*`,
`language_model.*`, config.json with `vision_config` and `llm_config`). DST gets config.json for
`InternVLForConditionalGeneration`, safetensors shards (one per source shard, written shard by shard so
memory stays bounded), an index, the tokenizer with InternVL's named image tokens, and the processor.
Only Qwen2/Qwen2.5-based sizes (1B, 4B, 38B, 78B) are supported.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, InternVLConfig, InternVLVisionConfig, PreTrainedTokenizerFast, Qwen2Config

from mpo.model.tokenizer import IM_END, IMG_CONTEXT, IMG_END, IMG_START, PAD_TOKEN, VIDEO_TOKEN

SUPPORTED_LLMS = {"Qwen2ForCausalLM": "qwen2"}

_LAYER_RENAMES = [
    (r"attn\.proj\.", "attention.projection_layer."),
    (r"attn\.q_norm\.", "attention.q_norm."),
    (r"attn\.k_norm\.", "attention.k_norm."),
    (r"mlp\.fc1\.", "mlp.fc1."),
    (r"mlp\.fc2\.", "mlp.fc2."),
    (r"norm1\.", "layernorm_before."),
    (r"norm2\.", "layernorm_after."),
]
_PROJECTOR = {"mlp1.0.": "model.multi_modal_projector.layer_norm.", "mlp1.1.": "model.multi_modal_projector.linear_1.",
              "mlp1.3.": "model.multi_modal_projector.linear_2."}


class ConversionError(ValueError):
    pass


def map_key(key: str) -> str:
    """Native name of an original tensor name (not for fused `qkv`, which `map_tensors` splits)."""
    if key.startswith("language_model.model."):
        return "model.language_model." + key[len("language_model.model."):]
    if key == "language_model.lm_head.weight":
        return "lm_head.weight"
    for old, new in _PROJECTOR.items():
        if key.startswith(old):
            return new + key[len(old):]
    emb = {"vision_model.embeddings.class_embedding": "model.vision_tower.embeddings.cls_token",
           "vision_model.embeddings.position_embedding": "model.vision_tower.embeddings.position_embeddings"}
    if key in emb:
        return emb[key]
    if key.startswith("vision_model.embeddings.patch_embedding."):
        return "model.vision_tower.embeddings.patch_embeddings.projection." + key.rsplit(".", 1)[1]
    m = re.match(r"vision_model\.encoder\.layers\.(\d+)\.(.+)$", key)
    if m:
        layer, rest = m.groups()
        prefix = f"model.vision_tower.encoder.layer.{layer}."
        if rest in ("ls1", "ls2"):
            return prefix + ("lambda_1" if rest == "ls1" else "lambda_2")
        for pattern, repl in _LAYER_RENAMES:
            if re.match(pattern, rest):
                return prefix + re.sub(pattern, repl, rest, count=1)
    raise ConversionError(f"unexpected tensor {key!r} in the original checkpoint")


def map_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename original tensors to native names; split each fused `qkv` into q/k/v projections."""
    out = {}
    for key, value in tensors.items():
        m = re.match(r"vision_model\.encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)$", key)
        if m:
            layer, kind = m.groups()
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"model.vision_tower.encoder.layer.{layer}.attention.{name}.{kind}"] = part.contiguous()
            continue
        out[map_key(key)] = value
    return out


def native_config(original: dict, image_token_id: int) -> InternVLConfig:
    """Native `InternVLConfig` from an original `internvl_chat` config.json dict."""
    if original.get("model_type") != "internvl_chat":
        raise ConversionError(f"expected model_type 'internvl_chat', got {original.get('model_type')!r}")
    llm = dict(original["llm_config"])
    arch = (llm.get("architectures") or ["?"])[0]
    if arch not in SUPPORTED_LLMS:
        raise ConversionError(
            f"LLM {arch!r} is not supported: only Qwen2/Qwen2.5-based InternVL2.5 sizes (1B, 4B, 38B, 78B) convert "
            "to the native layout; InternLM2-based sizes (2B, 8B, 26B) need their own converter"
        )
    if original.get("ps_version", "v2") != "v2":
        raise ConversionError("ps_version v1 pixel shuffle has no native equivalent")
    vis = original["vision_config"]
    patch, size = vis["patch_size"], original.get("force_image_size") or vis["image_size"]
    ratio = original.get("downsample_ratio", 0.5)
    vision = InternVLVisionConfig(
        hidden_size=vis["hidden_size"], num_hidden_layers=vis["num_hidden_layers"],
        num_attention_heads=vis["num_attention_heads"], intermediate_size=vis["intermediate_size"],
        image_size=size, patch_size=patch, attention_bias=vis.get("qkv_bias", True),
        use_qk_norm=vis.get("qk_normalization", False), norm_type=vis.get("norm_type", "layer_norm"),
        layer_norm_eps=vis.get("layer_norm_eps", 1e-6), hidden_act=vis.get("hidden_act", "gelu"),
        use_mean_pooling=True,
    )
    # Qwen2Config maps the legacy rope_theta itself; drop only what names the remote-code classes.
    keep = {k: v for k, v in llm.items() if k not in ("architectures", "auto_map", "_name_or_path")}
    text = Qwen2Config(**keep)
    return InternVLConfig(
        vision_config=vision, text_config=text, image_token_id=image_token_id,
        image_seq_length=int((size // patch) * ratio) ** 2, downsample_ratio=ratio,
        projector_hidden_act="gelu", vision_feature_layer=original.get("select_layer", -1),
        vision_feature_select_strategy="default", tie_word_embeddings=llm.get("tie_word_embeddings", False),
    )


def _source_shards(src: Path) -> list[Path]:
    index = src / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [src / f for f in files]
    single = src / "model.safetensors"
    if single.is_file():
        return [single]
    raise ConversionError(f"{src}: no model.safetensors or model.safetensors.index.json found")


def convert_tokenizer(src: Path):
    """The source tokenizer re-wrapped with InternVL's named image tokens for `InternVLProcessor`."""
    original = AutoTokenizer.from_pretrained(str(src), trust_remote_code=False, local_files_only=True)
    backend = original.backend_tokenizer
    if backend.token_to_id(IMG_CONTEXT) is None:
        raise ConversionError(f"{src}: tokenizer has no {IMG_CONTEXT} token")
    pad = original.pad_token if original.pad_token is not None else PAD_TOKEN
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=pad, eos_token=IM_END, bos_token=None, unk_token=None,
        model_max_length=original.model_max_length, padding_side="right",
        extra_special_tokens={"start_image_token": IMG_START, "end_image_token": IMG_END,
                              "context_image_token": IMG_CONTEXT, "video_token": VIDEO_TOKEN},
    )


def convert_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Convert SRC (original layout) to DST (native layout); returns DST."""
    from mpo.model.tiny import build_processor  # processor layout is shared with the fixtures
    from mpo.model.tokenizer import CHAT_TEMPLATE

    src, dst = Path(src), Path(dst)
    config_file = src / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"{config_file} not found")
    original = json.loads(config_file.read_text())
    tokenizer = convert_tokenizer(src)
    config = native_config(original, tokenizer.convert_tokens_to_ids(IMG_CONTEXT))
    dst.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    shards = _source_shards(src)
    for i, shard in enumerate(shards):
        mapped = map_tensors(load_file(str(shard)))
        name = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(mapped, str(dst / name), metadata={"format": "pt"})
        for key, value in mapped.items():
            weight_map[key] = name
            total += value.numel() * value.element_size()
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.save_pretrained(dst)
    processor = build_processor(
        tokenizer, image_size=config.vision_config.image_size[0], tokens_per_tile=config.image_seq_length,
        max_dynamic_patch=original.get("max_dynamic_patch", 12),
    )
    processor.chat_template = CHAT_TEMPLATE
    processor.save_pretrained(dst)
    return dst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpo.model.convert", description=__doc__.splitlines()[0])
    parser.add_argument("src", help="original InternVL2.5 checkpoint directory (model_type internvl_chat)")
    parser.add_argument("dst", help="output directory for the native checkpoint")
    args = parser.parse_args(argv)
    try:
        out = convert_checkpoint(args.src, args.dst)
    except (ConversionError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote native InternVL checkpoint to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
