"""Write a random tiny InternVL checkpoint directory that loads like any real one.

    python -m mpo.model.tiny OUT_DIR [--seed N] [--shape tiny] [--image-size 448]

The directory holds `config.json` + `model.safetensors` (native `InternVLForConditionalGeneration`),
an offline byte-level BPE tokenizer with InternVL2.5's special tokens and chat template, and the
processor files, so `AutoModelForImageTextToText.from_pretrained(OUT_DIR)` and
`AutoProcessor.from_pretrained(OUT_DIR)` work with no network.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
from transformers import (
    GotOcr2ImageProcessor,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    InternVLVideoProcessor,
)

from mpo.model.shapes import IMAGENET_MEAN, IMAGENET_STD, SHAPES, ModelShape, internvl_config
from mpo.model.tokenizer import CHAT_TEMPLATE, train_tiny_tokenizer


def build_processor(tokenizer, *, image_size: int, tokens_per_tile: int, max_dynamic_patch: int = 12):
    """An `InternVLProcessor` with InternVL's tiling image processor around `tokenizer`."""
    size = {"height": image_size, "width": image_size}
    image_processor = GotOcr2ImageProcessor(
        crop_to_patches=True,
        min_patches=1,
        max_patches=max_dynamic_patch,
        size=size,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_convert_rgb=True,
    )
    video_processor = InternVLVideoProcessor(
        size=size, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD)
    )
    return InternVLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        image_seq_length=tokens_per_tile,
        chat_template=CHAT_TEMPLATE,
    )


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def write_tiny_checkpoint(
    out_dir: str | Path,
    *,
    seed: int = 0,
    shape: str | ModelShape = "tiny",
    image_size: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a random InternVL checkpoint of `shape` with the offline tokenizer to `out_dir`.

    Weights are drawn with `torch.manual_seed(seed)`, so the same seed gives the same checkpoint.
    `image_size` overrides the tile side (must be a multiple of patch_size / downsample_ratio).
    Returns the directory path.
    """
    if isinstance(shape, str):
        if shape not in SHAPES:
            raise ValueError(f"unknown shape {shape!r}; choose one of {sorted(SHAPES)}")
        shape = SHAPES[shape]
    if image_size is not None:
        step = int(shape.vision.patch_size / shape.downsample_ratio)
        if image_size <= 0 or image_size % step:
            raise ValueError(f"image_size={image_size} must be a positive multiple of {step}")
        shape = dataclasses.replace(shape, vision=dataclasses.replace(shape.vision, image_size=image_size))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = train_tiny_tokenizer()
    # Real shapes keep their real vocabulary size (it sets lm_head cost); ids past the tokenizer are unused.
    vocab_size = max(_round_up(len(tokenizer), 64), shape.text.vocab_size)
    config = internvl_config(
        shape,
        image_token_id=tokenizer.context_image_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        vocab_size=vocab_size,
    )
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).to(dtype)
    # Random init leaves position embeddings and cls token at zero; give them signal so that tiles
    # and positions are distinguishable even before training.
    with torch.no_grad():
        emb = model.model.vision_tower.embeddings
        emb.position_embeddings.normal_(0, 0.02)
        emb.cls_token.normal_(0, 0.02)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)

    processor = build_processor(
        tokenizer, image_size=shape.vision.image_size, tokens_per_tile=shape.tokens_per_tile
    )
    processor.save_pretrained(out)
    (out / "mpo_fixture.json").write_text(
        json.dumps({"seed": seed, "shape": dataclasses.asdict(shape)}, indent=2) + "\n"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpo.model.tiny", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="directory to write the checkpoint into (created if absent)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    parser.add_argument("--shape", default="tiny", choices=sorted(SHAPES), help="named shape (default tiny)")
    parser.add_argument("--image-size", type=int, default=None, help="tile side in pixels (default: shape's)")
    args = parser.parse_args(argv)
    try:
        path = write_tiny_checkpoint(args.out_dir, seed=args.seed, shape=args.shape, image_size=args.image_size)
    except ValueError as err:
        parser.error(str(err))
    print(f"wrote {args.shape} InternVL checkpoint to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
