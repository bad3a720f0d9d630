"""Named InternVL2.5 shapes as native `InternVLConfig`s, buildable with random weights.

`tiny` is the CPU test fixture; `1b` and `4b` are the real InternVL2.5 shapes (InternViT-300M +
Qwen2.5-0.5B / Qwen2.5-3B, see REFERENCE.md §1) for GPU benchmarks with random weights.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import InternVLConfig, InternVLVisionConfig, Qwen2Config

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class VisionShape:
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    image_size: int = 448
    patch_size: int = 14


@dataclass(frozen=True)
class TextShape:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768


@dataclass(frozen=True)
class ModelShape:
    vision: VisionShape
    text: TextShape
    downsample_ratio: float = 0.5
    tie_word_embeddings: bool = False

    @property
    def tokens_per_tile(self) -> int:
        """Image tokens one tile becomes in the LLM: (image/patch)^2 patches, pixel-unshuffled."""
        side = self.vision.image_size // self.vision.patch_size
        return int(side * self.downsample_ratio) ** 2


INTERNVIT_300M = VisionShape(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096)

SHAPES: dict[str, ModelShape] = {
    "tiny": ModelShape(
        vision=VisionShape(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128),
        text=TextShape(
            hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=256, vocab_size=768
        ),
    ),
    # `mpo demo` (measured in docs/demo_notes.md): small enough to SFT + MPO on 2 CPU cores in minutes,
    # LLM widths multiples of 128 so AWQ quantizes every decoder linear with the standard group size 128.
    "demo": ModelShape(
        vision=VisionShape(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, image_size=224),
        text=TextShape(
            hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=256, vocab_size=768
        ),
    ),
    # `demo` with 4x the LLM (256 wide, 4 layers) and a 4-layer, 128-wide vision tower: the demo's
    # capacity experiment (`mpo demo --set shape=demo_large`, docs/demo_notes.md round 5).
    "demo_large": ModelShape(
        vision=VisionShape(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=256, image_size=224),
        text=TextShape(
            hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=512, vocab_size=768
        ),
    ),
    # InternVL2.5-1B: InternViT-300M + Qwen2.5-0.5B-Instruct.
    "1b": ModelShape(
        vision=INTERNVIT_300M,
        text=TextShape(
            hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2, intermediate_size=4864, vocab_size=151674
        ),
    ),
    # InternVL2.5-4B: InternViT-300M + Qwen2.5-3B-Instruct.
    "4b": ModelShape(
        vision=INTERNVIT_300M,
        text=TextShape(
            hidden_size=2048, num_layers=36, num_heads=16, num_kv_heads=2, intermediate_size=11008, vocab_size=151674
        ),
    ),
}


def internvl_config(
    shape: ModelShape | str,
    *,
    image_token_id: int,
    pad_token_id: int | None = None,
    eos_token_id: int | None = None,
    vocab_size: int | None = None,
) -> InternVLConfig:
    """Native `InternVLConfig` for a shape; `vocab_size` overrides the shape's (tiny tokenizers vary)."""
    if isinstance(shape, str):
        if shape not in SHAPES:
            raise ValueError(f"unknown model shape {shape!r}; choose one of {sorted(SHAPES)}")
        shape = SHAPES[shape]
    v, t = shape.vision, shape.text
    vision = InternVLVisionConfig(
        hidden_size=v.hidden_size,
        num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads,
        intermediate_size=v.intermediate_size,
        image_size=v.image_size,
        patch_size=v.patch_size,
        attention_bias=True,
        use_qk_norm=False,
        norm_type="layer_norm",
        layer_norm_eps=1e-6,
        use_mean_pooling=True,
        layer_scale_init_value=0.1,
    )
    text = Qwen2Config(
        hidden_size=t.hidden_size,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_kv_heads,
        intermediate_size=t.intermediate_size,
        vocab_size=vocab_size or t.vocab_size,
        max_position_embeddings=t.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta},
        rms_norm_eps=1e-6,
        tie_word_embeddings=shape.tie_word_embeddings,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=None,
    )
    return InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        image_seq_length=shape.tokens_per_tile,
        downsample_ratio=shape.downsample_ratio,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=shape.tie_word_embeddings,
    )
