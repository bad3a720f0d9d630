"""Preference batches: one typed batch flows from collate to the training loop.

Layout ("paired", the peers' layout with images encoded once): rows 0..B-1 are prompt+chosen,
rows B..2B-1 are prompt+rejected, right-padded with the tokenizer's pad id. Each pair's tiles appear
once in `pixel_values`; the policy encodes them once and places the features in both rows.
`chosen_only()` drops the rejected rows (the trainer's SFT-only path, which needs no rejected response).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from mpo.data.dataset import PreferenceSample
from mpo.data.template import IGNORE_INDEX


@dataclass
class PreferenceBatch:
    input_ids: torch.Tensor  # [2B, T] long: chosen rows then rejected rows
    attention_mask: torch.Tensor  # [2B, T] long, 1 on real tokens
    labels: torch.Tensor  # [2B, T] long, IGNORE_INDEX off the responses
    pixel_values: torch.Tensor | None  # [num_tiles, 3, H, W], each pair's tiles once, pair order
    num_tiles: list[int]  # tiles per pair
    indices: torch.Tensor  # [B] dataset indices (keys of cached reference log-probs)
    ref_chosen_logps: torch.Tensor | None = None  # [B] fp32, when cached
    ref_rejected_logps: torch.Tensor | None = None
    paired: bool = True  # False: rows are prompt+chosen only (`chosen_only`)

    def chosen_only(self) -> "PreferenceBatch":
        """The chosen rows alone ([B, T'], T' = their longest row), same tiles; `paired` False."""
        if not self.paired:
            return self
        b = self.num_pairs
        width = max(1, int(self.attention_mask[:b].sum(dim=1).max()))
        return PreferenceBatch(
            input_ids=self.input_ids[:b, :width], attention_mask=self.attention_mask[:b, :width],
            labels=self.labels[:b, :width], pixel_values=self.pixel_values, num_tiles=self.num_tiles,
            indices=self.indices, ref_chosen_logps=self.ref_chosen_logps, ref_rejected_logps=None, paired=False,
        )

    @property
    def num_pairs(self) -> int:
        return int(self.indices.shape[0])

    @property
    def num_tokens(self) -> int:
        """Real (non-pad) tokens in the batch: both responses and both prompts (chosen only when unpaired)."""
        return int(self.attention_mask.sum())

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "PreferenceBatch":
        """Move tensors to `device`; pixel values also cast to `dtype` when given."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value.to(device, non_blocking=True)
                if f.name == "pixel_values" and dtype is not None:
                    value = value.to(dtype)
            out[f.name] = value
        return PreferenceBatch(**out)


def collate_pairs(samples: list[PreferenceSample], pad_id: int) -> PreferenceBatch:
    """Pad a list of encoded pairs into one `PreferenceBatch` (right padding)."""
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    rows = [s.prompt_ids + s.chosen_ids for s in samples] + [s.prompt_ids + s.rejected_ids for s in samples]
    resp = [s.chosen_ids for s in samples] + [s.rejected_ids for s in samples]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, response) in enumerate(zip(rows, resp)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
        labels[i, len(row) - len(response): len(row)] = torch.tensor(response)
    pixels = [s.pixel_values for s in samples if s.pixel_values is not None]
    return PreferenceBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=labels,
        pixel_values=torch.cat(pixels) if pixels else None,
        num_tiles=[0 if s.pixel_values is None else int(s.pixel_values.shape[0]) for s in samples],
        indices=torch.tensor([s.index for s in samples], dtype=torch.long),
    )
