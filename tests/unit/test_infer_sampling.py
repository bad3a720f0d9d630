"""Sampling of the fast engine: counter-based randomness, inverse-CDF draws, top-k / top-p, log-probs."""

from __future__ import annotations

import math

import pytest
import torch

from mpo.infer.sampling import (
    MASK32,
    SamplingSpec,
    counter_uniform,
    mix32,
    mix32_int,
    sample_next,
    stream_seed,
)

PROBS = [0.1, 0.2, 0.3, 0.4]


def _logits(probs=PROBS, rows=1):
    return torch.tensor(probs).log().repeat(rows, 1)


def _filtered(probs: list[float], temperature: float, top_k: int, top_p: float) -> dict[int, float]:
    """Independent definition: token -> probability after temperature, top-k, then top-p."""
    scaled = [math.exp(math.log(p) / temperature) for p in probs]
    total = sum(scaled)
    order = sorted(range(len(probs)), key=lambda i: -scaled[i])
    if top_k:
        order = order[:top_k]
    kept_total = sum(scaled[i] for i in order)
    dist = {i: scaled[i] / kept_total for i in order}
    if top_p < 1:
        nucleus, mass = {}, 0.0
        for i in order:
            if mass >= top_p:
                break
            nucleus[i] = dist[i]
            mass += dist[i]
        dist = {i: p / sum(nucleus.values()) for i, p in nucleus.items()}
    assert total > 0
    return dist


def test_mix32_matches_python_integers_on_every_edge():
    values = [0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xDEADBEEF, MASK32, 12345678]
    got = mix32(torch.tensor(values, dtype=torch.int64)).tolist()
    assert got == [mix32_int(v) for v in values]
    assert mix32_int(0) == 0  # lowbias32 fixes zero
    assert all(0 <= g <= MASK32 for g in got)
    # a hash, not the identity: neighbours land far apart
    assert len({mix32_int(v) for v in range(1000)}) == 1000


def test_counter_uniform_is_deterministic_uniform_and_keyed_by_stream_and_step():
    streams = torch.tensor([stream_seed(0, i, 0) for i in range(20000)])
    u0 = counter_uniform(streams, torch.zeros_like(streams))
    assert torch.equal(u0, counter_uniform(streams, torch.zeros_like(streams)))
    assert u0.dtype == torch.float32 and float(u0.min()) >= 0 and float(u0.max()) < 1
    counts = torch.histc(u0, bins=10, min=0, max=1)
    expected = len(u0) / 10
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 30, chi2  # 9 dof: p ~ 4e-4 at 30
    u1 = counter_uniform(streams, torch.ones_like(streams))
    assert float((u0 == u1).float().mean()) < 0.01
    assert abs(float(torch.corrcoef(torch.stack([u0, u1]))[0, 1])) < 0.05


def test_stream_seeds_distinct_and_validated():
    seeds = {stream_seed(7, i, j) for i in range(64) for j in range(32)}
    assert len(seeds) == 64 * 32
    assert stream_seed(7, 1, 2) == stream_seed(7, 1, 2) != stream_seed(8, 1, 2)
    assert stream_seed(2**40, 0, 0) != stream_seed(0, 0, 0)  # high seed bits count
    with pytest.raises(ValueError, match="must be >= 0"):
        stream_seed(-1, 0, 0)


def test_greedy_is_argmax_with_model_logprob():
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.5, -1.0, 0.0]])
    tokens, logp = sample_next(logits, torch.zeros(2), SamplingSpec())
    assert tokens.tolist() == [1, 0]
    assert torch.allclose(logp, torch.log_softmax(logits, -1)[[0, 1], [1, 0]])


@pytest.mark.parametrize("u, token", [(0.05, 0), (0.25, 1), (0.59, 2), (0.61, 3), (0.99, 3)])
def test_inverse_cdf_in_vocabulary_order(u, token):
    # T = 1, no filter: cumulative [0.1, 0.3, 0.6, 1.0] over the vocabulary in its own order
    tokens, logp = sample_next(_logits(), torch.tensor([u]), SamplingSpec(temperature=1.0))
    assert tokens.item() == token
    assert logp.item() == pytest.approx(math.log(PROBS[token]), abs=1e-6)


