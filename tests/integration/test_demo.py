"""`mpo demo`: a reduced run of the real command (every stage, a few questions and steps) whose outputs must
all exist and be well formed, plus the report helpers against hand-worked values and bad inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from mpo.demo import OUTPUTS, _hydra_str, prepare_output_dir
from mpo.demo_report import (
    EVAL_MODELS,
    accuracies,
    accuracy_table,
    majority_baseline,
    modal_answer_share,
    pair_statistics,
    training_summary,
)
from mpo.demo_settings import PRESETS, QUICK, DemoSettings

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("task", "model", "sft", "pairs", "mpo", "awq", "eval", "total")


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One reduced demo through the `mpo` entry point, shared by the output checks below."""
    out = tmp_path_factory.mktemp("demo") / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
    proc = subprocess.run([sys.executable, "-m", "mpo.cli", "demo", "--quick", "--output-dir", str(out),
                           "--seed", "0", "--device", "cpu"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, proc


def test_quick_demo_report_json(quick_demo):
    out, proc = quick_demo
    report = json.loads((out / "report.json").read_text())
    assert report["seed"] == 0 and report["device"] == "cpu"
    assert report["settings"]["num_test"] == QUICK.num_test
    assert set(report["accuracy"]) == set(EVAL_MODELS)
    for value in report["accuracy"].values():
        # n of 12 questions right: a multiple of 100/12 within [0, 100]
        assert 0 <= value <= 100
        assert abs(value * QUICK.num_test / 100 - round(value * QUICK.num_test / 100)) < 0.01
    assert report["deltas"]["mpo_minus_sft"] == pytest.approx(report["accuracy"]["mpo"] - report["accuracy"]["sft"])
    for key, first, second in (("mpo_vs_sft", "sft", "mpo"), ("mpo_awq_vs_mpo", "mpo", "mpo_awq")):
        cmp = report["paired"][key]  # the discordant questions explain the accuracy change exactly
        assert cmp["num_items"] == QUICK.num_test and 0.0 <= cmp["mcnemar_p"] <= 1.0
        assert cmp["net_points"] == pytest.approx(report["accuracy"][second] - report["accuracy"][first], abs=0.01)
    priors = report["answer_priors"]
    assert set(priors["modal_answer_share"]) == {"ground_truth", *EVAL_MODELS}
    for value in [priors["train_majority"], priors["build_majority"], *priors["modal_answer_share"].values()]:
        assert 0 <= value <= 100
    for value in priors["modal_answer_share"].values():  # at least one question per kind is its modal answer
        assert value * QUICK.num_test / 100 >= len(report["accuracy_by_kind"]["sft"]) - 0.01
    consistency = report["self_consistency"]  # the SFT model samples 2 answers per held-out question (quick)
    assert set(consistency) == {"sft"}
    for name, scores in consistency.items():
        assert scores["k"] == QUICK.consistency_samples and scores["num_items"] == QUICK.num_test
        assert scores["greedy"] == pytest.approx(report["accuracy"][name], abs=0.01)
        assert 0 <= scores["mean"] <= scores["pass"] <= 100 and scores["majority"] <= scores["pass"]
    pairs = report["pairs"]
    assert pairs["questions"] == QUICK.num_build
    assert pairs["num_pairs"] == sum(pairs["pairs"].values()) > 0
    assert pairs["ground_truth_questions"] + pairs["dropout_ntp_questions"] == QUICK.num_build
    assert report["training"]["sft"]["steps"] == QUICK.sft_steps
    assert report["training"]["mpo"]["steps"] == QUICK.mpo_steps
    timings = report["timings_s"]
    assert set(STAGES) <= set(timings) and all(timings[s] >= 0 for s in STAGES)
    assert timings["total"] >= sum(timings[s] for s in ("sft", "pairs", "mpo", "awq", "eval"))
    # the printed table is the report's
    assert report["table"] in proc.stdout
    assert "| MPO-AWQ (4-bit) |" in report["table"]


def test_quick_demo_stage_outputs(quick_demo):
    out, _ = quick_demo
    manifest = json.loads((out / "task" / "manifest.json").read_text())
    assert manifest["counts"] == {"train": QUICK.num_train, "build": QUICK.num_build, "test": QUICK.num_test}
    fixture = json.loads((out / "model" / "mpo_fixture.json").read_text())
    assert fixture["shape"]["text"]["hidden_size"] % 128 == 0
    assert fixture["shape"]["text"]["intermediate_size"] % 128 == 0
    for run in ("sft", "mpo"):
        rows = [json.loads(line) for line in (out / run / "metrics.jsonl").read_text().splitlines()]
        assert rows and all(isinstance(r["loss"], float) for r in rows)
        assert (out / run / "final" / "config.json").is_file()
        assert (out / run / "final" / "model.safetensors").is_file()
    mpo_first = json.loads((out / "mpo" / "metrics.jsonl").read_text().splitlines()[0])
    assert mpo_first["loss_dpo"] == pytest.approx(0.6931, abs=1e-3)  # π = π_ref at step 1: ln 2
    meta = json.loads((out / "pairs" / "meta.json").read_text())
    assert meta and all((out / "pairs" / entry["annotation"]).is_file() for entry in meta.values())
    awq_config = json.loads((out / "mpo_awq" / "config.json").read_text())
    quant = awq_config["quantization_config"]
    assert (quant["quant_method"], quant["bits"], quant["group_size"]) == ("awq", 4, 128)
    results = json.loads((out / "eval" / "results.json").read_text())
    assert set(results) == set(EVAL_MODELS)
    for name in EVAL_MODELS:
        predictions = (out / "eval" / "predictions" / name / "synthetic.jsonl").read_text().splitlines()
        assert len(predictions) == QUICK.num_test
    samples = [json.loads(line) for line in
               (out / "eval" / "predictions" / "sft" / "synthetic.samples.jsonl").read_text().splitlines()]
    assert len(samples) == QUICK.num_test and all(len(row["samples"]) == QUICK.consistency_samples for row in samples)
    assert not (out / "eval" / "predictions" / "mpo" / "synthetic.samples.jsonl").exists()


def test_quick_demo_markdown_plots_and_commands(quick_demo):
    out, _ = quick_demo
    text = (out / "report.md").read_text()
    for needle in ("## Held-out accuracy", "| SFT |", "| MPO |", "### Against answer priors",
                   "### What sharpening could gain", "## Preference pairs",
                   "## Time per stage",
                   "(sft_curves.png)", "(mpo_curves.png)", "(accuracy.png)"):
        assert needle in text
    for name in ("sft_curves.png", "mpo_curves.png", "accuracy.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100
    commands = (out / "commands.sh").read_text()
    for needle in ("+exp=demo_sft", "-m mpo.build_pairs", "+exp=demo_mpo", "-m mpo.export_awq", "-m mpo.evaluate"):
        assert needle in commands
    for stage in ("sft", "pairs", "mpo", "awq", "eval"):
        assert (out / "logs" / f"{stage}.log").is_file()


def test_separate_processes_give_the_same_outputs(quick_demo, tmp_path):
    """Twin of the default in-process stages: each stage as its own process, bit for bit the same run."""
    out, _ = quick_demo
    other = tmp_path / "separate"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
    proc = subprocess.run([sys.executable, "-m", "mpo.demo", "--quick", "--output-dir", str(other), "--seed", "0",
                           "--device", "cpu", "--separate-processes"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for weights in ("sft/final/model.safetensors", "mpo/final/model.safetensors", "mpo_awq/model.safetensors",
                    "pairs/meta.json", "eval/results.json"):
        assert (out / weights).read_bytes() == (other / weights).read_bytes(), weights
    mine, theirs = (json.loads((d / "report.json").read_text()) for d in (out, other))
    for key in ("accuracy", "accuracy_by_kind", "pairs", "training", "answer_priors", "self_consistency", "table"):
        assert mine[key] == theirs[key], key


def test_rerun_into_the_same_directory_is_refused_without_overwrite(quick_demo):
    out, _ = quick_demo
    proc = subprocess.run([sys.executable, "-m", "mpo.demo", "--quick", "--output-dir", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--overwrite" in proc.stderr and "already holds demo outputs" in proc.stderr
    assert (out / "report.json").is_file()  # nothing was removed


# ---------------------------------------------------------------- bad input and helpers (no demo run)

def test_bad_device_is_a_usage_error():
    proc = subprocess.run([sys.executable, "-m", "mpo.demo", "--device", "tpu"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "invalid choice: 'tpu'" in proc.stderr


def test_overwrite_removes_only_demo_outputs(tmp_path):
    (tmp_path / "report.md").write_text("old")
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "x").write_text("old")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="report.md"):
        prepare_output_dir(tmp_path, overwrite=False)
    prepare_output_dir(tmp_path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert "notes.txt" not in OUTPUTS


def test_settings_validation_lists_every_problem():
    with pytest.raises(ValueError) as err:
        DemoSettings(num_test=0, samples_per_question=1, dropout_ntp_share=1.5, temperature=0.0, sft_steps=0,
                     consistency_samples=1)
    message = str(err.value)
    for needle in ("num_test=0", "samples_per_question must be >= 2", "dropout_ntp_share=1.5", "temperature=0.0",
                   "sft_steps=0", "consistency_samples=1 must be 0 (off) or an integer >= 2"):
        assert needle in message
    assert DemoSettings(consistency_samples=0).consistency_samples == 0  # off: greedy evaluation only
    assert PRESETS["quick"].num_test < PRESETS["full"].num_test


def test_with_values_parses_by_field_type():
    changed = QUICK.with_values(["num_train=40", "temperature=0.7", "sft_steps=none", "fixed_options=false",
                                 "shape=tiny"])
    assert (changed.num_train, changed.temperature, changed.sft_steps) == (40, 0.7, None)
    assert changed.fixed_options is False and changed.shape == "tiny"
    assert isinstance(changed.temperature, float) and changed.num_build == QUICK.num_build
    assert QUICK.with_values([]) == QUICK
    assert DemoSettings(fixed_options=False).with_values(["fixed_options=TRUE"]).fixed_options is True


@pytest.mark.parametrize("assignment, message", [
    ("num_trains=10", "use KEY=VALUE with KEY one of"),  # unknown key
    ("num_train", "use KEY=VALUE"),  # no '='
    ("sft_overrides=optim.lr=1", "KEY one of"),  # the override tuples are set with --sft-arg, not --set
    ("num_train=lots", "expected int"),  # bad value type
    ("temperature=hot", "expected float"),
    ("fixed_options=maybe", "expected true or false"),
    ("num_train=0", "must be a positive integer"),  # well typed, out of range: validation still runs
])
def test_with_values_rejects_bad_input(assignment, message):
    with pytest.raises(ValueError, match=message):
        QUICK.with_values([assignment])


def test_bad_set_is_a_usage_error():
    proc = subprocess.run([sys.executable, "-m", "mpo.demo", "--quick", "--set", "num_train=lots"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "num_train='lots': expected int" in proc.stderr


def test_hydra_values_are_quoted_only_when_needed():
    assert _hydra_str("/tmp/run-1/sft_final") == "/tmp/run-1/sft_final"
    assert _hydra_str("custom:/a/b.jsonl") == "'custom:/a/b.jsonl'"
    assert _hydra_str(Path("/tmp/a b")) == "'/tmp/a b'"
    assert _hydra_str("") == "''"
    with pytest.raises(ValueError, match="single quote"):
        _hydra_str("/tmp/it's")


def test_accuracies_and_table_hand_worked():
    score = lambda overall, cats: {"synthetic": {"overall": overall, "categories": cats}}  # noqa: E731
    results = {"sft": score(40.0, {"count": 25.0}), "mpo": score(47.5, {"count": 50.0}),
               "mpo_awq": score(47.0, {"count": 50.0})}
    overall, by_kind = accuracies(results)
    assert overall == {"sft": 40.0, "mpo": 47.5, "mpo_awq": 47.0}
    assert by_kind["mpo"] == {"count": 50.0}
    table = accuracy_table(overall, 200)
    assert table.splitlines()[2] == "| SFT | 40.0 |  |"
    assert table.splitlines()[3] == "| MPO | 47.5 | +7.5 |"
    assert table.splitlines()[4] == "| MPO-AWQ (4-bit) | 47.0 | +7.0 |"
    paired = {"mpo_vs_sft": {"first_only": 3, "second_only": 18, "mcnemar_p": 0.0015},
              "mpo_awq_vs_mpo": {"first_only": 2, "second_only": 1, "mcnemar_p": 1.0}}
    lines = accuracy_table(overall, 200, paired).splitlines()
    assert lines[0].endswith("| McNemar p |") and lines[2] == "| SFT | 40.0 |  | | |"
    assert lines[3] == "| MPO | 47.5 | +7.5 | 3 / 18 | 0.002 |"
    assert lines[4] == "| MPO-AWQ (4-bit) | 47.0 | +7.0 | 2 / 1 | 1.000 |"
    with pytest.raises(ValueError, match="mpo_awq"):
        accuracies({"sft": results["sft"], "mpo": results["mpo"]})


def test_majority_baseline_hand_worked():
    reference = [{"kind": "exist", "answer": "Yes"}, {"kind": "exist", "answer": "Yes"},
                 {"kind": "exist", "answer": "No"}, {"kind": "count", "answer": "3"},
                 {"kind": "count", "answer": "2"}]  # count: a 1-1 tie goes to the first met, "3"
    test = [{"kind": "exist", "answer": "Yes"}, {"kind": "exist", "answer": "No"}, {"kind": "count", "answer": "3"},
            {"kind": "count", "answer": "2"}, {"kind": "digit", "answer": "7"}]  # digit: not in reference
    assert majority_baseline(reference, test) == 40.0  # Yes and 3 right: 2 of 5
    with pytest.raises(ValueError, match="at least one test question"):
        majority_baseline(reference, [])


def test_modal_answer_share_hand_worked():
    kinds = ["exist"] * 4 + ["count"] * 2
    assert modal_answer_share(kinds, ["Yes", "Yes", "Yes", "No", "1", "2"]) == 66.67  # (3 + 1) of 6
    assert modal_answer_share(kinds, ["No"] * 4 + ["1", "1"]) == 100.0
    assert modal_answer_share(["exist", "exist"], [None, "Yes"]) == 50.0  # no parsable answer is one more answer
    with pytest.raises(ValueError, match="one answer per question"):
        modal_answer_share(kinds, ["Yes"])


def test_pair_statistics_and_training_summary():
    stats = {"total": {
        "questions": 10, "samples": 70, "generated_tokens": 3000, "hard_questions": 2, "dropped_all_correct": 1,
        "ground_truth": {"questions": 8, "samples": 64, "positive": 16, "negative": 40, "format_failure": 8,
                         "positive_rate": 0.25, "outcomes": {"mixed": 5, "all_wrong": 2, "all_correct": 1}},
        "dropout_ntp": {"questions": 2, "samples": 4, "outcomes": {"pair": 2}},
        "pairs": {"pairs_vqa_correctness_rules": 12, "pairs_vqa_format_rules": 3, "prefix_pair_sr0.5_wo_image": 2},
        "rejects": {}}}
    pairs = pair_statistics(stats)
    assert pairs["num_pairs"] == 17 and pairs["positive_rate"] == 0.25
    assert pairs["ground_truth_questions"] + pairs["dropout_ntp_questions"] == pairs["questions"]
    rows = [{"step": 1, "loss": 1.5, "reward_accuracy": 0.0}, {"step": 5, "loss": 0.9, "reward_accuracy": 0.75}]
    summary = training_summary(rows)
    assert summary["steps"] == 5
    assert summary["first"]["loss"] == 1.5 and summary["last"]["reward_accuracy"] == 0.75
    assert summary["last"]["loss_bco"] is None


# ---------------------------------------------------------------- the task options the demo uses

def test_fixed_options_same_scenes_canonical_order():
    import random

    from data_pipeline.synthetic_questions import sample_question

    for i, kind in enumerate(("color", "position", "chart_tallest") * 20):
        shuffled = sample_question(random.Random(i), kind, 224, 224)
        fixed = sample_question(random.Random(i), kind, 224, 224, fixed_options=True)
        assert fixed["scene"] == shuffled["scene"] and fixed["question"] == shuffled["question"]
        assert sorted(fixed["options"]) == sorted(shuffled["options"])
        # the same option text is right in both; only its letter moves
        assert fixed["options"]["ABCD".index(fixed["answer"])] == shuffled["options"]["ABCD".index(shuffled["answer"])]
        expected = {"color": ["red", "green", "blue", "yellow"]}.get(kind)
        if kind == "position":
            expected = ["left", "right"] if fixed["query"]["axis"] == "horizontal" else ["top", "bottom"]
        if kind == "chart_tallest":
            expected = [f"bar {c}" for c in "ABCD"[: len(fixed["options"])]]
        assert fixed["options"] == expected


def test_reasoning_without_scene_description_hand_worked():
    import random

    from data_pipeline.synthetic_questions import cot_answer

    scene = {"type": "shapes", "width": 100, "height": 100, "background": [255, 255, 255],
             "objects": [{"shape": "circle", "color": "red", "cx": 20, "cy": 20, "r": 8},
                         {"shape": "circle", "color": "red", "cx": 60, "cy": 20, "r": 8},
                         {"shape": "square", "color": "blue", "cx": 20, "cy": 70, "r": 20}]}
    record = {"scene": scene, "query": {"op": "count", "filter": {"color": "red", "shape": "circle"}}, "answer": "2"}
    full = cot_answer(record, rng=random.Random(0))
    short = cot_answer(record, rng=random.Random(0), scene_description=False)
    assert full == "I see 2 red circles and 1 blue square. Counting the red circles gives 2.\nFinal answer: 2"
    assert short == "Counting the red circles gives 2.\nFinal answer: 2"
    wrong = cot_answer(record, correct=False, rng=random.Random(3), scene_description=False)
    assert not wrong.startswith("I see") and not wrong.endswith("Final answer: 2")


def test_task_flags_reach_the_sft_answers(tmp_path):
    from data_pipeline.synthetic import generate_task

    generate_task(tmp_path, seed=1, num_train=18, num_pairs_questions=0, num_test=0, image_size=96,
                  fixed_options=True, scene_description=False)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["fixed_options"] is True and manifest["scene_description"] is False
    rows = [json.loads(line) for line in (tmp_path / "sft" / "synthetic_sft.jsonl").read_text().splitlines()]
    assert len(rows) == 18 and not any(r["chosen"].startswith("I see ") and "digit" not in r["chosen"] for r in rows)
    with pytest.raises(ValueError, match="scene_description must be True or False"):
        generate_task(tmp_path, num_train=1, num_pairs_questions=0, num_test=0, scene_description="no")
