"""Dropout-NTP pairs (data_pipeline/dropout_ntp.py): prefix split, image-free continuation, tiny-model run."""

from __future__ import annotations

import re

import pytest
from conftest import write_image

from data_pipeline.dropout_ntp import build_dropout_ntp_pair, remove_image_placeholders, split_prefix
from mpo.infer.engine import Generation, SamplingParams


@pytest.mark.parametrize(
    "text, ratio, expected",
    [
        ("a b c d e", 0.5, ("a b", 2, 5)),
        ("a b c d", 0.5, ("a b", 2, 4)),
        ("one  two\nthree\tfour five six", 0.5, ("one  two\nthree", 3, 6)),  # spacing inside the prefix kept
        ("  lead trail  ", 0.5, ("  lead", 1, 2)),
        ("x y z w v u t s r q", 0.3, ("x y z", 3, 10)),
        ("single", 0.5, ("", 0, 1)),
        ("", 0.5, ("", 0, 0)),
    ],
)
def test_split_prefix_keeps_floor_ratio_words(text, ratio, expected):
    assert split_prefix(text, ratio) == expected


def test_split_prefix_matches_word_count_formula():
    text = "The chart shows three bars. The tallest is blue, at 42 units."
    prefix, kept, total = split_prefix(text)
    assert total == len(text.split()) == 12
    assert kept == 6 and prefix.split() == text.split()[:6]
    assert text.startswith(prefix) and not prefix.endswith(" ")


@pytest.mark.parametrize("ratio", [0, 1, -0.5, 1.5])
def test_split_prefix_rejects_bad_ratio(ratio):
    with pytest.raises(ValueError, match=r"dropout_ntp.ratio=.* must be in \(0, 1\)"):
        split_prefix("a b c", ratio)


def test_remove_image_placeholders():
    assert remove_image_placeholders("<image>\nWhat is shown?") == "What is shown?"
    assert remove_image_placeholders("Image-1: <image>\nImage-2: <image>\nCompare them.") == "Compare them."
    assert remove_image_placeholders("Look at <image> closely.") == "Look at closely."
    assert remove_image_placeholders("No image here.") == "No image here."


class RecordingEngine:
    """Answers the image request with `chosen` and the image-free one with `continuation`."""

    def __init__(self, chosen: str, continuation: str):
        self.chosen, self.continuation = chosen, continuation
        self.calls = []

    def generate(self, requests, params):
        self.calls.append((requests, params))
        text = self.chosen if requests[0].images else self.continuation
        return [[Generation(text, [5] * 7, [-1.0] * 7, True)] for _ in requests]


PROMPT = "Question:\n\n<image>\nWhat does the chart show?"


def test_pair_from_fake_engine_continues_prefix_without_image():
    engine = RecordingEngine("The chart shows three bars and the blue one is tallest.", " red one is tallest.")
    chosen_params = SamplingParams(max_new_tokens=32, temperature=0.7, num_samples=4, seed=11)
    cont_params = SamplingParams(max_new_tokens=32, temperature=0.7, num_samples=4, seed=12)
    result = build_dropout_ntp_pair(engine, PROMPT, ["img.png"], chosen_params, cont_params, ratio=0.5,
                                    max_dynamic_patch=3)
    assert result.status == "pair"
    assert result.prefix == "The chart shows three bars"  # 5 of 11 words
    assert result.rejected == "The chart shows three bars red one is tallest."
    assert result.rejected.startswith(result.prefix) and result.chosen.startswith(result.prefix)
    (first, first_params), (second, second_params) = engine.calls
    assert first[0].images == ["img.png"] and first[0].question == PROMPT and first[0].assistant_prefix == ""
    assert first[0].max_dynamic_patch == 3
    assert second[0].images == [] and "<image>" not in second[0].question
    assert second[0].question == "Question:\n\nWhat does the chart show?"
    assert second[0].assistant_prefix == result.prefix
    assert (first_params.seed, second_params.seed) == (11, 12)
    assert first_params.num_samples == second_params.num_samples == 1
    assert result.rejected_meta == {"finished": True, "num_tokens": 7, "with_image": False, "prefix_words": 5,
                                    "chosen_words": 11, "ratio": 0.5}
    assert result.chosen_meta["with_image"] is True and result.num_generated == 2 and result.num_tokens == 14


