"""The fast generation backend: one prefill per prompt, shared by its samples, continuous batching.

    gen = FastGenerator(model, stop_id=im_end_id)
    outs = gen.generate([EncodedPrompt(ids, pixels), ...], SamplingParams(num_samples=8, temperature=0.7))

How a call runs:

1. Rows: up to `max_batch_rows` samples decode together in one static KV cache (`DecodeBatch`),
   sized for the call's longest prompt plus `max_new_tokens`.
2. Prefill: each prompt (image tiles + text) runs once; its keys/values are copied into as many
   free rows as it has samples waiting, and each row draws its own first token from the prompt's
   logits. A prompt with more samples than free rows keeps its prefix until rows free up. On a GPU
   the next `prefill_prompts` waiting prompts are prefilled together in one forward pass
   (`prefill_many`) and wait in that order; on a CPU each runs alone (`prefill`).
3. Decode: all rows advance one token per step (a CUDA graph on GPU). Every `sync_every` steps the
   host reads which rows finished (stop token or max_new_tokens), collects them, and refills the
   freed rows with the next samples or prompts, so short answers do not hold a batch slot.

Random draws are keyed by (seed, request index, sample index, token index) (`sampling`), so the
draws never depend on batch size, order of completion, or the other requests in the call. The
logits they are compared with can: rows of different lengths decode with a masked attention and
batched GEMMs round differently from a lone row, so a near-tie can (rarely) flip a sampled token
(1 of ~24,000 answers in the CPU demo's pair building, docs/demo_notes.md round 5).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from mpo.infer.batch import DecodeBatch
from mpo.infer.decoder import ModelPieces, prefill, prefill_many
from mpo.infer.kv_cache import PrefixKV
from mpo.infer.sampling import SamplingSpec, stream_seed

__all__ = ["FastGenerator", "GenerationStats", "RawGeneration"]

MIN_CAPACITY = 64


class PromptLike(Protocol):
    input_ids: list[int]
    pixel_values: torch.Tensor | None


@dataclass
class RawGeneration:
    """One sample: new token ids (stop token included when it stopped), their log-probs, and
    whether it stopped on the stop token (False: it hit max_new_tokens)."""

    token_ids: list[int]
    logprobs: list[float]
    finished: bool


@dataclass
class GenerationStats:
    """Counters over the generator's lifetime (what tests and benchmarks inspect)."""

    num_prefills: int = 0  # prompts prefilled
    num_prefill_batches: int = 0  # forward passes that prefilled them
    num_prefill_tokens: int = 0
    num_decode_steps: int = 0
    num_generated_tokens: int = 0
    num_graph_captures: int = 0


def bucket_rows(needed: int, max_rows: int) -> int:
    """Rows of the decode batch: the next power of two >= needed, at most max_rows."""
    rows = 1
    while rows < needed:
        rows *= 2
    return max(1, min(rows, max_rows))


