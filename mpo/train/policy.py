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


# Under ZeRO-3, at least this many tokens per LM-head chunk (4096 x 152k vocab fp32 = 2.5 GB).
ZERO3_MIN_CHUNK = 4096


def unwrap_internvl(model: nn.Module) -> InternVLForConditionalGeneration:
    """The `InternVLForConditionalGeneration` inside DeepSpeed / PEFT wrappers."""
    for _ in range(8):
        if isinstance(model, InternVLForConditionalGeneration):
            return model
        if hasattr(model, "get_base_model"):  # PEFT
            model = model.get_base_model()
        elif isinstance(model, PreferenceLogps):
            model = model.model
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


def _sequence_logps(internvl: nn.Module, input_ids, attention_mask, labels, pixel_values, chunk_size: int,
                    always_run_vision: bool, paired: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs and token counts of every row ([2B] each; [B] when not `paired`)."""
    copies = 2 if paired else 1
    inner = internvl.model
    inputs_embeds = inner.get_input_embeddings()(input_ids)
    image_token_id = internvl.config.image_token_id
    if pixel_values is not None:
        feats = image_features(internvl, pixel_values).to(inputs_embeds.dtype)
        mask = (input_ids == image_token_id).unsqueeze(-1)
        expected = int(mask.sum())
        if expected != copies * feats.shape[0]:
            raise ValueError(f"image tokens in batch ({expected}) != {copies} x image features ({feats.shape[0]})")
        inputs_embeds = inputs_embeds.masked_scatter(mask, torch.cat([feats] * copies))
    elif always_run_vision:
        size = internvl.config.vision_config.image_size
        dummy = torch.zeros(1, 3, size[0], size[1], device=inputs_embeds.device, dtype=inputs_embeds.dtype)
        inputs_embeds = inputs_embeds + 0.0 * image_features(internvl, dummy).sum().to(inputs_embeds.dtype)
    out = inner.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False)
    hidden, labels = shift_for_next_token(out.last_hidden_state, labels)
    min_chunks = 1
    if hasattr(internvl.lm_head.weight, "ds_id") and dist.is_initialized():
        # ZeRO-3 all-gathers the head's weight (V x D) on every call, and backward recomputes each
        # chunk: large chunks keep that to a call or two per pass. All ranks must also call it
        # equally often: agree on the largest chunk count (one tiny all-reduce).
        chunk_size = max(chunk_size, ZERO3_MIN_CHUNK)
        n = torch.tensor([math.ceil(int((labels != -100).sum()) / chunk_size)], device=hidden.device)
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
        min_chunks = int(n)
    return sequence_logps(hidden, internvl.lm_head, labels, chunk_size=chunk_size, min_chunks=min_chunks)


class PreferenceLogps(nn.Module):
    """The module DeepSpeed wraps: forward = response log-probs of a preference batch.

    Running the whole computation as one module forward lets ZeRO-3 trace the order in which
    submodules run and prefetch their parameters, which calling submodules from outside does not.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model  # InternVLForConditionalGeneration, or a PEFT model around one

    def forward(self, input_ids, attention_mask, labels, pixel_values=None, chunk_size: int = 256,
                always_run_vision: bool = True, paired: bool = True):
        return _sequence_logps(unwrap_internvl(self.model), input_ids, attention_mask, labels, pixel_values,
                               chunk_size, always_run_vision, paired)


def batch_logps(model: nn.Module, batch: PreferenceBatch, *, chunk_size: int = 256,
                always_run_vision: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed response log-probs of a batch: (chosen [B], rejected [B], chosen_tokens [B], rejected_tokens [B]).

    `model` is a DeepSpeed engine around `PreferenceLogps` (called as a module, so its hooks run), a
    `PreferenceLogps`, or a plain / PEFT InternVL model. `always_run_vision` runs the vision tower on a
    dummy tile when the batch has no image, adding zero: under ZeRO-3 every rank must run the same
    modules (their parameters are gathered collectively).
    """
    if not batch.paired:
        raise ValueError("batch_logps needs a paired batch (chosen and rejected rows); use chosen_logps")
    logps, num_tokens = _row_logps(model, batch, chunk_size, always_run_vision)
    b = batch.num_pairs
    return logps[:b], logps[b:], num_tokens[:b], num_tokens[b:]


def chosen_logps(model: nn.Module, batch: PreferenceBatch, *, chunk_size: int = 256,
                 always_run_vision: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs and token counts of the chosen responses only ([B] each): the SFT-only path.

    Runs the model on `batch.chosen_only()` (half the rows of `batch_logps`); its results equal
    `batch_logps`'s chosen half (tested).
    """
    return _row_logps(model, batch.chosen_only(), chunk_size, always_run_vision)


def _row_logps(model, batch: PreferenceBatch, chunk_size: int, always_run_vision: bool):
    args = (batch.input_ids, batch.attention_mask, batch.labels, batch.pixel_values)
    if isinstance(model, PreferenceLogps) or isinstance(getattr(model, "module", None), PreferenceLogps):
        return model(*args, chunk_size=chunk_size, always_run_vision=always_run_vision, paired=batch.paired)
    return _sequence_logps(unwrap_internvl(model), *args, chunk_size, always_run_vision, batch.paired)
