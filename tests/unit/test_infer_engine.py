"""The fast generation backend on the tiny model (CPU): equal to `transformers` generate for greedy
decoding, prefix shared by a prompt's samples, seeded sampling independent of batching, stops,
limits, and log-probs equal to a teacher-forced forward."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import write_image

from mpo.infer.engine import Engine, Request, SamplingParams
from mpo.infer.fast import FastGenerator, bucket_capacity, bucket_rows


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    """(fast, hf) engines sharing one fp32 model (the CPU fast path leaves the model untouched)."""
    fast = Engine.load(tiny_model_dir, device="cpu")
    hf = Engine(fast.model, fast.processor, device=torch.device("cpu"), backend="hf")
    return fast, hf


@pytest.fixture(scope="module")
def requests_(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer_images")
    red = write_image(root / "red.png", size=(64, 48), color=(200, 30, 30))
    blue = write_image(root / "blue.png", size=(40, 40), color=(20, 30, 220))
    return [
        Request("What is the capital of France?"),
        Request("Describe the picture.", images=[str(red)], max_dynamic_patch=1),
        Request("Count to ten.", assistant_prefix="Sure: one, two"),
        Request("Compare the two images.", images=[str(red), str(blue)], max_dynamic_patch=2),
    ]


def _teacher_forced_logits(engine: Engine, request: Request, token_ids: list[int]) -> torch.Tensor:
    """Model logits [len(token_ids), V] predicting each new token, from one full forward."""
    prompt = engine.encode(request)
    ids = torch.tensor([prompt.input_ids + token_ids])
    kwargs = {} if prompt.pixel_values is None else {"pixel_values": prompt.pixel_values}
    with torch.no_grad():
        logits = engine.model(input_ids=ids, **kwargs).logits[0].float()
    start = len(prompt.input_ids) - 1
    return logits[start:start + len(token_ids)]


def _same(a, b, atol=1e-4):
    assert a.token_ids == b.token_ids
    assert a.text == b.text
    assert a.finished == b.finished
    assert len(a.logprobs) == len(a.token_ids)
    assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < atol


def test_greedy_equals_transformers_generate(engines, requests_):
    fast, hf = engines
    params = SamplingParams(max_new_tokens=16)
    reference = hf.generate(requests_, params)
    # one call: prompts of different lengths (text, image, prefix, two images) decode as one batch
    batched = fast.generate(requests_, params)
    for got, want in zip(batched, reference):
        _same(got[0], want[0])
    # alone: a single row, the mask-free decode path
    for request, want in zip(requests_[:2], reference[:2]):
        _same(fast.generate([request], params)[0][0], want[0])


def test_assistant_prefix_is_continued_not_repeated(engines, requests_):
    fast, _ = engines
    with_prefix = requests_[2]
    out = fast.generate([with_prefix], SamplingParams(max_new_tokens=4))[0][0]
    prompt = fast.encode(with_prefix)
    no_prefix = fast.encode(Request(with_prefix.question))
    assert len(prompt.input_ids) > len(no_prefix.input_ids)
    assert len(out.token_ids) == 4  # new tokens only


def test_prefill_once_per_prompt_whatever_the_rows(engines, requests_):
    fast, _ = engines
    params = SamplingParams(max_new_tokens=5, temperature=1.0, num_samples=5, seed=3)
    for generator in (fast.generator, FastGenerator(fast.model, stop_id=fast.stop_id, max_batch_rows=2)):
        before = generator.stats.num_prefills, generator.stats.num_prefill_tokens
        out = generator.generate([fast.encode(r) for r in requests_[:3]], params)
        assert [len(samples) for samples in out] == [5, 5, 5]
        assert generator.stats.num_prefills - before[0] == 3
        lengths = sum(len(fast.encode(r).input_ids) for r in requests_[:3])
        assert generator.stats.num_prefill_tokens - before[1] == lengths


def test_decode_steps_follow_from_the_shared_prefill(engines, requests_):
    fast, _ = engines
    stats = fast.generator.stats
    steps, generated = stats.num_decode_steps, stats.num_generated_tokens
    out = fast.generate(requests_[:1], SamplingParams(max_new_tokens=8, temperature=1.0, num_samples=4))
    assert all(len(g.token_ids) == 8 and not g.finished for g in out[0])
    assert stats.num_decode_steps - steps == 7  # the first token of every sample comes from the prefill
    assert stats.num_generated_tokens - generated == 32


def test_samples_are_seeded(engines, requests_):
    fast, _ = engines
    params = SamplingParams(max_new_tokens=10, temperature=1.0, num_samples=4, seed=11)
    first = fast.generate(requests_[:2], params)
    again = fast.generate(requests_[:2], params)
    other = fast.generate(requests_[:2], SamplingParams(max_new_tokens=10, temperature=1.0, num_samples=4, seed=12))
    for a, b, c in zip(first, again, other):
        assert [g.token_ids for g in a] == [g.token_ids for g in b]
        assert [g.token_ids for g in a] != [g.token_ids for g in c]
        assert len({tuple(g.token_ids) for g in a}) == 4  # the samples of one prompt differ


def test_results_do_not_depend_on_batching(engines, requests_):
    fast, _ = engines
    prompts = [fast.encode(r) for r in requests_[:3]]
    params = SamplingParams(max_new_tokens=8, temperature=0.9, top_k=50, num_samples=3, seed=5)
    wide = FastGenerator(fast.model, stop_id=fast.stop_id, max_batch_rows=16).generate(prompts, params)
    narrow = FastGenerator(fast.model, stop_id=fast.stop_id, max_batch_rows=1).generate(prompts, params)
    assert [[g.token_ids for g in s] for s in wide] == [[g.token_ids for g in s] for s in narrow]


def test_request_seed_makes_samples_independent_of_call_mates(engines, requests_):
    """A request with its own seed gets what it gets alone in a call seeded with it (both backends)."""
    from dataclasses import replace

    fast, hf = engines
    params = SamplingParams(max_new_tokens=6, temperature=1.0, num_samples=3, seed=99)
    own = [replace(r, seed=40 + i) for i, r in enumerate(requests_[:3])]
    for engine in (fast, hf):
        together = engine.generate(own, params)
        for i, request in enumerate(requests_[:3]):
            alone = engine.generate([request], replace(params, seed=40 + i))[0]
            assert [g.token_ids for g in together[i]] == [g.token_ids for g in alone], (engine.backend, i)
    # Mixed with unseeded requests (fast): those keep the (params.seed, index) streams.
    mixed = fast.generate([requests_[0], own[1]], params)
    assert [g.token_ids for g in mixed[0]] == [g.token_ids for g in fast.generate([requests_[0]], params)[0]]
    assert [g.token_ids for g in mixed[1]] == [g.token_ids for g in fast.generate([requests_[1]], replace(params, seed=41))[0]]


@pytest.mark.parametrize("params", [SamplingParams(max_new_tokens=8),
                                    SamplingParams(max_new_tokens=8, temperature=1.0, num_samples=2, seed=1)])
def test_logprobs_equal_teacher_forced_forward_at_temperature_one(engines, requests_, params):
    fast, _ = engines
    for request, samples in zip(requests_[:2], fast.generate(requests_[:2], params)):
        for g in samples:
            logits = _teacher_forced_logits(fast, request, g.token_ids)
            expected = torch.log_softmax(logits, -1)[torch.arange(len(g.token_ids)), g.token_ids]
            assert torch.allclose(torch.tensor(g.logprobs), expected, atol=1e-4)
            if params.temperature == 0:
                assert g.token_ids == logits.argmax(-1).tolist()


def test_filtered_logprobs_are_those_of_the_sampling_distribution(engines, requests_):
    fast, _ = engines
    params = SamplingParams(max_new_tokens=6, temperature=0.7, top_k=20, top_p=0.9, num_samples=3, seed=2)
    request = requests_[0]
    for g in fast.generate([request], params)[0]:
        logits = _teacher_forced_logits(fast, request, g.token_ids)
        for step, token in enumerate(g.token_ids):
            # independent recomputation: temperature, keep top 20, renormalise, keep the nucleus
            probs = torch.softmax(logits[step].double() / 0.7, -1)
            top = probs.topk(20)
            kept = top.values / top.values.sum()
            before = kept.cumsum(0) - kept
            nucleus = kept[before < 0.9]
            ids = top.indices[: len(nucleus)].tolist()
            assert token in ids
            assert g.logprobs[step] == pytest.approx(math.log(nucleus[ids.index(token)] / nucleus.sum()), abs=1e-4)


@pytest.fixture(scope="module")
def stopping_engines(tiny_model_dir, requests_):
    """Engines over a copy of the model whose <|im_end|> logit is made the largest at the 3rd new
    token of the first request (so greedy decoding stops there or earlier)."""
    fast = Engine.load(tiny_model_dir, device="cpu")
    hf = Engine(fast.model, fast.processor, device=torch.device("cpu"), backend="hf")
    first = hf.generate(requests_[:1], SamplingParams(max_new_tokens=3))[0][0].token_ids
    prompt = fast.encode(requests_[0])
    with torch.no_grad():
        hidden = fast.model.model(input_ids=torch.tensor([prompt.input_ids + first[:2]])).last_hidden_state[0, -1]
        fast.model.lm_head.weight[fast.stop_id] = hidden / hidden.norm() ** 2 * 50.0
    return fast, hf


def test_stops_on_im_end_like_transformers(stopping_engines, requests_):
    fast, hf = stopping_engines
    params = SamplingParams(max_new_tokens=12, num_samples=2)
    # the stopping prompt shares the batch with prompts that keep going (rows are collected mid-decode)
    got, want = fast.generate(requests_[:3], params), hf.generate(requests_[:3], params)
    for a, b in zip(got, want):
        for x, y in zip(a, b):
            _same(x, y)
    stopped = got[0][0]
    assert stopped.finished and stopped.token_ids[-1] == fast.stop_id and len(stopped.token_ids) <= 3
    assert fast.tokenizer.decode(stopped.token_ids[:-1], skip_special_tokens=True) == stopped.text
    assert "<|im_end|>" not in stopped.text


def test_max_new_tokens(engines, requests_):
    fast, hf = engines
    stats = fast.generator.stats
    steps = stats.num_decode_steps
    one = fast.generate(requests_[:2], SamplingParams(max_new_tokens=1, num_samples=2))
    assert stats.num_decode_steps == steps  # the prefill's logits give the only token
    for a, b in zip(one, hf.generate(requests_[:2], SamplingParams(max_new_tokens=1))):
        assert [g.token_ids for g in a] == [b[0].token_ids] * 2 and not a[0].finished


def test_buckets():
    assert [bucket_rows(n, 64) for n in (1, 2, 3, 5, 64, 65, 1000)] == [1, 2, 4, 8, 64, 64, 64]
    assert bucket_rows(7, 6) == 6
    assert bucket_capacity(1) == 64
    assert bucket_capacity(768) == 768  # 512 + 256, the benchmark's shape, wastes nothing
    for needed in (65, 100, 769, 3000, 5000, 40000):
        cap = bucket_capacity(needed)
        assert needed <= cap <= needed * 1.125 + 1


def test_bad_inputs(engines, tiny_model_dir, requests_):
    fast, _ = engines
    with pytest.raises(ValueError, match="backend"):
        Engine.load(tiny_model_dir, device="cpu", backend="vllm")
    with pytest.raises(ValueError, match="positions"):
        too_many = fast.model.config.text_config.max_position_embeddings
        fast.generate(requests_[:1], SamplingParams(max_new_tokens=too_many))
    with pytest.raises(ValueError, match="CUDA"):
        FastGenerator(fast.model, stop_id=fast.stop_id, cuda_graphs=True)
    with pytest.raises(ValueError, match="fused_kernels"):
        FastGenerator(fast.model, stop_id=fast.stop_id, fused_kernels=True)
    with pytest.raises(ValueError, match="max_batch_rows"):
        FastGenerator(fast.model, stop_id=fast.stop_id, max_batch_rows=0)
    with pytest.raises(ValueError, match="at least one token"):
        fast.generator.generate([type("P", (), {"input_ids": [], "pixel_values": None})()], SamplingParams())
    assert fast.generate([], SamplingParams()) == []


def test_prefill_many_equals_one_prompt_at_a_time(engines, requests_):
    """Twin of the batched prefill: right-padded prompts (text only, one and two images, a prefix) give
    each prompt's own keys/values and next-token logits."""
    from mpo.infer.decoder import prefill, prefill_many

    fast, _ = engines
    pieces = fast.generator.pieces
    prompts = [fast.encode(r) for r in requests_]
    assert len({len(p.input_ids) for p in prompts}) == len(prompts)  # all lengths differ: padding is exercised
    batched = prefill_many(pieces, [p.input_ids for p in prompts], [p.pixel_values for p in prompts])
    for prompt, got in zip(prompts, batched):
        want = prefill(pieces, torch.tensor(prompt.input_ids), prompt.pixel_values)
        assert got.length == want.length == len(prompt.input_ids)
        torch.testing.assert_close(got.keys, want.keys, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got.values, want.values, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-4)


