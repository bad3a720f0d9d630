"""`python -m mpo.evaluate` end to end on CPU: a tiny 224-px checkpoint on the synthetic task (as a
custom jsonl benchmark and as a VLMEvalKit-named TSV), resume, scoring-only mode, two models with
deltas, and user errors (exit 2, one message, no traceback)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def env():
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


@pytest.fixture(scope="module")
def task(tmp_path_factory, env) -> dict:
    """The synthetic task (12 test questions) and a data root whose MMStar.tsv holds its choice rows."""
    out = tmp_path_factory.mktemp("synthetic")
    subprocess.run([sys.executable, "-m", "data_pipeline.synthetic", str(out), "--num-train", "4",
                    "--num-build", "4", "--num-test", "12"], check=True, env=env, cwd=ROOT, capture_output=True)
    with (out / "test" / "SYNTHETIC.tsv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    choice_rows = [row for row in rows if row["A"]]  # MMStar is multiple choice: keep the rows with options
    assert 2 <= len(choice_rows) < len(rows)
    data_root = out / "lmudata"
    data_root.mkdir()
    with (data_root / "MMStar.tsv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter="\t", lineterminator="\n")
        writer.writeheader()
        writer.writerows(choice_rows)
    return {"custom": f"custom:{out / 'test' / 'synthetic.jsonl'}", "data_root": data_root,
            "choice_rows": choice_rows, "num_test": len(rows)}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> list[Path]:
    """Two random tiny checkpoints with 224-px tiles (64 tokens per tile), both named `model`."""
    from mpo.model.tiny import write_tiny_checkpoint

    base = tmp_path_factory.mktemp("models")
    return [write_tiny_checkpoint(base / name / "model", seed=seed, image_size=224)
            for seed, name in ((0, "base"), (1, "mpo"))]


def evaluate(env, cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mpo.evaluate", *overrides], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=240)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_generate_save_report_then_resume(tmp_path, env, task, models):
    out = tmp_path / "out"
    args = [f"model={models[0]}", f"benchmarks=[mmstar,{task['custom']}]", f"data_root={task['data_root']}",
            f"output_dir={out}", "batch_size=4", "device=cpu"]
    first = evaluate(env, tmp_path, *args)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-4000:]
    num_choice = len(task["choice_rows"])
    assert f"model / mmstar: {num_choice} questions, already had 0 predictions, generating {num_choice}" in first.stdout
    assert "questions/s" in first.stderr  # the tqdm bar

    predictions = out / "predictions" / "model"
    mmstar, synthetic = predictions / "mmstar.jsonl", predictions / "synthetic.jsonl"
    rows = _lines(synthetic)
    assert sorted(row["index"] for row in rows) == list(range(task["num_test"]))
    assert all(isinstance(row["prediction"], str) and row["question"].startswith("<image>\n") for row in rows)
    assert [row["index"] for row in _lines(mmstar)] == [int(row["index"]) for row in task["choice_rows"]]
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["mmstar", "synthetic"]  # one model: benchmark → score object
    for name, count in (("mmstar", num_choice), ("synthetic", task["num_test"])):
        assert 0.0 <= results[name]["overall"] <= 100.0
        assert results[name]["num_items"] == count and results[name]["missing"] == 0
    assert set(results["mmstar"]["categories"]) <= {"color", "position", "chart_tallest"}
    report = (out / "report.md").read_text()
    assert "| benchmark | model |" in report and "| synthetic |" in report
    assert (out / "scores.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / ".hydra" / "config.yaml").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing written to the working directory

    # Interrupt the custom benchmark after 5 answers (the 6th line cut mid-write), then rerun.
    complete = synthetic.read_text(encoding="utf-8").splitlines(keepends=True)
    synthetic.write_text("".join(complete[:5]) + complete[5][:20], encoding="utf-8")
    mmstar_mtime = mmstar.stat().st_mtime_ns
    second = evaluate(env, tmp_path, *args)
    assert second.returncode == 0, second.stderr[-4000:]
    assert f"mmstar: {num_choice} questions, already had {num_choice} predictions, generating 0" in second.stdout
    assert f"model / synthetic: {task['num_test']} questions, already had 5 predictions, generating " \
           f"{task['num_test'] - 5}" in second.stdout
    assert mmstar.stat().st_mtime_ns == mmstar_mtime
    # Greedy decoding: the resumed answers equal the uninterrupted run's.
    resumed = {row["index"]: row["prediction"] for row in _lines(synthetic)}
    assert resumed == {row["index"]: row["prediction"] for row in rows}
    assert json.loads((out / "results.json").read_text()) == results


def test_predictions_only_mode(tmp_path, env, task):
    choice_rows = task["choice_rows"]
    wrong = {"A": "B", "B": "A", "C": "A", "D": "A"}
    # Right on every row but the first: (n - 1) / n.
    good = tmp_path / "good.jsonl"
    good.write_text("".join(
        json.dumps({"index": int(row["index"]), "prediction": wrong[row["answer"]] if i == 0 else row["answer"]}) + "\n"
        for i, row in enumerate(choice_rows)))
    # Only the first row, answered with its option text: 1 right, the rest missing.
    sparse = tmp_path / "sparse.jsonl"
    first = choice_rows[0]
    sparse.write_text(json.dumps({"index": int(first["index"]), "prediction": first[first["answer"]]}) + "\n")
    out = tmp_path / "out"
    proc = evaluate(env, tmp_path, f"predictions=[{good},{sparse}]", "benchmarks=[mmstar]",
                    f"data_root={task['data_root']}", f"output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    n = len(choice_rows)
    results = json.loads((out / "results.json").read_text())
    assert results["good"]["mmstar"]["overall"] == pytest.approx(100 * (n - 1) / n)
    assert results["sparse"]["mmstar"]["overall"] == pytest.approx(100 / n)
    assert results["sparse"]["mmstar"]["missing"] == n - 1
    delta = 100 / n - 100 * (n - 1) / n
    assert f"| mmstar | {100 * (n - 1) / n:.1f} | {100 / n:.1f} ({delta:+.1f}) |" in (out / "report.md").read_text()
    assert not (out / "predictions").exists()


def test_two_models_report_deltas(tmp_path, env, task, models):
    out = tmp_path / "out"
    proc = evaluate(env, tmp_path, f"model=[{models[0]},{models[1]}]", "benchmarks=[mmstar]",
                    f"data_root={task['data_root']}", f"output_dir={out}", "limit=3", "progress=false")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(p.name for p in (out / "predictions").iterdir()) == ["base-model", "mpo-model"]
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["base-model", "mpo-model"]  # several models: model → benchmark → scores
    base, mpo = results["base-model"]["mmstar"]["overall"], results["mpo-model"]["mmstar"]["overall"]
    assert results["mpo-model"]["mmstar"]["num_items"] == 3
    assert f"| mmstar | {base:.1f} | {mpo:.1f} ({mpo - base:+.1f}) |" in (out / "report.md").read_text()
    assert "questions/s" not in proc.stderr


@pytest.mark.parametrize("case", ["missing_file", "unknown_benchmark", "empty_model_list"])
def test_user_errors_exit_2_with_a_message(tmp_path, env, task, models, case):
    overrides, expected = {
        "missing_file": ([f"model={models[0]}", "benchmarks=[ocrbench]", f"data_root={task['data_root']}"],
                         "benchmark file OCRBench.tsv not found in data_root"),
        "unknown_benchmark": ([f"model={models[0]}", "benchmarks=[mmstr]"], "unknown benchmark 'mmstr'"),
        "empty_model_list": (["model=[]", "benchmarks=[mmstar]"], "model is an empty list"),
    }[case]
    proc = evaluate(env, tmp_path, *overrides, f"output_dir={tmp_path / 'out'}")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert expected in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "results.json").exists()
