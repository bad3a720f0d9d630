"""Evaluation runner (mpo.eval.runner) with a fake engine: batching, prompts and tiles, saved
predictions and resume, scoring-only mode, naming, config validation and the Hydra config."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from mpo.eval.runner import (
    EvalConfig,
    benchmark_labels,
    name_models,
    read_predictions,
    run_evaluation,
)

MMSTAR_ROWS = [  # gold letters A, B, A, C
    {"index": 0, "question": "Which is red?", "A": "apple", "B": "sky", "C": "grass", "D": "snow", "answer": "A",
     "category": "color"},
    {"index": 1, "question": "Which is blue?", "A": "apple", "B": "sky", "C": "grass", "D": "snow", "answer": "B",
     "category": "color"},
    {"index": 2, "question": "How many legs has a cat?", "A": "4", "B": "2", "C": "6", "D": "8", "answer": "A",
     "category": "count"},
    {"index": 3, "question": "How many legs has a bird?", "A": "4", "B": "6", "C": "2", "D": "8", "answer": "C",
     "category": "count"},
]


def _png_base64(color=(10, 20, 30)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _write_tsv(path: Path, rows: list[dict]) -> Path:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def root(tmp_path) -> Path:
    rows = [dict(row) for row in MMSTAR_ROWS]
    rows[0]["image"] = _png_base64()  # one row with an image, the others text-only
    _write_tsv(tmp_path / "data" / "MMStar.tsv", rows)
    return tmp_path / "data"


def _model_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


class FakeEngine:
    """Answers every request with ``answer(request)``; records each generate call. Answers longer
    than 20 characters count as cut at max_new_tokens."""

    def __init__(self, answer=lambda request: "A"):
        self.answer = answer
        self.calls: list[tuple[list, object]] = []

    def generate(self, requests, params):
        self.calls.append((list(requests), params))
        return [[SimpleNamespace(text=text, finished=len(text) <= 20)] for text in map(self.answer, requests)]


def _factory(engines: dict[str, FakeEngine], loaded: list[str] | None = None):
    def load(path, cfg):
        if loaded is not None:
            loaded.append(path.name)
        return engines[path.name] if path.name in engines else engines["*"]
    return load


def _run(cfg: EvalConfig, engine: FakeEngine | None = None, loaded=None, log=None):
    messages = log if log is not None else []
    return run_evaluation(cfg, engine_factory=_factory({"*": engine or FakeEngine()}, loaded),
                          log=messages.append)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------- generate and score

def test_generates_in_batches_saves_and_scores(tmp_path, root):
    model = _model_dir(tmp_path / "ckpt")
    engine = FakeEngine()  # always "A": right on rows 0 and 2 of 4
    cfg = EvalConfig(model=str(model), benchmarks=["mmstar"], data_root=str(root), output_dir=str(tmp_path / "out"),
                     batch_size=3, progress=False)
    results = _run(cfg, engine)

    assert [len(requests) for requests, _ in engine.calls] == [3, 1]
    params = engine.calls[0][1]
    assert (params.max_new_tokens, params.temperature, params.num_samples) == (64, 0.0, 1)
    first = engine.calls[0][0][0]
    assert first.max_dynamic_patch == 6  # MMStar's tile default
    assert first.question.startswith("<image>\nWhich is red?\nA. apple\nB. sky")
    assert first.question.endswith("Answer with the option's letter from the given choices directly.")
    assert len(first.images) == 1 and first.images[0].size == (8, 6)
    assert engine.calls[0][0][1].images == [] and "<image>" not in engine.calls[0][0][1].question

    mmstar = results["ckpt"]["mmstar"]
    assert mmstar["overall"] == pytest.approx(100 * 2 / 4)
    assert mmstar["categories"] == {"color": 50.0, "count": 50.0}
    saved = _lines(tmp_path / "out" / "predictions" / "ckpt" / "mmstar.jsonl")
    assert [row["index"] for row in saved] == [0, 1, 2, 3]
    assert all(row["prediction"] == "A" and row["finished"] is True for row in saved)
    assert saved[1]["question"] == engine.calls[0][0][1].question
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(written) == {"mmstar"} and written["mmstar"]["overall"] == 50.0  # one model: benchmark → scores
    assert "| mmstar | 50.0 |" in (tmp_path / "out" / "report.md").read_text()
    assert (tmp_path / "out" / "scores.png").read_bytes()[:4] == b"\x89PNG"
    settings = json.loads((tmp_path / "out" / "predictions" / "ckpt" / "mmstar.settings.json").read_text())
    assert settings["cot"] is False and settings["max_tiles"] == 6 and settings["max_new_tokens"] == 64


def test_cot_prompt_budget_and_final_answer_parsing(tmp_path, root):
    model = _model_dir(tmp_path / "ckpt")
    # "A" appears in the reasoning, the answer after "Final answer:" is the gold one for rows 1 and 3 only.
    gold = {"Which is blue?": "B", "How many legs has a bird?": "C"}
    engine = FakeEngine(lambda r: "Option A looks wrong. Final answer: " + next(
        (letter for q, letter in gold.items() if q in r.question), "D"))
    cfg = EvalConfig(model=str(model), benchmarks=["mmstar"], data_root=str(root), output_dir=str(tmp_path / "out"),
                     cot=True, progress=False)
    results = _run(cfg, engine)
    requests, params = engine.calls[0]
    assert params.max_new_tokens == 1024
    assert 'please use the format "Final answer: .."' in requests[0].question
    assert results["ckpt"]["mmstar"]["overall"] == 50.0


def test_limit_and_max_tiles_override(tmp_path, root):
    model = _model_dir(tmp_path / "ckpt")
    engine = FakeEngine()
    cfg = EvalConfig(model=str(model), benchmarks=["mmstar"], data_root=str(root), output_dir=str(tmp_path / "out"),
                     limit=2, max_tiles=3, max_new_tokens=7, progress=False)
    results = _run(cfg, engine)
    requests, params = engine.calls[0]
    assert [r.max_dynamic_patch for r in requests] == [3, 3] and params.max_new_tokens == 7
    assert results["ckpt"]["mmstar"]["num_items"] == 2
    assert results["ckpt"]["mmstar"]["overall"] == 50.0  # rows 0 (A, right) and 1 (B, wrong)


def test_multi_image_items_and_benchmark_tile_default(tmp_path):
    rows = [{"index": 7, "question": "Compare <image 1> and <image 2>.", "A": "same", "B": "different",
             "answer": "B", "category": "Art", "split": "validation",
             "image": repr([_png_base64((255, 0, 0)), _png_base64((0, 0, 255))])}]
    _write_tsv(tmp_path / "data" / "MMMU_DEV_VAL.tsv", rows)
    engine = FakeEngine(lambda r: "B")
    cfg = EvalConfig(model=str(_model_dir(tmp_path / "ckpt")), benchmarks=["mmmu"], data_root=str(tmp_path / "data"),
                     output_dir=str(tmp_path / "out"), progress=False)
    results = _run(cfg, engine)
    request = engine.calls[0][0][0]
    assert request.question.startswith("Image-1: <image>\nImage-2: <image>\nCompare")
    assert [image.getpixel((0, 0)) for image in request.images] == [(255, 0, 0), (0, 0, 255)]
    assert request.max_dynamic_patch == 12  # MMMU's default; the engine splits it over the 2 images
    assert results["ckpt"]["mmmu"]["overall"] == 100.0


def test_custom_benchmark_is_named_after_its_file(tmp_path):
    Image.new("RGB", (4, 4), (0, 255, 0)).save(tmp_path / "green.png")
    records = [
        {"index": "a", "image": "green.png", "question": "What color?", "options": ["red", "green"],
         "answer": "B", "scorer": "choice"},
        {"index": "b", "question": "2 + 2 = ?", "answer": "4", "scorer": "number"},
        {"index": "c", "question": "Is grass green?", "answer": "yes", "scorer": "yesno"},
    ]
    path = tmp_path / "toy.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    answers = {"What color?": "B", "2 + 2 = ?": "It is 5.", "Is grass green?": "Yes."}
    engine = FakeEngine(lambda r: next(a for q, a in answers.items() if q in r.question))
    cfg = EvalConfig(model=str(_model_dir(tmp_path / "ckpt")), benchmarks=[f"custom:{path}"],
                     output_dir=str(tmp_path / "out"), progress=False)
    results = _run(cfg, engine)
    assert results["ckpt"]["toy"]["overall"] == pytest.approx(100 * 2 / 3)
    assert results["ckpt"]["toy"]["scorers"] == {"choice": 100.0, "number": 0.0, "yesno": 100.0}
    assert [row["index"] for row in _lines(tmp_path / "out" / "predictions" / "ckpt" / "toy.jsonl")] == ["a", "b", "c"]


def test_two_models_share_items_and_report_deltas(tmp_path, root):
    first, second = _model_dir(tmp_path / "a" / "final"), _model_dir(tmp_path / "b" / "final")
    engines = {"*": FakeEngine(lambda r: "A")}  # 50 %
    loaded = []
    right = {"Which is red?": "A", "Which is blue?": "B", "How many legs has a cat?": "A"}

    def load(path, cfg):
        loaded.append(str(path))
        return engines["*"] if path == first else FakeEngine(lambda r: next(
            (a for q, a in right.items() if q in r.question), "D"))  # 75 %

    cfg = EvalConfig(model=[str(first), str(second)], benchmarks=["mmstar"], data_root=str(root),
                     output_dir=str(tmp_path / "out"), progress=False)
    results = run_evaluation(cfg, engine_factory=load, log=lambda message: None)
    assert list(results) == ["a-final", "b-final"]
    assert loaded == [str(first), str(second)]
    assert results["b-final"]["mmstar"]["overall"] == 75.0
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(written) == {"a-final", "b-final"} and written["a-final"]["mmstar"]["overall"] == 50.0
    assert "| mmstar | 50.0 | 75.0 (+25.0) |" in (tmp_path / "out" / "report.md").read_text()


# ------------------------------------------------------------------------------------ resume

def test_resume_skips_saved_rows_and_cuts_a_partial_last_line(tmp_path, root):
    model = _model_dir(tmp_path / "ckpt")
    cfg = EvalConfig(model=str(model), benchmarks=["mmstar"], data_root=str(root), output_dir=str(tmp_path / "out"),
                     progress=False)
    _run(cfg)
    path = tmp_path / "out" / "predictions" / "ckpt" / "mmstar.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + lines[2] + lines[3][:10])  # rows 0 and 2 kept, row 3 cut mid-write

    engine, log = FakeEngine(lambda r: "B"), []
    results = _run(cfg, engine, log=log)
    assert [r.question.split("\n")[0] for r in engine.calls[0][0]] == ["Which is blue?", "How many legs has a bird?"]
    assert "ckpt / mmstar: 4 questions, already had 2 predictions, generating 2" in log
    saved = {row["index"]: row["prediction"] for row in _lines(path)}
    assert saved == {0: "A", 2: "A", 1: "B", 3: "B"}
    assert results["ckpt"]["mmstar"]["overall"] == 75.0


def test_resume_keeps_a_complete_last_line_without_newline(tmp_path, root):
    model = _model_dir(tmp_path / "ckpt")
    path = tmp_path / "out" / "predictions" / "ckpt" / "mmstar.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text('{"index": 0, "prediction": "A"}\n{"index": 3, "prediction": "C"}')  # hand-written, no newline
    engine, log = FakeEngine(lambda r: "A long answer that never reaches a letter"), []
    results = _run(EvalConfig(model=str(model), benchmarks=["mmstar"], data_root=str(root),
                              output_dir=str(tmp_path / "out"), progress=False), engine, log=log)
    assert len(engine.calls[0][0]) == 2
    assert [row["index"] for row in _lines(path)] == [0, 3, 1, 2]
    assert results["ckpt"]["mmstar"]["overall"] == 50.0
    assert any(line.startswith("ckpt / mmstar: generated 2 in") and line.endswith("; 2 hit max_new_tokens=64")
               for line in log)


def test_fully_predicted_model_is_not_loaded(tmp_path, root):
    model = _model_dir(tmp_path / "ckpt")
    cfg = EvalConfig(model=str(model), benchmarks=["mmstar"], data_root=str(root), output_dir=str(tmp_path / "out"),
                     progress=False)
    _run(cfg)
    path = tmp_path / "out" / "predictions" / "ckpt" / "mmstar.jsonl"
    before = path.read_bytes()
    loaded, log = [], []
    results = _run(cfg, loaded=loaded, log=log)
    assert loaded == [] and path.read_bytes() == before
    assert "ckpt / mmstar: 4 questions, already had 4 predictions, generating 0" in log
    assert results["ckpt"]["mmstar"]["overall"] == 50.0


def test_resume_under_other_settings_is_refused(tmp_path, root):
    model = _model_dir(tmp_path / "ckpt")
    common = dict(model=str(model), benchmarks=["mmstar"], data_root=str(root), output_dir=str(tmp_path / "out"),
                  progress=False)
    _run(EvalConfig(**common))
    with pytest.raises(ValueError, match=r"other settings \(cot: saved False, now True"):
        _run(EvalConfig(**common, cot=True))
    with pytest.raises(ValueError, match="max_tiles: saved 6, now 2"):
        _run(EvalConfig(**common, max_tiles=2))


def test_missing_checkpoint_fails_before_any_generation(tmp_path, root):
    good = _model_dir(tmp_path / "good")
    engine = FakeEngine()
    cfg = EvalConfig(model=[str(good), str(tmp_path / "nope")], benchmarks=["mmstar"], data_root=str(root),
                     output_dir=str(tmp_path / "out"), progress=False)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        _run(cfg, engine)
    assert engine.calls == []


def test_missing_benchmark_file_fails_before_loading_a_model(tmp_path, root):
    loaded = []
    cfg = EvalConfig(model=str(_model_dir(tmp_path / "ckpt")), benchmarks=["mmstar", "ocrbench"],
                     data_root=str(root), output_dir=str(tmp_path / "out"), progress=False)
    with pytest.raises(FileNotFoundError, match="OCRBench.tsv not found in data_root"):
        _run(cfg, loaded=loaded)
    assert loaded == []


# ------------------------------------------------------------------------- predictions only

def _write_predictions(path: Path, answers: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"index": k, "prediction": v}) + "\n" for k, v in answers.items()))
    return path


def test_predictions_only_scores_files_without_a_model(tmp_path, root):
    good = _write_predictions(tmp_path / "good.jsonl", {0: "A", 1: "The answer is B", 2: "(A)", 3: "C"})
    partial = _write_predictions(tmp_path / "partial.jsonl", {0: "A", "1": "D"})  # 2 and 3 missing
    cfg = EvalConfig(predictions=[str(good), str(partial)], benchmarks=["mmstar"], data_root=str(root),
                     output_dir=str(tmp_path / "out"))
    results = run_evaluation(cfg, engine_factory=None, log=lambda message: None)
    assert results["good"]["mmstar"]["overall"] == 100.0
    assert results["partial"]["mmstar"]["overall"] == 25.0 and results["partial"]["mmstar"]["missing"] == 2
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| mmstar | 100.0 | 25.0 (-75.0) |" in report and "2 items had no prediction" in report


def test_predictions_folder_from_a_previous_run(tmp_path, root):
    run = tmp_path / "run" / "predictions" / "mpo"
    _write_predictions(run / "mmstar.jsonl", {0: "A", 1: "A", 2: "A", 3: "A"})
    cfg = EvalConfig(predictions=str(run), benchmarks=["mmstar"], data_root=str(root), output_dir=str(tmp_path / "o"))
    assert run_evaluation(cfg, log=lambda m: None)["mpo"]["mmstar"]["overall"] == 50.0
    # A file named after its benchmark takes its folder's name.
    cfg = EvalConfig(predictions=str(run / "mmstar.jsonl"), benchmarks=["mmstar"], data_root=str(root),
                     output_dir=str(tmp_path / "o2"))
    assert list(run_evaluation(cfg, log=lambda m: None)) == ["mpo"]


def test_predictions_only_errors(tmp_path, root):
    _write_tsv(root / "OCRBench.tsv", [{"index": 0, "question": "text?", "answer": "['hi']", "category": "t"}])
    one = _write_predictions(tmp_path / "p.jsonl", {0: "A"})
    base = dict(data_root=str(root), output_dir=str(tmp_path / "out"))
    with pytest.raises(ValueError, match="one file but 2 benchmarks"):
        run_evaluation(EvalConfig(predictions=str(one), benchmarks=["mmstar", "ocrbench"], **base))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_evaluation(EvalConfig(predictions=str(tmp_path / "none.jsonl"), benchmarks=["mmstar"], **base))
    stray = _write_predictions(tmp_path / "stray.jsonl", {100: "A", 101: "B"})
    with pytest.raises(ValueError, match="none of the 2 predictions .* matches an index of mmstar"):
        run_evaluation(EvalConfig(predictions=str(stray), benchmarks=["mmstar"], **base))
    folder = tmp_path / "folder"
    _write_predictions(folder / "mmstar.jsonl", {0: "A"})
    with pytest.raises(FileNotFoundError, match="lacks .*ocrbench.jsonl"):
        run_evaluation(EvalConfig(predictions=str(folder), benchmarks=["mmstar", "ocrbench"], **base))


@pytest.mark.parametrize("content,message", [
    ('{"index": 0, "prediction": "A"}\nnot json\n', r"p.jsonl:2: not valid JSON"),
    ('{"index": 0}\n', r'p.jsonl:1: each line needs "index" and "prediction"'),
    ('{"index": 0, "prediction": null}\n', "prediction must be a str, got NoneType"),
    ('{"index": [0], "prediction": "A"}\n', "index must be an int or a str"),
    ('{"index": 0, "prediction": "A"}\n\n{"index": "0", "prediction": "B"}\n',
     "p.jsonl:3: index '0' already appeared on line 1"),
])
def test_read_predictions_rejects_bad_rows(tmp_path, content, message):
    (tmp_path / "p.jsonl").write_text(content)
    with pytest.raises(ValueError, match=message):
        read_predictions(tmp_path / "p.jsonl")


def test_read_predictions_keys_by_string_index(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"index": 3, "prediction": "A", "question": "q"}\n\n'
                                      '{"index": "x", "prediction": ""}\n')
    rows = read_predictions(tmp_path / "p.jsonl")
    assert list(rows) == ["3", "x"] and rows["3"]["prediction"] == "A" and rows["x"]["prediction"] == ""


# ------------------------------------------------------------------------------ naming, config

def test_model_names_are_directory_names_made_unique(tmp_path):
    names = name_models([str(tmp_path / "runs" / "a" / "final"), str(tmp_path / "runs" / "b" / "final/"),
                         str(tmp_path / "InternVL2_5-4B")])
    assert list(names) == ["a-final", "b-final", "InternVL2_5-4B"]
    assert list(name_models([str(tmp_path / "x" / "m"), str(tmp_path / "x" / "m")])) == ["x-m", "x-m_2"]
    assert list(name_models({"base": "/a", "mpo": "/b"})) == ["base", "mpo"]
    assert list(name_models(str(tmp_path / "ckpt"))) == ["ckpt"]
    with pytest.raises(ValueError, match="cannot be folder names"):
        name_models({"a/b": "/x"})


def test_benchmark_labels():
    labels = benchmark_labels(["mmstar", "custom:/d/synthetic.jsonl", "custom:/e/synthetic.jsonl",
                               "custom:/f/mmstar.jsonl"])
    assert labels == {"mmstar": "mmstar", "synthetic": "custom:/d/synthetic.jsonl",
                      "synthetic_2": "custom:/e/synthetic.jsonl", "custom_mmstar": "custom:/f/mmstar.jsonl"}


def test_config_collects_every_problem():
    with pytest.raises(ValueError) as error:
        EvalConfig(model="/m", predictions="/p.jsonl", benchmarks=["mmstr", "ai2d", "ai2d"], batch_size=0,
                   limit=0, max_tiles=0, device="tpu", dtype="int8")
    message = str(error.value)
    for part in ("not both", "unknown benchmark 'mmstr'", "['ai2d'] more than once", "batch_size=0", "limit=0",
                 "max_tiles=0", "device='tpu'", "dtype='int8'"):
        assert part in message, part


@pytest.mark.parametrize("kwargs,message", [
    ({}, "nothing to evaluate"),
    ({"model": []}, "model is an empty list"),
    ({"model": "/m", "benchmarks": []}, "benchmarks is empty"),
    ({"model": ["/m", ""]}, "entries must be non-empty paths"),
    ({"model": 3}, "must be a path, a list of paths"),
])
def test_config_rejects_missing_or_empty_inputs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EvalConfig(**kwargs)


def test_config_defaults():
    cfg = EvalConfig(model="/m")
    assert cfg.benchmarks == ["mmbench", "mmstar", "ai2d", "mmmu", "hallusionbench", "ocrbench", "mathvista"]
    assert cfg.new_tokens == 64 and EvalConfig(model="/m", cot=True).new_tokens == 1024
    assert EvalConfig(model="/m", benchmarks="mmstar").benchmarks == ["mmstar"]


def test_hydra_config_composes_with_model_key():
    """`model=DIR` must set our key, not pick an option of the training configs' `model` group."""
    from hydra import compose, initialize

    from mpo.evaluate import to_eval_config

    with initialize(version_base="1.3", config_path=None):
        cfg = compose(config_name="evaluate", overrides=[
            "model=[/ckpt/a,/ckpt/b]", "benchmarks=[mmstar,custom:/d/x.jsonl]", "cot=true", "limit=5"])
        single = compose(config_name="evaluate", overrides=["model=/ckpt/a"])
    config = to_eval_config(cfg)
    assert isinstance(config, EvalConfig)
    assert config.model == ["/ckpt/a", "/ckpt/b"] and config.benchmarks == ["mmstar", "custom:/d/x.jsonl"]
    assert (config.cot, config.limit, config.batch_size, config.new_tokens, config.system_prompt) == (
        True, 5, 8, 1024, "default")
    assert to_eval_config(single).model == "/ckpt/a"
