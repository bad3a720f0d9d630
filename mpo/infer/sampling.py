"""Next-token choice for the fast engine: greedy, temperature, top-k, top-p, seeded per sample.

Randomness is counter-based, not a `torch.Generator`: the uniform number that picks token t of
sample j of request i is a fixed hash of (seed, i, j, t). So a sample's tokens depend only on the
request, its model outputs and the seed, never on which other rows share the batch, when a row was
refilled, or how many samples fit on the device; and the draw is a handful of integer ops on [B]
tensors with no generator state, so it can live inside a captured CUDA graph.

Sampling is inverse-CDF with one uniform per row: the kept tokens' probabilities are laid out in
vocabulary order and the token whose cumulative interval holds ``u`` is chosen (a zero-probability
token never is).

Log-probs returned with each token are those of the distribution it was drawn from:
``log softmax(logits / T)`` restricted to the kept set (top-k, then top-p) and renormalised; for
greedy decoding (T = 0) it is the model's own ``log softmax(logits)``. At T = 1 without filters
both equal the model's log-probs (what a teacher-forced forward gives).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SamplingSpec", "counter_uniform", "mix32", "mix32_int", "sample_next", "stream_seed"]

MASK32 = 0xFFFFFFFF
# Bits of a 32-bit hash kept for a float32 uniform (its mantissa holds 24).
UNIFORM_BITS = 24


@dataclass(frozen=True)
class SamplingSpec:
    """How rows pick their next token; hashable so a captured decode graph can be keyed by it.

    temperature 0 means greedy (top_k / top_p then ignored); top_k 0 and top_p 1 mean off.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1] (1 = off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_params(cls, params) -> "SamplingSpec":
        """From any object with temperature / top_k / top_p (e.g. `SamplingParams`)."""
        if params.temperature == 0:
            return cls()
        return cls(float(params.temperature), int(params.top_k), float(params.top_p))


def mix32_int(x: int) -> int:
    """32-bit integer hash (lowbias32, C. Wellons) of a Python int in [0, 2**32)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32
    x ^= x >> 16
    return x


def _mul_mod32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32), exact: no product exceeds 2**49.

    A direct int64 product could reach 2**64 and overflow (signed overflow is not something to
    rely on across CPU and CUDA), so c is split into 16-bit halves.
    """
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """`mix32_int` on an int64 tensor of values in [0, 2**32); same results on every device."""
    x = x ^ (x >> 16)
    x = _mul_mod32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul_mod32(x, 0x846CA68B)
    return x ^ (x >> 16)


def stream_seed(seed: int, request_index: int, sample_index: int) -> int:
    """The 32-bit random stream of sample `sample_index` of request `request_index` under `seed`."""
    if seed < 0 or request_index < 0 or sample_index < 0:
        raise ValueError(f"seed, request and sample index must be >= 0, got {seed}, {request_index}, {sample_index}")
    h = mix32_int(seed & MASK32) ^ mix32_int(((seed >> 32) & MASK32) ^ 0x5BD1E995)
    h = mix32_int(h ^ mix32_int(request_index & MASK32))
    return mix32_int(h ^ mix32_int((sample_index & MASK32) ^ 0x68E31DA4))


def counter_uniform(streams_B: torch.Tensor, steps_B: torch.Tensor) -> torch.Tensor:
    """Uniform numbers in [0, 1), float32 [B]: a hash of each row's stream and token index.

    Args:
        streams_B: int64 [B], values in [0, 2**32) (from `stream_seed`).
        steps_B: int64 [B] (or a scalar), index of the token being drawn (0 = first new token).
    """
    steps = torch.as_tensor(steps_B, dtype=torch.int64, device=streams_B.device)
    h = mix32(streams_B ^ mix32((steps + 0x9E3779B9) & MASK32))
    h = mix32(h ^ 0x27D4EB2F)
    return (h >> (32 - UNIFORM_BITS)).to(torch.float32) * (1.0 / (1 << UNIFORM_BITS))


def _kept_logprobs(logits_BV: torch.Tensor, spec: SamplingSpec) -> torch.Tensor:
    """Log-probs [B, V] of the sampling distribution: softmax(logits / T) over the kept tokens
    (top-k, then top-p), -inf for removed ones.

    Top-k keeps every token scoring at least the k-th best (ties at the boundary stay, as in
    `transformers`); top-p keeps the most probable tokens until their mass reaches top_p (a token
    stays if the mass of the tokens ranked above it is below top_p, so the first always stays).
    """
    scaled = logits_BV.float() / spec.temperature
    if spec.top_k and spec.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, spec.top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    logp = torch.log_softmax(scaled, dim=-1)
    if spec.top_p < 1:
        sorted_logp, order = torch.sort(logp, dim=-1, descending=True)
        probs = sorted_logp.exp()
        remove_sorted = (torch.cumsum(probs, dim=-1) - probs) >= spec.top_p
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
        logp = torch.log_softmax(scaled.masked_fill(remove, float("-inf")), dim=-1)
    return logp


def sample_next(logits_BV: torch.Tensor, uniforms_B: torch.Tensor,
                spec: SamplingSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose one token per row; no host synchronisation, safe inside a CUDA graph.

    Args:
        logits_BV: model logits [B, V] (any float dtype; math in fp32).
        uniforms_B: float32 [B] in [0, 1) from `counter_uniform` (unused when greedy).
        spec: temperature / top-k / top-p.

    Returns:
        (token ids int64 [B], log-probs float32 [B]) — see the module docstring for which
        distribution the log-probs belong to.
    """
    if spec.greedy:
        logp = torch.log_softmax(logits_BV.float(), dim=-1)
        tokens = torch.argmax(logits_BV, dim=-1)
        return tokens, logp.gather(-1, tokens[:, None])[:, 0]
    logp = _kept_logprobs(logits_BV, spec)
    # Inverse CDF in vocabulary order: a tiny change in the logits (another batch size, another
    # kernel) moves interval edges a little instead of reordering near-tied tokens.
    cdf = torch.cumsum(logp.exp(), dim=-1)
    total = cdf[:, -1:]
    target = uniforms_B[:, None].to(cdf.dtype) * total
    pick = torch.searchsorted(cdf, target, right=True)  # first token whose interval ends past target
    # Rounding can put the target at the very end; never step onto a removed (zero-mass) tail:
    # the last kept token is the first whose cumulative mass equals the total.
    last_kept = (cdf < total).sum(dim=-1, keepdim=True)
    pick = torch.minimum(pick, last_kept)
    return pick[:, 0], logp.gather(-1, pick)[:, 0]
