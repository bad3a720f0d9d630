"""Response log-probs of a preference batch through a native InternVL model.

The vision tower runs once per pair (not once per chosen and once per rejected copy); the features
are scattered into both rows. The LM head is applied in chunks to the labelled positions only
(`mpo.train.logps.sequence_logps`), so full-vocabulary logits are never materialised.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from transformers import InternVLForConditionalGeneration

from mpo.data.collate import PreferenceBatch
from mpo.train.logps import sequence_logps, shift_for_next_token


def unwrap_internvl(model: nn.Module) -> InternVLForConditionalGeneration:
    """The `InternVLForConditionalGeneration` inside DeepSpeed / PEFT wrappers."""
    for _ in range(8):
        if isinstance(model, InternVLForConditionalGeneration):
            return model
        if hasattr(model, "get_base_model"):  # PEFT
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), nn.Module):  # DeepSpeed engine
            model = model.module
        else:
            break
    raise TypeError(f"{type(model).__name__} does not wrap an InternVLForConditionalGeneration")


def image_features(internvl: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected image features [num_tiles * tokens_per_tile, hidden] for stacked tiles."""
    out = internvl.model.get_image_features(
        pixel_values=pixel_values,
        vision_feature_layer=internvl.config.vision_feature_layer,
        vision_feature_select_strategy=internvl.config.vision_feature_select_strategy,
        return_dict=True,
    )
    feats = out.pooler_output
    return feats.reshape(-1, feats.shape[-1])


def batch_logps(model: nn.Module, batch: PreferenceBatch, *, chunk_size: int = 256,
                always_run_vision: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed response log-probs of a batch: (chosen [B], rejected [B], chosen_tokens [B], rejected_tokens [B]).

    `always_run_vision` runs the vision tower on a dummy tile when the batch has no image, adding
    zero to the result: under ZeRO-3 every rank must run the same modules (their parameters are
    gathered collectively), and it keeps the tower in every step's graph.
    """
    internvl = unwrap_internvl(model)
    inner = internvl.model
    embed = inner.get_input_embeddings()
    inputs_embeds = embed(batch.input_ids)
    image_token_id = internvl.config.image_token_id
    if batch.pixel_values is not None:
        feats = image_features(internvl, batch.pixel_values).to(inputs_embeds.dtype)
        mask = (batch.input_ids == image_token_id).unsqueeze(-1)
        expected = int(mask.sum())
        if expected != 2 * feats.shape[0]:
            raise ValueError(f"image tokens in batch ({expected}) != 2 x image features ({feats.shape[0]})")
        inputs_embeds = inputs_embeds.masked_scatter(mask, torch.cat([feats, feats]))
    elif always_run_vision:
        size = internvl.config.vision_config.image_size
        dummy = torch.zeros(1, 3, size[0], size[1], device=inputs_embeds.device, dtype=inputs_embeds.dtype)
        inputs_embeds = inputs_embeds + 0.0 * image_features(internvl, dummy).sum().to(inputs_embeds.dtype)
    out = inner.language_model(inputs_embeds=inputs_embeds, attention_mask=batch.attention_mask, use_cache=False)
    hidden, labels = shift_for_next_token(out.last_hidden_state, batch.labels)
    min_chunks = 1
    if hasattr(internvl.lm_head.weight, "ds_id") and dist.is_initialized():
        # ZeRO-3: the head's parameters are gathered collectively on every call, so all ranks must
        # call it equally often: agree on the largest chunk count (one tiny all-reduce).
        n = torch.tensor([math.ceil(int((labels != -100).sum()) / chunk_size)], device=hidden.device)
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
        min_chunks = int(n)
    logps, num_tokens = sequence_logps(hidden, internvl.lm_head, labels, chunk_size=chunk_size, min_chunks=min_chunks)
    b = batch.num_pairs
    return logps[:b], logps[b:], num_tokens[:b], num_tokens[b:]
