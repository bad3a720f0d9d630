"""Load a local native InternVL checkpoint directory (model + processor), never with remote code."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import torch
from transformers import AutoProcessor, InternVLForConditionalGeneration

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flex_attention")


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map a config string ("bf16", "float32", ...) or a torch dtype to a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def read_checkpoint_config(model_dir: str | Path) -> dict:
    """config.json of a checkpoint directory, with clear errors for what cannot be loaded."""
    path = Path(model_dir)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{config_file} not found: model must be a local Hugging Face checkpoint directory "
            "(config.json + safetensors + processor files); nothing is downloaded"
        )
    config = json.loads(config_file.read_text())
    model_type = config.get("model_type")
    if model_type == "internvl_chat":
        raise ValueError(
            f"{path} is an original InternVL remote-code checkpoint (model_type internvl_chat); "
            f"convert it once with: python -m mpo.model.convert {path} {path}-hf"
        )
    if model_type != "internvl":
        raise ValueError(f"{path} has model_type {model_type!r}; mpo expects a native InternVL checkpoint ('internvl')")
    return config


def load_model(
    model_dir: str | Path,
    *,
    dtype: str | torch.dtype = "bfloat16",
    attn_implementation: str = "sdpa",
    device: str | torch.device | None = None,
) -> InternVLForConditionalGeneration:
    """Load `InternVLForConditionalGeneration` from a local directory (safetensors, no remote code).

    Args:
        model_dir: native InternVL checkpoint directory.
        dtype: parameter dtype ("bfloat16", "float32", "float16" or a torch dtype).
        attn_implementation: "sdpa" (default), "eager", "flash_attention_2" or "flex_attention".
        device: where to put the model (default: stays on CPU).
    """
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation={attn_implementation!r}; use one of {ATTN_IMPLEMENTATIONS}")
    read_checkpoint_config(model_dir)
    model = InternVLForConditionalGeneration.from_pretrained(
        str(model_dir),
        dtype=resolve_dtype(dtype),
        attn_implementation=attn_implementation,
        use_safetensors=True,
        trust_remote_code=False,
        local_files_only=True,
    )
    if device is not None:
        model = model.to(device)
    return model


def load_processor(model_dir: str | Path):
    """Load the checkpoint's `InternVLProcessor` (tokenizer, tiling image processor, chat template)."""
    read_checkpoint_config(model_dir)
    processor = AutoProcessor.from_pretrained(str(model_dir), trust_remote_code=False, local_files_only=True)
    tok = processor.tokenizer
    if tok.pad_token_id is None:
        raise ValueError(f"{model_dir}: tokenizer has no pad token; set pad_token in tokenizer_config.json")
    return processor


def free_memory() -> None:
    """Return a released model's memory before the next one loads: garbage, then (when CUDA is in use)
    the allocator's cached blocks."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