@pytest.mark.parametrize("spec, u, token, prob", [
    (SamplingSpec(1.0, top_k=2), 0.42, 2, 3 / 7),  # kept {2: 3/7, 3: 4/7}: intervals [0, 3/7), [3/7, 1)
    (SamplingSpec(1.0, top_k=2), 0.44, 3, 4 / 7),
    (SamplingSpec(1.0, top_p=0.5), 0.3, 2, 3 / 7),  # mass before (by rank): 0, 0.4, 0.7 -> keeps 3 and 2
    (SamplingSpec(1.0, top_p=0.35), 0.01, 3, 1.0),  # 0.4 reaches top_p alone
    (SamplingSpec(1.0, top_k=3, top_p=0.6), 0.2, 2, 3 / 7),  # top-3 {1: 2/9, 2: 3/9, 3: 4/9}, nucleus {2, 3}
    (SamplingSpec(1.0, top_k=3, top_p=0.6), 0.5, 3, 4 / 7),
])
def test_filters_hand_worked(spec, u, token, prob):
    tokens, logp = sample_next(_logits(), torch.tensor([u]), spec)
    assert tokens.item() == token
    assert logp.item() == pytest.approx(math.log(prob), abs=1e-6)


def test_temperature_scales_before_filtering():
    spec = SamplingSpec(temperature=2.0)
    tokens, logp = sample_next(_logits(), torch.tensor([0.0]), spec)
    dist = _filtered(PROBS, 2.0, 0, 1.0)
    assert tokens.item() == 0
    assert logp.item() == pytest.approx(math.log(dist[0]), abs=1e-6)


def test_draw_never_lands_on_a_removed_token():
    almost_one = torch.tensor([1.0 - 2.0 ** -24] * 3)
    logits = torch.tensor([[0.0, 5.0, -30.0, 4.0, 1.0]] * 3)
    for spec in (SamplingSpec(1.0, top_k=2), SamplingSpec(1.0, top_p=0.5), SamplingSpec(0.5, top_k=4, top_p=0.9)):
        tokens, logp = sample_next(logits, almost_one, spec)
        kept = _filtered(torch.softmax(logits[0], -1).tolist(), spec.temperature, spec.top_k, spec.top_p)
        assert set(tokens.tolist()) <= set(kept)
        assert torch.isfinite(logp).all()


@pytest.mark.parametrize("spec", [SamplingSpec(1.0), SamplingSpec(0.7, top_k=3), SamplingSpec(1.3, top_p=0.8),
                                  SamplingSpec(0.9, top_k=6, top_p=0.75)])
def test_empirical_frequencies_match_filtered_distribution(spec):
    probs = [0.02, 0.08, 0.25, 0.05, 0.3, 0.1, 0.2]
    rows = 40000
    streams = torch.tensor([stream_seed(1, i, 0) for i in range(rows)])
    tokens, logp = sample_next(_logits(probs, rows), counter_uniform(streams, torch.zeros_like(streams)), spec)
    dist = _filtered(probs, spec.temperature, spec.top_k, spec.top_p)
    freq = torch.bincount(tokens, minlength=len(probs)).double() / rows
    for token in range(len(probs)):
        p = dist.get(token, 0.0)
        assert abs(freq[token].item() - p) < 4 * math.sqrt(p * (1 - p) / rows) + 1e-9, (token, freq[token], p)
    # each draw reports the log-prob of its token under that same distribution
    expected = torch.tensor([math.log(dist[t]) for t in tokens.tolist()], dtype=torch.float64)
    assert torch.allclose(logp.double(), expected, atol=1e-5)


def test_spec_validation_and_from_params():
    for kwargs, message in [({"temperature": -1.0}, "temperature"), ({"top_k": -2}, "top_k"),
                            ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p")]:
        with pytest.raises(ValueError, match=message):
            SamplingSpec(**{"temperature": 1.0, **kwargs})

    class Params:
        temperature, top_k, top_p = 0.0, 40, 0.5

    assert SamplingSpec.from_params(Params()) == SamplingSpec()  # greedy ignores the filters
    Params.temperature = 0.8
    assert SamplingSpec.from_params(Params()) == SamplingSpec(0.8, 40, 0.5)
    assert hash(SamplingSpec(0.8, 40, 0.5)) == hash(SamplingSpec(0.8, 40, 0.5))