def test_prefill_many_bad_input(engines, requests_):
    from mpo.infer.decoder import prefill_many

    fast, _ = engines
    pieces = fast.generator.pieces
    image_prompt = fast.encode(requests_[1])
    with pytest.raises(ValueError, match="no pixel values"):
        prefill_many(pieces, [image_prompt.input_ids, [1, 2]], [None, None])
    with pytest.raises(ValueError, match="tiles and placeholders disagree"):
        two_tiles = torch.cat([image_prompt.pixel_values, image_prompt.pixel_values])
        prefill_many(pieces, [image_prompt.input_ids, [1, 2]], [two_tiles, None])
    with pytest.raises(ValueError, match="as many pixel entries"):
        prefill_many(pieces, [[1, 2]], [])
    with pytest.raises(ValueError, match="no empty prompt"):
        prefill_many(pieces, [[1, 2], []], [None, None])


def test_generation_with_batched_prefill_equals_one_at_a_time(engines, requests_):
    """The generator's batched prefill (the GPU default) gives the tokens of per-prompt prefill, greedy and
    seeded sampling, whatever the chunk size and token budget."""
    fast, _ = engines
    prompts = [fast.encode(r) for r in requests_]
    for params in (SamplingParams(max_new_tokens=8), SamplingParams(max_new_tokens=8, temperature=0.9, top_k=50,
                                                                     num_samples=3, seed=5)):
        one = FastGenerator(fast.model, stop_id=fast.stop_id, max_batch_rows=4, prefill_prompts=1)
        want = one.generate(prompts, params)
        for chunk, budget in ((4, 16384), (3, 16384), (4, 2 * max(len(p.input_ids) for p in prompts))):
            many = FastGenerator(fast.model, stop_id=fast.stop_id, max_batch_rows=4, prefill_prompts=chunk,
                                 prefill_tokens=budget)
            got = many.generate(prompts, params)
            assert [[g.token_ids for g in s] for s in got] == [[g.token_ids for g in s] for s in want]
            assert many.stats.num_prefills == len(prompts) > many.stats.num_prefill_batches
    with pytest.raises(ValueError, match="prefill_prompts=0"):
        FastGenerator(fast.model, stop_id=fast.stop_id, prefill_prompts=0)
