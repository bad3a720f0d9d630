"""The pair builder's loop (data_pipeline/driver.py) with a scripted engine: branches, records, shards, seeds."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest
from conftest import write_image

from data_pipeline.driver import build_pairs, question_seed, resolve_shard, shard_of, uses_dropout_ntp
from data_pipeline.writer import shard_path
from data_pipeline.sources import Question
from mpo.build_pairs import BuildConfig, DropoutNTPSection, ShardSection
from mpo.data.images import MediaError
from mpo.infer.engine import Generation

WHY = "Counting the objects in the picture one by one gives the total.\n"


def ans(text: str) -> str:
    return f"{WHY}Final answer: {text}"


# question text -> the responses the scripted engine returns for it (in order for K == len(pool))
POOLS = {
    "How many apples?": [ans("5"), ans("7"), ans("15"), "no idea at all"],  # mixed; "5" is inside "15"
    "How many pears?": [ans("3"), ans("three"), ans("3"), ans("3")],  # all correct
    "Which fruit is red?": [ans("A"), ans("C"), ans("A"), "maybe"],  # all wrong (answer B)
}
QUESTIONS = [
    {"id": "g1", "image": "img/a.png", "question": "<image>\nHow many apples? Answer the question using a single word or phrase.",
     "answer": "5", "source": "count"},
    {"id": "g2", "image": "img/a.png", "question": "<image>\nHow many pears?", "answer": "3", "source": "count"},
    {"id": "g3", "image": "img/b.png", "question": "<image>\nWhich fruit is red?", "answer": "B",
     "options": ["apple", "cherry", "lime"], "source": "pick", "match_mode": "choice"},
    {"id": "n1", "image": "img/a.png", "question": "<image>\nDescribe the scene.", "source": "caption"},
    {"id": "n2", "question": "Write a haiku about shapes.", "source": "caption"},
    {"id": "bad", "image": "img/missing.png", "question": "<image>\nWhat?", "answer": "x", "source": "count"},
    {"id": "c1", "image": "img/corrupt.png", "question": "<image>\nHow many apples?", "answer": "5", "source": "count"},
]


class ScriptedEngine:
    """Stands in for mpo.infer.engine.Engine: crafted answers, seeded offsets, every request recorded.

    With ``seeded``, the pool is read from an offset drawn from ``params.seed``, so results move
    if a question's seed does. ``crash_after`` raises after that many generate calls (a kill).
    """

    def __init__(self, *, pools: dict[str, list[str]] = POOLS, seeded: bool = False, crash_after: int | None = None):
        self.pools, self.seeded, self.crash_after = pools, seeded, crash_after
        self.calls: list = []

    def generate(self, requests, params):
        if self.crash_after is not None and len(self.calls) >= self.crash_after:
            raise KeyboardInterrupt("simulated kill")
        self.calls.append((requests, params))
        if any("corrupt" in str(image) for request in requests for image in request.images):
            raise MediaError("corrupt_image", "cannot decode image")  # encoding fails the whole call
        return [self._answer(request, params) for request in requests]

    def _answer(self, request, params):
        if request.assistant_prefix:
            texts = [" and then something unrelated happens."]
        else:
            pool = next((p for q, p in self.pools.items() if q in request.question), None)
            if pool is None:  # Dropout-NTP chosen answers
                pool = [f"A calm scene with {n} shapes placed on a light background." for n in range(2, 9)]
            seed = params.seed if request.seed is None else request.seed
            offset = random.Random(seed).randrange(len(pool)) if self.seeded else 0
            texts = [pool[(offset + i) % len(pool)] for i in range(params.num_samples)]
        return [Generation(t, list(range(len(t) // 4 + 1)), [-0.5] * (len(t) // 4 + 1), True) for t in texts]


def make_inputs(root: Path, rows=QUESTIONS) -> Path:
    write_image(root / "data" / "img" / "a.png")
    write_image(root / "data" / "img" / "b.png", color=(10, 200, 10))
    (root / "data" / "img" / "corrupt.png").write_bytes(b"not a png")
    path = root / "data" / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "model").mkdir(exist_ok=True)  # the scripted engine needs no checkpoint, only a directory
    return path


def make_cfg(root: Path, out: str = "out", **overrides) -> BuildConfig:
    fields = dict(model_dir=str(root / "model"), questions=str(root / "data" / "questions.jsonl"),
                  output_dir=str(root / out), samples_per_question=4, pairs_per_question=15, max_new_tokens=16,
                  progress=False, shard=ShardSection(0, 1))
    fields.update(overrides)
    return BuildConfig(**fields)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------- shards and seeds


def test_shard_of_is_a_stable_hash_of_the_id():
    for qid in ("g1", "build_00017", "ümlaut"):
        expected = int(hashlib.sha256(qid.encode()).hexdigest()[:16], 16)
        assert shard_of(qid, 7) == expected % 7
    counts = [0, 0, 0]
    for i in range(300):
        counts[shard_of(f"q{i}", 3)] += 1
    assert all(80 <= c <= 120 for c in counts), counts  # roughly balanced


def test_question_seed_depends_on_seed_and_id_only():
    assert question_seed(0, "a") == question_seed(0, "a")
    assert len({question_seed(0, "a"), question_seed(1, "a"), question_seed(0, "b"),
                question_seed(0, "a", "continuation")}) == 4
    assert 0 <= question_seed(123, "x") < 2**31


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, (0, 1)),
        ({"RANK": "3", "WORLD_SIZE": "8"}, (3, 8)),
        ({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "3"}, (2, 4)),
        ({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "0",
          "SLURM_ARRAY_TASK_STEP": "2"}, (2, 3)),
        ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2", "RANK": "1", "WORLD_SIZE": "4"}, (5, 8)),
    ],
)
def test_resolve_shard_from_environment(env, expected):
    assert resolve_shard(None, None, env) == expected


def test_resolve_shard_explicit_and_bad_values():
    assert resolve_shard(1, 3, {"RANK": "0", "WORLD_SIZE": "2"}) == (1, 3)  # explicit wins
    with pytest.raises(ValueError, match="set both shard.index and shard.count"):
        resolve_shard(1, None, {})
    with pytest.raises(ValueError, match=r"shard.index=3 must be in \[0, shard.count=3\)"):
        resolve_shard(3, 3, {})


def test_dropout_share_is_seeded_by_id():
    with_gt = [Question(f"q{i}", "s", "q?", answer="1") for i in range(400)]
    chosen = [q.id for q in with_gt if uses_dropout_ntp(q, 0, 0.25)]
    assert 70 <= len(chosen) <= 130
    assert chosen == [q.id for q in with_gt if uses_dropout_ntp(q, 0, 0.25)]
    assert not any(uses_dropout_ntp(q, 0, 0.0) for q in with_gt)
    assert all(uses_dropout_ntp(q, 0, 1.0) for q in with_gt)
    assert uses_dropout_ntp(Question("x", "s", "q?", answer=None), 0, 0.0)  # no answer: always


def test_config_validation_lists_every_problem():
    with pytest.raises(ValueError) as err:
        BuildConfig(output_dir="", model_dir=None, questions=None, samples_per_question=0, top_p=0,
                    prompt_style="xml", match_modes={"a": "fuzzy"}, dropout_ntp=DropoutNTPSection(ratio=1.0))
    message = str(err.value)
    for part in ("output_dir is required", "model= and questions= are required", "samples_per_question=0",
                 "top_p=0", "prompt_style='xml'", "fuzzy", "dropout_ntp.ratio=1.0"):
        assert part in message
    BuildConfig(output_dir="o", stage="merge")  # merge needs neither model nor questions


# ---------------------------------------------------------------- one run, hand-checked


def test_ground_truth_and_dropout_branches(tmp_path):
    make_inputs(tmp_path)
    engine = ScriptedEngine()
    result = build_pairs(make_cfg(tmp_path), engine=engine)
    out = result.out_dir
    assert result.shard.num_done == 6 and result.merge is not None
    # g1, g2, g3 and c1 in one call (K samples each), which c1's corrupt image fails; then each alone, so
    # only c1 is rejected; then n1's chosen answer and its continuation (the Dropout-NTP questions' calls).
    assert [len(requests) for requests, _ in engine.calls] == [4, 1, 1, 1, 1, 1, 1]
    assert [requests[0].assistant_prefix != "" for requests, _ in engine.calls] == [False] * 6 + [True]

    correctness = read_jsonl(out / "count_pairs_vqa_correctness_rules.jsonl")
    # g1: positives {0: "5"} x negatives {1: "7", 2: "15"}, minus the entailed ("5" in "15") pair
    assert [(r["chosen_meta"]["index"], r["rejected_meta"]["index"]) for r in correctness] == [(0, 1)]
    rec = correctness[0]
    assert rec["chosen"] == ans("5") and rec["rejected"] == ans("7") and rec["answer_gt"] == "5"
    assert rec["image"] == "img/a.png" and rec["id"] == "g1"
    assert rec["question"].startswith("Your task is to answer the question below.")
    assert rec["question"].endswith("Question:\n\n<image>\nHow many apples?")  # instruction stripped
    assert rec["chosen_meta"] == {"index": 0, "answer": "5", "correct": True, "format": "ok", "finished": True,
                                  "num_tokens": len(ans("5")) // 4 + 1}
    assert rec["rejected_meta"]["correct"] is False and rec["rejected_meta"]["answer"] == "7"

    fmt = read_jsonl(out / "count_pairs_vqa_format_rules.jsonl")
    assert [(r["chosen"], r["rejected"]) for r in fmt] == [(ans("5"), "no idea at all")]  # g1 only
    assert fmt[0]["rejected_meta"]["correct"] is None and fmt[0]["rejected_meta"]["answer"] is None

    ntp = read_jsonl(out / "caption_prefix_pair_sr0.5_wo_image.jsonl")
    assert [r["id"] for r in ntp] == ["n1"]  # n2 is text-only: no image to drop
    assert ntp[0]["question"] == "<image>\nDescribe the scene." and ntp[0]["image"] == "img/a.png"
    prefix = " ".join(ntp[0]["chosen"].split()[: len(ntp[0]["chosen"].split()) // 2])
    assert ntp[0]["rejected"] == prefix + " and then something unrelated happens."

    hard = read_jsonl(out / "hard_questions.jsonl")
    assert [(h["id"], h["answers"]) for h in hard] == [("g3", ["A", "C", "A"])]
    assert hard[0]["options"] == ["apple", "cherry", "lime"] and hard[0]["match_mode"] == "choice"

    rejects = read_jsonl(out / "rejects.jsonl")
    assert [(r["id"], r["reason"], r["line"]) for r in rejects] == [("bad", "missing_image", 6), ("c1", "corrupt_image", 7)]

    meta = json.loads((out / "meta.json").read_text())
    assert sorted(meta) == ["caption_prefix_pair_sr0.5_wo_image", "count_pairs_vqa_correctness_rules",
                            "count_pairs_vqa_format_rules"]
    assert meta["caption_prefix_pair_sr0.5_wo_image"] == {
        "root": "../data", "annotation": "caption_prefix_pair_sr0.5_wo_image.jsonl", "repeat_time": 1, "length": 1}

    stats = json.loads((out / "stats.json").read_text())
    count = stats["sources"]["count"]
    assert count["questions"] == 2 and count["samples"] == 8 and count["dropped_all_correct"] == 1
    assert count["ground_truth"]["positive"] == 1 + 4 and count["ground_truth"]["negative"] == 2
    assert count["ground_truth"]["positive_rate"] == pytest.approx(5 / 8)
    assert count["ground_truth"]["outcomes"] == {"all_correct": 1, "mixed": 1}
    assert count["pairs"] == {"pairs_vqa_correctness_rules": 1, "pairs_vqa_format_rules": 1}
    assert count["rejects"] == {"corrupt_image": 1, "missing_image": 1}
    assert stats["sources"]["pick"]["hard_questions"] == 1
    assert stats["sources"]["caption"]["dropout_ntp"] == {"questions": 2, "samples": 2,
                                                          "outcomes": {"no_image": 1, "pair": 1}}
    assert stats["total"]["samples"] == 4 + 4 + 4 + 2
    assert stats["total"]["pairs"] == {"pairs_vqa_correctness_rules": 1, "pairs_vqa_format_rules": 1,
                                       "prefix_pair_sr0.5_wo_image": 1}

    # K samples per question, each request seeded by (seed, id); images resolved under the root
    gt_calls = [(reqs, p) for reqs, p in engine.calls if p.num_samples == 4]
    assert len(gt_calls) == 5  # g1, g2, g3, c1 together, then alone
    for reqs, params in gt_calls:
        for req in reqs:
            assert Path(req.images[0]).is_absolute() and req.max_dynamic_patch == 6
            qid = next(q["id"] for q in QUESTIONS
                       if q["question"].split("?")[0] in req.question and req.images[0].endswith(q["image"]))
            assert req.seed == question_seed(0, qid)
        assert (params.temperature, params.top_k, params.max_new_tokens) == (1.0, 50, 16)


def test_questions_sampled_together_equal_one_at_a_time(tmp_path):
    rows = [q for q in QUESTIONS if q["id"] != "c1"]
    make_inputs(tmp_path, rows)
    engine = ScriptedEngine(seeded=True)
    together = build_pairs(make_cfg(tmp_path, out="together"), engine=engine)
    assert sorted(len(reqs) for reqs, p in engine.calls if p.num_samples == 4) == [3]  # g1, g2, g3 in one call
    alone = build_pairs(make_cfg(tmp_path, out="alone", questions_per_call=1), engine=ScriptedEngine(seeded=True))
    two = build_pairs(make_cfg(tmp_path, out="two", questions_per_call=2), engine=ScriptedEngine(seeded=True))
    for result in (alone, two):
        assert shard_path(result.out_dir, 0, 1).read_bytes() == shard_path(together.out_dir, 0, 1).read_bytes()
    with pytest.raises(ValueError, match="questions_per_call=0 must be >= 1"):
        make_cfg(tmp_path, questions_per_call=0)


def test_pairs_per_question_and_per_source_overrides(tmp_path):
    rows = [{"id": "m", "question": "How many apples?", "answer": "5", "source": "count"}]
    make_inputs(tmp_path, rows)
    engine = ScriptedEngine(pools={"How many apples?": [ans("5"), ans("6"), ans("5 apples"), ans("8"), ans("9")]})
    out = build_pairs(make_cfg(tmp_path, samples_per_question=5, pairs_per_question=2), engine=engine).out_dir
    assert len(read_jsonl(out / "count_pairs_vqa_correctness_rules.jsonl")) == 2  # 2 x 3 = 6 cut to 2
    out = build_pairs(make_cfg(tmp_path, out="out2", samples_per_question=5, source_pairs_per_question={"count": 5},
                               match_modes={"count": "exact"}), engine=engine).out_dir
    pairs = read_jsonl(out / "count_pairs_vqa_correctness_rules.jsonl")
    # exact mode: "5 apples" is now a negative, but "5" is inside it (entailed): 1 x 3 pairs remain
    assert len(pairs) == 3 and {p["rejected_meta"]["answer"] for p in pairs} == {"6", "8", "9"}