def bucket_capacity(needed: int) -> int:
    """Cache slots per row: `needed` rounded up to 1/8 of its power of two (<= 12.5% spare),
    so few distinct capacities (and CUDA graphs) exist."""
    needed = max(needed, MIN_CAPACITY)
    step = 1 << max(needed.bit_length() - 4, 0)
    return -(-needed // step) * step


class FastGenerator:
    """Generation over an InternVL model's own modules with a static KV cache.

    Args:
        model: `InternVLForConditionalGeneration` (bf16 / fp32, or AWQ with WQLinear linears).
        stop_id: token that ends a sample (`<|im_end|>`), or None to always run max_new_tokens.
        max_batch_rows: most samples decoded at once.
        cuda_graphs: capture decode steps (default: when the model is on CUDA).
        fused_kernels: fused Triton decode kernels (default: on CUDA in bf16/fp16 when supported).
        sync_every: decode steps queued between host checks for finished rows (GPU; the CPU path
            checks every step).
        max_cached_batches: decode batches (cache + graphs) kept for reuse across calls.
        prefill_prompts: most prompts prefilled in one forward pass (default: 32 on CUDA, where a
            small model's batch-1 prefill is launch-bound; 1 on CPU, where it is not).
        prefill_tokens: most padded tokens (prompts x longest prompt) in one such pass.
    """

    def __init__(self, model, *, stop_id: int | None, max_batch_rows: int = 64, cuda_graphs: bool | None = None,
                 fused_kernels: bool | None = None, sync_every: int = 8, max_cached_batches: int = 3,
                 prefill_prompts: int | None = None, prefill_tokens: int = 16384):
        if min(max_batch_rows, sync_every, max_cached_batches, prefill_tokens) < 1 \
                or (prefill_prompts is not None and prefill_prompts < 1):
            raise ValueError(f"max_batch_rows={max_batch_rows}, sync_every={sync_every}, "
                             f"max_cached_batches={max_cached_batches}, prefill_prompts={prefill_prompts} and "
                             f"prefill_tokens={prefill_tokens} must all be >= 1")
        self.pieces = ModelPieces(model)
        on_cuda = self.pieces.device.type == "cuda"
        if cuda_graphs and not on_cuda:
            raise ValueError("cuda_graphs=True needs the model on a CUDA device")
        if fused_kernels and not self.pieces.fused_decode_supported():
            raise ValueError("fused_kernels=True needs a CUDA model in bf16/fp16 with Qwen2-style layers "
                             "(power-of-two head_dim >= 32)")
        self.use_graphs = on_cuda if cuda_graphs is None else cuda_graphs
        self.use_fused = self.pieces.fused_decode_supported() if fused_kernels is None else fused_kernels
        if self.use_fused:
            self.pieces.fuse_projections()
        self.stop_id = stop_id
        self.max_batch_rows = max_batch_rows
        self.sync_every = sync_every
        self.max_cached_batches = max_cached_batches
        self.prefill_prompts = prefill_prompts if prefill_prompts is not None else (32 if on_cuda else 1)
        self.prefill_tokens = prefill_tokens
        self.stats = GenerationStats()
        self._batches: OrderedDict[tuple[int, int], DecodeBatch] = OrderedDict()
        self._graph_pool = torch.cuda.graph_pool_handle() if self.use_graphs else None

    def _batch(self, rows: int, capacity: int) -> DecodeBatch:
        key = (rows, capacity)
        if key in self._batches:
            self._batches.move_to_end(key)
            return self._batches[key]
        while len(self._batches) >= self.max_cached_batches:
            self._batches.popitem(last=False)
        batch = DecodeBatch(self.pieces, rows, capacity, use_graphs=self.use_graphs, fused=self.use_fused,
                            graph_pool=self._graph_pool)
        self._batches[key] = batch
        return batch

    def _prefill_next(self, prompts: Sequence[PromptLike], waiting: deque, ready: deque) -> None:
        """Prefill the next waiting prompt(s) and queue (index, prefix) in `ready`, in order."""
        chunk = [waiting.popleft()]
        longest = len(prompts[chunk[0]].input_ids)
        while waiting and len(chunk) < self.prefill_prompts:
            longest = max(longest, len(prompts[waiting[0]].input_ids))
            if (len(chunk) + 1) * longest > self.prefill_tokens:  # padded tokens of the chunk with it
                break
            chunk.append(waiting.popleft())
        if len(chunk) == 1:
            prompt = prompts[chunk[0]]
            ids = torch.tensor(prompt.input_ids, dtype=torch.long, device=self.pieces.device)
            pixels = None if prompt.pixel_values is None else prompt.pixel_values.to(self.pieces.device)
            prefixes = [prefill(self.pieces, ids, pixels)]
        else:
            prefixes = prefill_many(self.pieces, [prompts[i].input_ids for i in chunk],
                                    [prompts[i].pixel_values for i in chunk])
        ready.extend(zip(chunk, prefixes))
        self.stats.num_prefills += len(chunk)
        self.stats.num_prefill_batches += 1
        self.stats.num_prefill_tokens += sum(len(prompts[i].input_ids) for i in chunk)

    @torch.no_grad()
    def generate(self, prompts: Sequence[PromptLike], params) -> list[list[RawGeneration]]:
        """`params.num_samples` generations per prompt, in prompt order.

        Args:
            prompts: objects with `input_ids` (list of int, the full prompt) and `pixel_values`
                ([tiles, 3, side, side] or None), optionally `seed` (int or None: its own sampling seed).
            params: `SamplingParams` (max_new_tokens, temperature, top_k, top_p, num_samples, seed).
        """
        if not prompts:
            return []
        lengths = [len(p.input_ids) for p in prompts]
        if min(lengths) < 1:
            raise ValueError("every prompt needs at least one token")
        needed = max(lengths) + params.max_new_tokens
        if needed > self.pieces.max_positions:
            raise ValueError(f"longest prompt ({max(lengths)} tokens) + max_new_tokens ({params.max_new_tokens}) "
                             f"exceeds the model's {self.pieces.max_positions} positions; shorten one of them")
        spec = SamplingSpec.from_params(params)
        rows = bucket_rows(len(prompts) * params.num_samples, self.max_batch_rows)
        batch = self._batch(rows, bucket_capacity(needed))
        batch.configure(max_new_tokens=params.max_new_tokens, stop_id=self.stop_id)
        # A single new token comes from the prefill's logits: no decode step, nothing to capture.
        if params.max_new_tokens > 1 and batch.prepare(spec):
            self.stats.num_graph_captures += 1
        try:
            return self._schedule(batch, prompts, params, spec)
        finally:
            batch.release()

    def _schedule(self, batch: DecodeBatch, prompts: Sequence[PromptLike], params, spec: SamplingSpec):
        num_samples, max_new = params.num_samples, params.max_new_tokens
        results: list[list[RawGeneration | None]] = [[None] * num_samples for _ in prompts]
        owner: list[tuple[int, int, int] | None] = [None] * batch.num_rows  # (prompt, sample, prompt length)
        waiting = deque(range(len(prompts)))
        ready: deque[tuple[int, PrefixKV]] = deque()  # prefilled, not started yet (prompt order)
        open_prefix, open_index, next_sample = None, -1, 0
        while True:
            # Refill free rows: the open prompt's remaining samples first, then new prompts.
            free = [r for r in range(batch.num_rows) if owner[r] is None]
            while free and (open_prefix is not None or ready or waiting):
                if open_prefix is None:
                    if not ready:
                        self._prefill_next(prompts, waiting, ready)
                    (open_index, open_prefix), next_sample = ready.popleft(), 0
                take = min(len(free), num_samples - next_sample)
                rows, free = free[:take], free[take:]
                samples = range(next_sample, next_sample + take)
                # A prompt with its own seed draws as request 0 of a call seeded with it.
                own = getattr(prompts[open_index], "seed", None)
                streams = [stream_seed(params.seed, open_index, j) if own is None else stream_seed(own, 0, j)
                           for j in samples]
                batch.start_rows(rows, open_prefix, streams, spec)
                for r, j in zip(rows, samples):
                    owner[r] = (open_index, j, open_prefix.length)
                next_sample += take
                if next_sample == num_samples:
                    open_prefix = None
            # Host check (the one synchronisation): collect finished rows.
            done, steps = batch.status()
            finished = [r for r in range(batch.num_rows) if owner[r] is not None and done[r]]
            for r, (ids, logprobs) in zip(finished, batch.collect(finished, [steps[r] for r in finished])):
                prompt_index, sample_index, _ = owner[r]
                stopped = self.stop_id is not None and bool(ids) and ids[-1] == self.stop_id
                results[prompt_index][sample_index] = RawGeneration(ids, logprobs, stopped)
                self.stats.num_generated_tokens += len(ids)
                owner[r] = None
            if finished and (open_prefix is not None or ready or waiting):
                continue  # refill the freed rows before decoding further
            active = [r for r in range(batch.num_rows) if owner[r] is not None]
            if not active:  # nothing waiting either (it would have been started above)
                return results
            remaining = max(max_new - steps[r] for r in active)
            if batch.use_graphs or batch.fused:
                num_steps = min(self.sync_every, remaining)
                batch.run(spec, num_steps)
            else:
                # Eager torch path: attend over the slots in use only; no mask when all rows align.
                positions = {owner[r][2] + steps[r] - 1 for r in active}
                num_steps = 1
                batch.run(spec, 1, kv_limit=max(positions) + 1, same_length=len(positions) == 1)
            self.stats.num_decode_steps += num_steps