def test_short_and_identical_answers_make_no_pair():
    params = SamplingParams(max_new_tokens=8)
    short = build_dropout_ntp_pair(RecordingEngine("Yes.", " no"), PROMPT, ["a.png"], params, params)
    assert short.status == "too_short" and short.num_generated == 1 and short.rejected == ""
    same = build_dropout_ntp_pair(RecordingEngine("a b c d", " c  d"), PROMPT, ["a.png"], params, params)
    assert same.status == "identical"


@pytest.fixture(scope="module")
def tiny224(tmp_path_factory):
    from mpo.model.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny224") / "model", seed=0, image_size=224)


def test_tiny_model_dropout_ntp_run(tiny224, tmp_path):
    from mpo.infer.engine import Engine

    engine = Engine.load(tiny224, device="cpu", system_prompt=None)
    seen = []
    real_generate = engine.generate

    def spy(requests, params):
        seen.append([(r.images, r.assistant_prefix, r.question) for r in requests])
        return real_generate(requests, params)

    engine.generate = spy
    image = write_image(tmp_path / "a.png", size=(80, 60))
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=50, seed=3)
    cont = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=50, seed=4)
    result = build_dropout_ntp_pair(engine, "<image>\nDescribe the image.", [str(image)], params, cont,
                                    max_dynamic_patch=1)
    assert result.status in ("pair", "identical", "too_short")
    if result.status == "too_short":  # random weights: only checkable when the answer had words
        assert len(re.findall(r"\S+", result.chosen)) < 2
        return
    assert result.rejected.startswith(result.prefix)
    assert len(result.prefix.split()) == len(result.chosen.split()) // 2
    assert seen[1] == [([], result.prefix, "Describe the image.")]
    again = build_dropout_ntp_pair(engine, "<image>\nDescribe the image.", [str(image)], params, cont,
                                   max_dynamic_patch=1)
    assert (again.chosen, again.rejected) == (result.chosen, result.rejected)  # seeded: reproducible


def test_many_jobs_in_two_calls_equal_each_job_alone(tiny224, tmp_path):
    """Twin of the batched builder: the real engine, five questions (two images, one text-only prompt
    style, different seeds) give in two generate calls what each gives alone."""
    from mpo.infer.engine import Engine

    from data_pipeline.dropout_ntp import DropoutNTPJob, build_dropout_ntp_pairs

    engine = Engine.load(tiny224, device="cpu", system_prompt=None)
    images = [str(write_image(tmp_path / f"{i}.png", size=(80 + 10 * i, 60), color=(40 * i, 90, 200))) for i in range(2)]
    jobs = [DropoutNTPJob(f"<image>\nDescribe image {i}.", [images[i % 2]],
                          SamplingParams(max_new_tokens=12, temperature=1.0, top_k=50, seed=10 + i),
                          SamplingParams(max_new_tokens=12, temperature=1.0, top_k=50, seed=20 + i), 1)
            for i in range(5)]
    calls = []
    real_generate = engine.generate

    def spy(requests, params):
        calls.append(len(requests))
        return real_generate(requests, params)

    engine.generate = spy
    together = build_dropout_ntp_pairs(engine, jobs, ratio=0.5)
    assert calls[0] == 5 and len(calls) <= 2 and sum(calls[1:]) == sum(r.status != "too_short" for r in together)
    alone = [build_dropout_ntp_pair(engine, j.prompt, j.images, j.chosen_params, j.continuation_params,
                                    max_dynamic_patch=1) for j in jobs]
    assert together == alone
    # params that differ beyond their seed cannot share a call: one call per job, same results
    mixed = [jobs[0], DropoutNTPJob(jobs[1].prompt, jobs[1].images,
                                    SamplingParams(max_new_tokens=7, temperature=1.0, seed=11), jobs[1].continuation_params, 1)]
    calls.clear()
    got = build_dropout_ntp_pairs(engine, mixed, ratio=0.5)
    assert calls[:2] == [1, 1]
    assert got[0] == alone[0]
    assert got[1] == build_dropout_ntp_pair(engine, mixed[1].prompt, mixed[1].images, mixed[1].chosen_params,
                                            mixed[1].continuation_params, max_dynamic_patch=1)
    assert build_dropout_ntp_pairs(engine, [], ratio=0.5) == []
    with pytest.raises(ValueError, match="ratio"):
        build_dropout_ntp_pairs(engine, jobs, ratio=1.0)
