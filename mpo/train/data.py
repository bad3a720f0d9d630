"""Deterministic, resumable per-rank data streams of preference pairs.

Every rank reads its own infinite stream of dataset indices: epoch e is a permutation seeded by
(seed, e), and rank r takes every world-th index of it (the tail that does not divide evenly is
dropped so ranks stay in step). The stream position (items consumed, rejects included) is the whole
data state: a resumed run restarts each rank's stream at its saved position and sees exactly the
items an uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler

from mpo.data.collate import PreferenceBatch, collate_pairs
from mpo.data.dataset import MMPRDataset, PreferenceSample, Rejected
from mpo.data.rejects import RejectLog


class RankStream(Sampler[int]):
    """Infinite index stream of one rank, starting at `start` (items already consumed)."""

    def __init__(self, num_items: int, *, seed: int, rank: int, world_size: int, start: int = 0):
        if num_items < world_size:
            raise ValueError(f"dataset has {num_items} usable records, fewer than the {world_size} ranks")
        self.num_items, self.seed, self.rank, self.world_size, self.start = num_items, seed, rank, world_size, start
        self.per_rank = num_items // world_size

    def __iter__(self) -> Iterator[int]:
        position = self.start
        epoch, perm = None, None
        while True:
            e, offset = divmod(position, self.per_rank)
            if e != epoch:
                epoch = e
                perm = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed * 100_003 + e))
            yield int(perm[self.rank + offset * self.world_size])
            position += 1

    def __len__(self) -> int:  # DataLoader asks; the stream is infinite
        return 2**62


def _identity(item):
    return item


class PairBatches:
    """Micro-batches of valid pairs for one rank; rejected items are counted, logged and skipped.

    Args:
        dataset: the MMPR dataset.
        micro_batch_size: valid pairs per micro-batch.
        seed, rank, world_size, start: see `RankStream`.
        num_workers: DataLoader workers decoding images ahead of the loop (order is preserved).
        rejects: where late rejects (bad images, too-long prompts) go.
    """

    def __init__(self, dataset: MMPRDataset, *, micro_batch_size: int, seed: int, rank: int, world_size: int,
                 start: int = 0, num_workers: int = 0, rejects: RejectLog | None = None):
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.position = start
        self.rejects = rejects if rejects is not None else RejectLog()
        self.pad_id = dataset.template.pad_id
        sampler = RankStream(len(dataset), seed=seed, rank=rank, world_size=world_size, start=start)
        self._loader = DataLoader(dataset, sampler=sampler, batch_size=None, collate_fn=_identity,
                                  num_workers=num_workers, prefetch_factor=4 if num_workers else None,
                                  persistent_workers=False)
        self._iter = iter(self._loader)
        self._max_consecutive_rejects = max(1000, len(dataset))

    def next(self) -> PreferenceBatch:
        """The next micro-batch; raises ValueError if the data yields nothing usable."""
        samples: list[PreferenceSample] = []
        consecutive = 0
        while len(samples) < self.micro_batch_size:
            item = next(self._iter)
            self.position += 1
            if isinstance(item, Rejected):
                self.rejects.add(item.reason, item.message, file=item.file, line=item.line, source=item.source)
                consecutive += 1
                if consecutive >= self._max_consecutive_rejects:
                    raise ValueError(f"{consecutive} consecutive records rejected; check the data with mpo.data.validate")
                continue
            consecutive = 0
            samples.append(item)
        return collate_pairs(samples, self.pad_id)


def rejects_path(run_dir: str | Path, rank: int) -> Path:
    return Path(run_dir) / ("rejects.jsonl" if rank == 0 else f"rejects.rank{rank}.jsonl")
