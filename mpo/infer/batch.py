"""Device state of a decode batch: rows, their cache, one in-place step, no host synchronisation.

Each of the `num_rows` rows is one sample being generated (or a free slot). Per row the device
holds: the last chosen token (not yet fed to the model), the cache slot it will be written to
(`positions`), how many tokens the row has produced (`steps`), its random stream, and whether it
is done. `step()` feeds every row's token, picks the next ones, records them in `out_tokens` /
`out_logprobs`, and advances the active rows; finished and free rows keep computing (fixed shapes
for CUDA graphs) but change nothing that is read back: their writes go to a spare column.

The host reads the state only when the scheduler asks (`status`, `collect`), so on a GPU several
steps can be queued back to back.
"""

from __future__ import annotations

import torch

from mpo.infer.decoder import ModelPieces, decode_logits_fused, decode_logits_torch
from mpo.infer.graphs import CapturedStep
from mpo.infer.kv_cache import PrefixKV
from mpo.infer.sampling import SamplingSpec, counter_uniform, sample_next

__all__ = ["DecodeBatch"]


class DecodeBatch:
    """`num_rows` rows over a static cache of `capacity` slots each.

    Args:
        pieces: the model.
        num_rows: rows decoded together (fixed: a CUDA graph is captured for this size).
        capacity: cache slots per row (prompt + new tokens must fit).
        use_graphs: capture `step` per sampling spec and replay it (CUDA only).
        fused: use `decode_logits_fused` (CUDA, 16-bit) instead of the torch path.
        graph_pool: CUDA graph memory pool to share with other batches.
    """

    def __init__(self, pieces: ModelPieces, num_rows: int, capacity: int, *, use_graphs: bool, fused: bool,
                 graph_pool=None):
        self.pieces = pieces
        self.cache = pieces.new_cache(num_rows, capacity)
        device = pieces.device
        long = dict(dtype=torch.long, device=device)
        self.tokens = torch.zeros(num_rows, **long)
        self.positions = torch.zeros(num_rows, **long)
        self.steps = torch.zeros(num_rows, **long)
        self.streams = torch.zeros(num_rows, **long)
        self.done = torch.ones(num_rows, dtype=torch.bool, device=device)
        self.max_new = torch.ones((), **long)
        self.stop = torch.full((), -1, **long)
        # Column `capacity` is the spare one that finished and free rows write to.
        self.trash_column = capacity
        self.out_tokens = torch.zeros(num_rows, capacity + 1, **long)
        self.out_logprobs = torch.zeros(num_rows, capacity + 1, dtype=torch.float32, device=device)
        self.fused = fused
        self.use_graphs = use_graphs
        self.num_splits = 1
        if fused:
            from mpo.infer import decode_ops  # Triton: only on the fused (CUDA) path

            sms = torch.cuda.get_device_properties(device).multi_processor_count
            self.num_splits = decode_ops.default_num_splits(num_rows, pieces.num_kv_heads, capacity, sms)
        self._graph_pool = graph_pool
        self._graphs: dict[SamplingSpec, CapturedStep] = {}

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def configure(self, *, max_new_tokens: int, stop_id: int | None) -> None:
        """Set the per-call limits (device scalars, so captured graphs stay valid)."""
        if max_new_tokens > self.capacity:
            raise ValueError(f"max_new_tokens={max_new_tokens} exceeds the cache capacity {self.capacity}")
        self.max_new.fill_(max_new_tokens)
        self.stop.fill_(-1 if stop_id is None else stop_id)

    def _logits(self, kv_limit: int | None, same_length: bool) -> torch.Tensor:
        if self.fused:
            return decode_logits_fused(self.pieces, self.cache, self.tokens, self.positions, num_splits=self.num_splits)
        return decode_logits_torch(self.pieces, self.cache, self.tokens, self.positions, kv_limit=kv_limit,
                                   same_length=same_length)

    def step(self, spec: SamplingSpec, *, kv_limit: int | None = None, same_length: bool = False) -> None:
        """One decode step for every row, in place (see the module docstring)."""
        logits = self._logits(kv_limit, same_length)
        tokens, logprobs = sample_next(logits, counter_uniform(self.streams, self.steps), spec)
        active = ~self.done
        column = torch.where(active, self.steps, self.trash_column)[:, None]
        self.out_tokens.scatter_(1, column, tokens[:, None])
        self.out_logprobs.scatter_(1, column, logprobs[:, None])
        advance = active.long()
        self.steps.add_(advance)
        self.positions.add_(advance)
        self.tokens.copy_(torch.where(active, tokens, self.tokens))
        self.done.logical_or_((tokens == self.stop) | (self.steps >= self.max_new))

    def prepare(self, spec: SamplingSpec) -> bool:
        """Capture the step graph for `spec` if graphs are on and it is new; True if captured now.

        Must be called while every row is free (warm-up steps then only touch spare slots).
        """
        if not self.use_graphs or spec in self._graphs:
            return False
        assert bool(self.done.all()), "graph capture needs every row free"
        self._graphs[spec] = CapturedStep(lambda: self.step(spec), pool=self._graph_pool)
        return True

    def run(self, spec: SamplingSpec, num_steps: int, *, kv_limit: int | None = None,
            same_length: bool = False) -> None:
        """`num_steps` decode steps: graph replays when captured, else eager steps."""
        graph = self._graphs.get(spec)
        for _ in range(num_steps):
            if graph is not None:
                graph.replay()
            else:
                self.step(spec, kv_limit=kv_limit, same_length=same_length)

    def start_rows(self, rows: list[int], prefix: PrefixKV, streams: list[int], spec: SamplingSpec) -> None:
        """Begin one sample of `prefix`'s prompt in each of `rows`: copy the prompt's K/V, draw the
        first token from the prompt's logits (token index 0 of each stream)."""
        device = self.tokens.device
        index = torch.tensor(rows, dtype=torch.long, device=device)
        self.cache.load_prefix(index, prefix)
        stream_ids = torch.tensor(streams, dtype=torch.long, device=device)
        first_step = torch.zeros(len(rows), dtype=torch.long, device=device)
        logits = prefix.logits[None].expand(len(rows), -1)
        tokens, logprobs = sample_next(logits, counter_uniform(stream_ids, first_step), spec)
        self.streams[index] = stream_ids
        self.tokens[index] = tokens
        self.positions[index] = prefix.length
        self.steps[index] = 1
        self.out_tokens[index, 0] = tokens
        self.out_logprobs[index, 0] = logprobs
        self.done[index] = (tokens == self.stop) | (self.max_new <= 1)

    def status(self) -> tuple[list[bool], list[int]]:
        """(done, steps) per row, read to the host (one synchronisation)."""
        both = torch.stack([self.done.long(), self.steps]).cpu()
        return [bool(d) for d in both[0].tolist()], both[1].tolist()

    def collect(self, rows: list[int], steps: list[int]) -> list[tuple[list[int], list[float]]]:
        """Token ids and log-probs produced by each of `rows` (its first `steps[i]` entries)."""
        index = torch.tensor(rows, dtype=torch.long, device=self.tokens.device)
        width = max(steps, default=0)
        tokens = self.out_tokens[index, :width].cpu().tolist()
        logprobs = self.out_logprobs[index, :width].cpu().tolist()
        return [(t[:n], lp[:n]) for t, lp, n in zip(tokens, logprobs, steps)]

    def release(self) -> None:
        """Mark every row free (after a call, or after an error mid-call)."""
        self.done.fill_(True)
