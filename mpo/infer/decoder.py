"""Forward passes of the fast engine over a Hugging Face InternVL model's own modules.

Nothing is forked: the vision tower, projector, embeddings, norms, projections, MLPs, rotary table
and lm_head are the model's modules, called as they are (so an AWQ model whose linears are
`WQLinear` runs unchanged). What this module owns is the glue between them: where keys and values
go (a batch-1 prefix buffer in prefill, the static per-row cache in decode) and how attention
reads them.

Two decode paths compute the same function:

- `decode_logits_torch`: the layer's modules plus `scaled_dot_product_attention`, op for op what
  `Qwen2DecoderLayer` does (the CPU path, and the GPU fallback).
- `decode_logits_fused`: on CUDA in bf16/fp16, fused residual+RMSNorm and SiLU*mul kernels
  (`mpo.infer.kernels`), rotary + cache write and split-KV attention (`decode_ops`): ~10 launches
  per layer instead of ~45, which is what makes a CUDA-graph step weight-bandwidth bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

from mpo.infer.decode_linears import decode_linear, fuse_linears
from mpo.infer.kv_cache import PrefixKV, StaticKVCache

__all__ = ["ModelPieces", "decode_logits_fused", "decode_logits_torch", "embed_prompt", "fuse_linears", "prefill",
           "prefill_many"]


@dataclass
class _FusedLayer:
    """Decode-time stand-ins for a layer's projections; None means the model's own module runs."""

    qkv: nn.Module | None = None  # q/k/v in one GEMM
    gate_up: nn.Module | None = None  # gate/up in one GEMM
    o: nn.Module | None = None  # o_proj in the decode layout (AWQ models)
    down: nn.Module | None = None  # down_proj in the decode layout (AWQ models)


class ModelPieces:
    """The parts of an `InternVLForConditionalGeneration` the engine runs, checked once.

    Supports Qwen2/Llama-style decoder layers (the InternVL2.5 1B/4B and InternVL3 LLMs): full
    attention, separate q/k/v/o projections, optional q/k norms, RMSNorm before attention and MLP.

    Args:
        model: the loaded model (eval mode; any device / dtype).
    """

    def __init__(self, model: nn.Module):
        if not hasattr(model, "model") or not hasattr(model.model, "language_model"):
            raise ValueError(f"{type(model).__name__} is not an InternVL model (no model.language_model)")
        self.model = model
        lm = model.model.language_model
        self.embed_tokens = lm.embed_tokens
        self.layers = list(lm.layers)
        self.norm = lm.norm
        self.rotary = lm.rotary_emb
        self.lm_head = model.lm_head
        self.image_token_id = model.config.image_token_id
        text = model.config.text_config
        layer_types = getattr(text, "layer_types", None) or ["full_attention"] * len(self.layers)
        if any(t != "full_attention" for t in layer_types):
            raise ValueError("the fast engine supports full-attention layers only (sliding-window layers found); "
                             "use backend='hf'")
        attn = self.layers[0].self_attn
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling"):
            if not hasattr(attn, name):
                raise ValueError(f"unsupported attention module {type(attn).__name__} (no {name}); use backend='hf'")
        self.head_dim = attn.head_dim
        self.num_heads = text.num_attention_heads
        self.num_kv_heads = text.num_key_value_heads
        self.scaling = attn.scaling
        self.max_positions = text.max_position_embeddings
        self.has_qk_norm = hasattr(attn, "q_norm")
        self.vocab_size = self.lm_head.out_features
        self.fused = [_FusedLayer() for _ in self.layers]

    def fuse_projections(self) -> None:
        """Give each layer one GEMM for q/k/v and one for gate/up in decode (`decode_linear`: views
        for bf16 linears; for AWQ linears on CUDA, copies in the K-major decode layout, and o/down
        repacked too). The model itself keeps working unchanged (prefill runs its own modules)."""
        for slot, layer in zip(self.fused, self.layers):
            a, m = layer.self_attn, layer.mlp
            if slot.qkv is None:
                slot.qkv = decode_linear([a.q_proj, a.k_proj, a.v_proj])
            if slot.o is None:
                slot.o = decode_linear([a.o_proj])
            if hasattr(m, "gate_proj") and hasattr(m, "up_proj"):
                if slot.gate_up is None:
                    slot.gate_up = decode_linear([m.gate_proj, m.up_proj])
                if slot.down is None:
                    slot.down = decode_linear([m.down_proj])

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def fused_decode_supported(self) -> bool:
        """Whether `decode_logits_fused` can run this model (CUDA, 16-bit, plain Qwen2 layers)."""
        if self.device.type != "cuda":
            return False
        from mpo.infer import decode_ops  # imports Triton: only where the kernels can run
        from mpo.infer.kernels import KERNELS_INTERPRETED

        if KERNELS_INTERPRETED:  # TRITON_INTERPRET=1 at import: the kernels would run on the host
            return False

        norms = [self.norm] + [n for layer in self.layers
                               for n in (layer.input_layernorm, layer.post_attention_layernorm)]
        mlp = self.layers[0].mlp
        return (not self.has_qk_norm
                and all(hasattr(n, "variance_epsilon") and hasattr(n, "weight") for n in norms)
                and all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj"))
                and getattr(mlp, "act_fn", None).__class__.__name__ in ("SiLU", "SiLUActivation")
                and decode_ops.fused_ops_supported(self.head_dim, self.num_heads, self.num_kv_heads, self.dtype))

    def new_cache(self, num_rows: int, capacity: int) -> StaticKVCache:
        return StaticKVCache(num_layers=len(self.layers), num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                             num_rows=num_rows, capacity=capacity, dtype=self.dtype, device=self.device)


def embed_prompt(pieces: ModelPieces, input_ids_T: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
    """Token embeddings [1, T, H] with image features placed at the `<IMG_CONTEXT>` tokens.

    pixel_values: [tiles, 3, side, side] or None; the vision tower and projector run in their own
    dtype (bf16 for an AWQ model too), once per prompt.
    """
    embeds = pieces.embed_tokens(input_ids_T[None])
    is_image = input_ids_T == pieces.image_token_id
    num_image_tokens = int(is_image.sum())
    if pixel_values is None:
        if num_image_tokens:
            raise ValueError(f"prompt has {num_image_tokens} image tokens but no pixel values")
        return embeds
    features = pieces.model.model.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output
    features = features.reshape(-1, features.shape[-1]).to(embeds.dtype)
    if features.shape[0] != num_image_tokens:
        raise ValueError(f"prompt has {num_image_tokens} image tokens but its {pixel_values.shape[0]} tiles give "
                         f"{features.shape[0]} features: tiles and placeholders disagree")
    embeds[0, is_image] = features
    return embeds


def _layer_forward(layer: nn.Module, hidden_BTH: torch.Tensor, cos, sin, pieces: ModelPieces, attend) -> torch.Tensor:
    """One decoder layer, op for op as `Qwen2DecoderLayer`; `attend(q, k, v)` does the attention.

    q/k/v reach `attend` as [B, heads, T, D] after rotary; it returns [B, heads, T, D].
    """
    attn = layer.self_attn
    batch, length, _ = hidden_BTH.shape
    x = layer.input_layernorm(hidden_BTH)
    shape = (batch, length, -1, pieces.head_dim)
    q, k, v = attn.q_proj(x).view(shape), attn.k_proj(x).view(shape), attn.v_proj(x).view(shape)
    if pieces.has_qk_norm:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    out = attend(q, k, v).transpose(1, 2).reshape(batch, length, -1).contiguous()
    hidden_BTH = hidden_BTH + attn.o_proj(out)
    return hidden_BTH + layer.mlp(layer.post_attention_layernorm(hidden_BTH))


@torch.no_grad()
def prefill(pieces: ModelPieces, input_ids_T: torch.Tensor, pixel_values: torch.Tensor | None = None) -> PrefixKV:
    """Run one prompt at batch 1: its keys/values for every layer and its next-token logits.

    Causal SDPA over the prompt alone (no cache to mask), as `transformers` does for a prefill.
    """
    embeds = embed_prompt(pieces, input_ids_T, pixel_values)
    length = embeds.shape[1]
    positions = torch.arange(length, device=embeds.device)[None]
    cos, sin = pieces.rotary(embeds, positions)
    shape = (len(pieces.layers), pieces.num_kv_heads, length, pieces.head_dim)
    keys = torch.empty(shape, dtype=pieces.dtype, device=embeds.device)
    values = torch.empty_like(keys)
    hidden = embeds
    for i, layer in enumerate(pieces.layers):
        def attend(q, k, v, i=i):
            keys[i], values[i] = k[0], v[0]
            return F.scaled_dot_product_attention(q, k, v, is_causal=length > 1, scale=pieces.scaling,
                                                  enable_gqa=pieces.num_heads != pieces.num_kv_heads)
        hidden = _layer_forward(layer, hidden, cos, sin, pieces, attend)
    logits = pieces.lm_head(pieces.norm(hidden[:, -1:]))
    return PrefixKV(keys, values, logits[0, -1].float())


@torch.no_grad()
def prefill_many(pieces: ModelPieces, input_ids: list[list[int]],
                 pixel_values: list[torch.Tensor | None]) -> list[PrefixKV]:
    """`prefill` of several prompts in one forward pass (one vision-tower call, one pass per layer).

    The prompts are right-padded to the longest. Under the causal mask a real token attends only to
    tokens before it, which are all real, so each prompt's keys/values and last-token logits are
    those of its own batch-1 `prefill` (up to the rounding of batched GEMMs; tested). On a GPU a
    batch-1 prefill of a small model is launch-bound: this runs N prompts for about the launches of one.

    Args:
        input_ids: one token list per prompt (each non-empty).
        pixel_values: per prompt, [tiles, 3, side, side] or None.
    """
    if not input_ids or len(input_ids) != len(pixel_values) or min(len(ids) for ids in input_ids) < 1:
        raise ValueError("prefill_many needs as many pixel entries as prompts, and no empty prompt")
    device, count = pieces.device, len(input_ids)
    lengths = [len(ids) for ids in input_ids]
    width = max(lengths)
    pad_id = 0 if pieces.image_token_id != 0 else 1  # any ordinary token: padding is never read
    ids_NT = torch.full((count, width), pad_id, dtype=torch.long)
    for i, ids in enumerate(input_ids):
        ids_NT[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    ids_NT = ids_NT.to(device)
    embeds = pieces.embed_tokens(ids_NT)
    num_image_tokens = [ids.count(pieces.image_token_id) for ids in input_ids]
    tiles = [0 if p is None else p.shape[0] for p in pixel_values]
    for i, (n, t) in enumerate(zip(num_image_tokens, tiles)):
        if n and not t:
            raise ValueError(f"prompt {i} has {n} image tokens but no pixel values")
    if sum(tiles):
        pixels = torch.cat([p.to(device) for p in pixel_values if p is not None])
        features = pieces.model.model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output
        features = features.reshape(-1, features.shape[-1]).to(embeds.dtype)
        per_tile = features.shape[0] // sum(tiles)
        bad = [i for i, (n, t) in enumerate(zip(num_image_tokens, tiles)) if n != t * per_tile]
        if bad:
            raise ValueError(f"prompt {bad[0]} has {num_image_tokens[bad[0]]} image tokens but its {tiles[bad[0]]} "
                             f"tiles give {tiles[bad[0]] * per_tile} features: tiles and placeholders disagree")
        embeds[ids_NT == pieces.image_token_id] = features  # row-major: prompt order, as concatenated
    positions = torch.arange(width, device=device)[None].expand(count, -1)
    cos, sin = pieces.rotary(embeds, positions)
    shape = (len(pieces.layers), count, pieces.num_kv_heads, width, pieces.head_dim)
    keys = torch.empty(shape, dtype=pieces.dtype, device=device)
    values = torch.empty_like(keys)
    hidden = embeds
    for i, layer in enumerate(pieces.layers):
        def attend(q, k, v, i=i):
            keys[i], values[i] = k, v
            return F.scaled_dot_product_attention(q, k, v, is_causal=width > 1, scale=pieces.scaling,
                                                  enable_gqa=pieces.num_heads != pieces.num_kv_heads)
        hidden = _layer_forward(layer, hidden, cos, sin, pieces, attend)
    last = torch.tensor([n - 1 for n in lengths], device=device)
    logits = pieces.lm_head(pieces.norm(hidden[torch.arange(count, device=device), last][:, None]))[:, 0].float()
    return [PrefixKV(keys[:, i, :, :n], values[:, i, :, :n], logits[i]) for i, n in enumerate(lengths)]


def decode_logits_torch(pieces: ModelPieces, cache: StaticKVCache, tokens_B: torch.Tensor, positions_B: torch.Tensor,
                        *, kv_limit: int | None = None, same_length: bool = False) -> torch.Tensor:
    """Logits [B, V] (fp32) for one new token per row at positions_B; writes its K/V to `cache`.

    kv_limit: attend over cache slots [0, kv_limit) only (eager CPU path; must exceed every row's
    position). same_length: every row sits at position kv_limit - 1, so no mask is needed (then
    SDPA sees exactly what `transformers` gives it in a decode step).
    """
    rows = tokens_B.shape[0]
    hidden = pieces.embed_tokens(tokens_B[:, None])
    cos, sin = pieces.rotary(hidden, positions_B[:, None])
    limit = kv_limit or cache.capacity
    mask = None
    if not same_length:
        slots = torch.arange(limit, device=tokens_B.device)
        mask = (slots[None, :] <= positions_B[:, None]).view(rows, 1, 1, limit)
    group = pieces.num_heads // pieces.num_kv_heads
    for i, layer in enumerate(pieces.layers):
        def attend(q, k, v, i=i):
            cache.write(i, positions_B, k[:, :, 0], v[:, :, 0])
            keys, values = cache.keys[i, :, :, :limit], cache.values[i, :, :, :limit]
            if mask is None:
                return F.scaled_dot_product_attention(q, keys, values, scale=pieces.scaling, enable_gqa=group > 1)
            # One query token: fold the group's query heads into the query axis instead of repeating K/V.
            out = F.scaled_dot_product_attention(q.reshape(rows, pieces.num_kv_heads, group, -1), keys, values,
                                                 attn_mask=mask, scale=pieces.scaling)
            return out.reshape(rows, pieces.num_heads, 1, -1)
        hidden = _layer_forward(layer, hidden, cos, sin, pieces, attend)
    return pieces.lm_head(pieces.norm(hidden))[:, 0].float()


def decode_logits_fused(pieces: ModelPieces, cache: StaticKVCache, tokens_B: torch.Tensor, positions_B: torch.Tensor,
                        *, num_splits: int) -> torch.Tensor:
    """`decode_logits_torch` with fused CUDA kernels (see the module docstring); logits [B, V] fp32."""
    from mpo.infer import decode_ops
    from mpo.infer.kernels import rms_norm, silu_mul

    hidden = pieces.embed_tokens(tokens_B)  # [B, H]
    cos, sin = pieces.rotary(hidden[:, None], positions_B[:, None])
    cos, sin = cos[:, 0].contiguous(), sin[:, 0].contiguous()
    lengths = positions_B + 1
    q_width = pieces.num_heads * pieces.head_dim
    kv_width = pieces.num_kv_heads * pieces.head_dim
    residual = None
    for i, (layer, fused) in enumerate(zip(pieces.layers, pieces.fused)):
        attn, mlp = layer.self_attn, layer.mlp
        ln1, ln2 = layer.input_layernorm, layer.post_attention_layernorm
        x, residual = rms_norm(hidden, ln1.weight, ln1.variance_epsilon, residual)
        if fused.qkv is not None:
            qkv = fused.qkv(x)
            q, k, v = qkv[:, :q_width], qkv[:, q_width:q_width + kv_width], qkv[:, q_width + kv_width:]
        else:
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        q = decode_ops.rope_store(q, k, v, cos, sin, positions_B, cache.keys[i], cache.values[i])
        out = decode_ops.decode_attention(q, cache.keys[i], cache.values[i], lengths, pieces.scaling, num_splits)
        o_proj = attn.o_proj if fused.o is None else fused.o
        x, residual = rms_norm(o_proj(out.reshape(-1, q_width)), ln2.weight, ln2.variance_epsilon, residual)
        if fused.gate_up is not None:
            act = silu_mul(fused.gate_up(x))
        else:
            act = silu_mul(mlp.gate_proj(x), mlp.up_proj(x))
        hidden = (mlp.down_proj if fused.down is None else fused.down)(act)
    x, _ = rms_norm(hidden, pieces.norm.weight, pieces.norm.variance_epsilon, residual)
    return pieces.lm_head(x).float()
