"""Reference log-probs π_0(y|x), three ways (chosen by `reference.strategy`):

- `frozen`: a separate frozen copy of the starting model (partitioned like the policy under ZeRO-3).
- `cached`: log-probs computed once, before training, by a frozen copy that is then freed; stored on
  disk keyed by a fingerprint of model + data + template settings and reused by later runs.
- `lora`: the policy itself with its LoRA adapters disabled (no second copy at all).

All three return the same numbers for the same model and batch; that is tested.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from mpo.data.collate import PreferenceBatch, collate_pairs
from mpo.data.dataset import MMPRDataset, Rejected
from mpo.train.policy import batch_logps


class FrozenReference:
    """A frozen model (or DeepSpeed inference engine) evaluated under no_grad."""

    def __init__(self, model: nn.Module, *, chunk_size: int):
        self.model = model
        self.chunk_size = chunk_size
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def logps(self, batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
        chosen, rejected, _, _ = batch_logps(self.model, batch, chunk_size=self.chunk_size)
        return chosen.float(), rejected.float()


class LoraReference:
    """The policy with adapters disabled: π_0 is the base model under the LoRA deltas."""

    def __init__(self, peft_model: nn.Module, *, chunk_size: int):
        if not hasattr(peft_model, "disable_adapter"):
            raise ValueError("reference.strategy=lora needs a PEFT model (model.lora.enabled=true)")
        self.model = peft_model
        self.chunk_size = chunk_size

    @torch.no_grad()
    def logps(self, batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
        was_training = self.model.training
        self.model.eval()  # no dropout in the reference
        with self.model.disable_adapter():
            chosen, rejected, _, _ = batch_logps(self.model, batch, chunk_size=self.chunk_size)
        self.model.train(was_training)
        return chosen.float(), rejected.float()


class CachedReference:
    """Reference log-probs looked up by dataset index from a precomputed table."""

    def __init__(self, chosen: torch.Tensor, rejected: torch.Tensor):
        self.chosen, self.rejected = chosen, rejected

    def logps(self, batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
        idx = batch.indices.cpu()
        chosen, rejected = self.chosen[idx], self.rejected[idx]
        if torch.isnan(chosen).any() or torch.isnan(rejected).any():
            raise RuntimeError("cached reference log-probs missing for a batch item (it was rejected while caching)")
        device = batch.input_ids.device
        return chosen.to(device), rejected.to(device)


def _file_digest(path: Path, h) -> None:
    h.update(path.name.encode())
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)


def cache_fingerprint(model_dir: str | Path, dataset: MMPRDataset, extra: dict) -> str:
    """Hash of what reference log-probs depend on: weights, tokenizer, annotations, encoding settings.

    Weight files are hashed by their safetensors headers (names, shapes, offsets) plus size and the
    first and last MiB, which identifies a checkpoint without reading gigabytes.
    """
    h = hashlib.sha256()
    model_dir = Path(model_dir)
    for path in sorted(model_dir.glob("*.json")) + sorted(model_dir.glob("*.jinja")):
        _file_digest(path, h)
    for path in sorted(model_dir.glob("*.safetensors")):
        size = path.stat().st_size
        with path.open("rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read())
        h.update(str(size).encode())
    for src in dataset.sources:
        _file_digest(src.annotation, h)
        h.update(f"{src.name}|{src.root}|{src.repeat_time}|{src.max_dynamic_patch}".encode())
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    h.update(json.dumps([(r.source_index, r.line) for r in dataset.refs]).encode())
    return h.hexdigest()[:20]


@torch.no_grad()
def compute_reference_table(frozen: FrozenReference, dataset: MMPRDataset, *, rank: int, world_size: int,
                            device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference log-probs for every dataset item ([N] chosen, [N] rejected; NaN where rejected).

    Each rank computes every world_size-th item; results are summed across ranks. Every rank runs the
    same number of forwards (a rejected item is replaced by the previous valid one and its result
    dropped), which ZeRO-3's collective parameter gathers need.
    """
    n = len(dataset)
    chosen = torch.full((n,), float("nan"), dtype=torch.float64)
    rejected = torch.full((n,), float("nan"), dtype=torch.float64)
    mine = list(range(rank, n, world_size))
    steps = (n + world_size - 1) // world_size
    last_valid = None
    for step in range(steps):
        index = mine[step] if step < len(mine) else None
        item = dataset[index] if index is not None else None
        keep = item is not None and not isinstance(item, Rejected)
        if keep:
            last_valid = item
        sample = item if keep else last_valid
        if sample is None:  # nothing valid yet: find any valid item to keep ranks in step
            sample = next((x for x in (dataset[i] for i in range(n)) if not isinstance(x, Rejected)), None)
            if sample is None:
                raise ValueError("no record of the dataset could be encoded")
            last_valid = sample
        batch = collate_pairs([sample], dataset.template.pad_id).to(device, dtype)
        c, r = frozen.logps(batch)
        if keep:
            chosen[index], rejected[index] = float(c[0]), float(r[0])
    if world_size > 1:
        # NaN-safe sum: each item is computed by exactly one rank.
        table = torch.stack([chosen, rejected])
        have = ~torch.isnan(table)
        values = torch.where(have, table, torch.zeros_like(table))
        dist.all_reduce(values)
        counts = have.double()
        dist.all_reduce(counts)
        table = torch.where(counts > 0, values, torch.full_like(values, float("nan")))
        chosen, rejected = table[0], table[1]
    return chosen.float(), rejected.float()


def load_or_compute_cache(path: Path, compute, *, rank: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Load the cache at `path`, or compute it (all ranks), with rank 0 writing it atomically.

    Returns (chosen, rejected, was_cached).
    """
    if path.is_file():
        data = torch.load(path, map_location="cpu", weights_only=True)
        return data["chosen"], data["rejected"], True
    chosen, rejected = compute()
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"chosen": chosen, "rejected": rejected}, tmp)
        tmp.replace(path)
    return chosen, rejected, False
