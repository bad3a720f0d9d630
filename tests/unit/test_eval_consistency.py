"""Self-consistency (mpo.eval.consistency) by hand-worked cases, and `samples=K` in the evaluation runner
with a fake engine: the samples file, per-question seeds, resume, the report table and bad settings."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from mpo.eval.benchmarks import Item
from mpo.eval.consistency import answer_key, self_consistency
from mpo.eval.prediction_files import read_samples
from mpo.eval.runner import EvalConfig, run_evaluation


def _final(answer: str) -> str:
    return f"Some reasoning.\nFinal answer: {answer}"


# ------------------------------------------------------------------------------------ answer_key

def test_answer_key_votes_for_what_the_scorer_parses():
    number = Item(index=0, question="q", answer="7", scorer="number")
    assert answer_key(number, _final("7"), cot=True) == answer_key(number, _final("7.0"), cot=True) \
        == answer_key(number, _final("seven"), cot=True) == "7.0"
    assert answer_key(number, _final("no idea"), cot=True) is None
    yesno = Item(index=1, question="q", answer="yes", scorer="yesno")
    assert answer_key(yesno, _final("Yes."), cot=True) == answer_key(yesno, _final("yes"), cot=True) == "yes"
    choice = Item(index=2, question="q", answer="B", options={"A": "red", "B": "green"}, scorer="choice")
    assert answer_key(choice, _final("(B)"), cot=True) == answer_key(choice, _final("green"), cot=True) == "B"
    vqa = Item(index=3, question="q", answer="a cat", scorer="vqa")
    assert answer_key(vqa, _final("The Cat."), cot=True) == answer_key(vqa, _final("cat"), cot=True) == "cat"
    exact = Item(index=4, question="q", answer="X y", scorer="exact")
    assert answer_key(exact, _final("  x   Y "), cot=True) == "x y"
    assert answer_key(exact, "Final answer:   ", cot=True) is None


# ------------------------------------------------------------------------------------ self_consistency

def _items() -> list[Item]:
    return [Item(index=i, question="q", answer=a, scorer="number") for i, a in enumerate(["3", "5", "2", "4"])]


def test_self_consistency_by_hand():
    greedy = {0: _final("3"), 1: _final("6"), 2: _final("1"), 3: _final("9")}
    samples = {
        0: [_final(a) for a in ("3", "3", "4", "1")],      # right 2/4, majority 3 (right), pass
        1: [_final(a) for a in ("5", "6", "5", "5")],      # right 3/4, majority 5 (right): greedy wrong
        2: [_final(a) for a in ("1", "2", "1", "2")],      # tie 1 vs 2: the answer sampled first wins (wrong)
        "3": ["no answer", "still none", _final("4"), "none"],  # one vote, right; str key matches index 3
    }
    result = self_consistency(_items(), greedy, samples, cot=True)
    assert result == {"k": 4, "num_items": 4,
                      "greedy": 25.0,                                  # only question 0
                      "mean": pytest.approx(100 * (2 / 4 + 3 / 4 + 2 / 4 + 1 / 4) / 4),
                      "majority": 75.0,                                # questions 0, 1 and 3
                      "pass": 100.0,
                      "majority_minus_greedy": 50.0}


def test_a_question_without_any_parsed_answer_has_no_majority():
    items = _items()[:1]
    result = self_consistency(items, {0: _final("3")}, {0: ["nothing", "nothing either"]}, cot=True)
    assert (result["greedy"], result["mean"], result["majority"], result["pass"]) == (100.0, 0.0, 0.0, 0.0)


def test_self_consistency_rejects_bad_input():
    items = _items()[:2]
    with pytest.raises(ValueError, match="no items"):
        self_consistency([], {}, {})
    with pytest.raises(ValueError, match=r"1 questions lack a greedy answer or samples \(e.g. index 1\)"):
        self_consistency(items, {0: "a", 1: "b"}, {0: ["a", "b"]})
    with pytest.raises(ValueError, match=r"same number \(>= 1\) of samples, got \[1, 2\]"):
        self_consistency(items, {0: "a", 1: "b"}, {0: ["a"], 1: ["a", "b"]})
    with pytest.raises(ValueError, match=r"got \[0\]"):
        self_consistency(items, {0: "a", 1: "b"}, {0: [], 1: []})


# ------------------------------------------------------------------------------------ runner, samples=K

class SamplingEngine:
    """Greedy: answers from ``greedy``; sampled: answers from ``sampled`` cycled over the K samples.
    Records each call's requests and params."""

    def __init__(self, greedy: dict[str, str], sampled: dict[str, list[str]]):
        self.greedy, self.sampled = greedy, sampled
        self.calls: list[tuple[list, object]] = []

    def _question(self, request) -> str:
        return next(q for q in self.greedy if q in request.question)

    def generate(self, requests, params):
        self.calls.append((list(requests), params))
        if params.temperature == 0:
            return [[SimpleNamespace(text=self.greedy[self._question(r)], finished=True)] for r in requests]
        return [[SimpleNamespace(text=self.sampled[self._question(r)][j % len(self.sampled[self._question(r)])],
                                 finished=True) for j in range(params.num_samples)] for r in requests]


def _benchmark(tmp_path: Path) -> Path:
    records = [
        {"index": "a", "question": "2 + 2 = ?", "answer": "4", "scorer": "number", "category": "sum"},
        {"index": "b", "question": "3 + 3 = ?", "answer": "6", "scorer": "number", "category": "sum"},
        {"index": "c", "question": "Is one odd?", "answer": "yes", "scorer": "yesno", "category": "parity"},
    ]
    path = tmp_path / "toy.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _engine() -> SamplingEngine:
    return SamplingEngine(
        greedy={"2 + 2": _final("4"), "3 + 3": _final("5"), "Is one odd": _final("no")},
        sampled={"2 + 2": [_final("4"), _final("5")],               # K=4: 4 5 4 5, tie → 4 (right)
                 "3 + 3": [_final("6"), _final("6"), _final("5")],  # 6 6 5 6 → 6 (right)
                 "Is one odd": [_final("no")]})                      # always wrong


def _config(tmp_path: Path, **changes) -> EvalConfig:
    settings = dict(model=str(tmp_path / "ckpt"), benchmarks=[f"custom:{_benchmark(tmp_path)}"], cot=True,
                    output_dir=str(tmp_path / "out"), progress=False, samples=4, batch_size=2)
    settings.update(changes)
    return EvalConfig(**settings)


def test_runner_samples_k_answers_and_reports_self_consistency(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    engine, log = _engine(), []
    results = run_evaluation(_config(tmp_path), engine_factory=lambda path, cfg: engine, log=log.append)
    scores = results["ckpt"]["toy"]
    assert scores["overall"] == pytest.approx(100 / 3)
    assert scores["self_consistency"] == {
        "k": 4, "num_items": 3, "greedy": pytest.approx(100 / 3), "mean": pytest.approx(100 * (2 / 4 + 3 / 4) / 3),
        "majority": pytest.approx(200 / 3), "pass": pytest.approx(200 / 3),
        "majority_minus_greedy": pytest.approx(100 / 3), "temperature": 0.7}
    sampled_calls = [(requests, params) for requests, params in engine.calls if params.temperature > 0]
    assert [len(requests) for requests, _ in sampled_calls] == [2, 1]  # batch_size=2
    assert all(params.num_samples == 4 and params.temperature == 0.7 for _, params in sampled_calls)
    seeds = [r.seed for requests, _ in sampled_calls for r in requests]
    assert len(set(seeds)) == 3 and all(isinstance(s, int) and s >= 0 for s in seeds)
    assert all(r.seed is None for requests, params in engine.calls if params.temperature == 0 for r in requests)
    rows = read_samples(tmp_path / "out" / "predictions" / "ckpt" / "toy.samples.jsonl")
    assert list(rows) == ["a", "b", "c"] and rows["b"]["samples"][3] == _final("6")
    settings = json.loads((tmp_path / "out" / "predictions" / "ckpt" / "toy.samples.settings.json").read_text())
    assert (settings["samples"], settings["temperature"], settings["seed"]) == (4, 0.7, 0)
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["toy"]["self_consistency"]["majority"] == pytest.approx(200 / 3)
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Self-consistency" in report and "| ckpt | toy | 4 | 0.7 | 33.3 | 41.7 | 66.7 | 66.7 | +33.3 |" in report

    # Same seeds on a second run with other batches; a complete run resumes without generating.
    other = _engine()
    run_evaluation(_config(tmp_path, output_dir=str(tmp_path / "out2"), batch_size=3),
                   engine_factory=lambda path, cfg: other, log=log.append)
    assert [r.seed for requests, params in other.calls if params.temperature > 0 for r in requests] == seeds
    again = _engine()
    run_evaluation(_config(tmp_path), engine_factory=lambda path, cfg: again, log=log.append)
    assert again.calls == []
    assert "ckpt / toy: 3 questions, already had 4 samples of 3, sampling 0" in log


def test_resuming_samples_under_another_temperature_is_refused(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    run_evaluation(_config(tmp_path), engine_factory=lambda path, cfg: _engine(), log=lambda m: None)
    with pytest.raises(ValueError, match=r"other settings \(temperature: saved 0.7, now 1.0\)"):
        run_evaluation(_config(tmp_path, sample_temperature=1.0), engine_factory=lambda path, cfg: _engine(),
                       log=lambda m: None)


@pytest.mark.parametrize("changes, message", [
    ({"samples": 1}, r"samples=1 must be 0 \(off\) or an integer >= 2"),
    ({"samples": -3}, r"samples=-3 must be 0 \(off\) or an integer >= 2"),
    ({"sample_temperature": 0.0}, r"sample_temperature=0.0 must be > 0"),
    ({"benchmarks": ["mmstar"]}, r"samples= supports custom benchmarks \(custom:PATH.jsonl\) only, not \['mmstar'\]"),
    ({"model": None, "predictions": "/p.jsonl"}, r"samples= needs model="),
    ({"sample_models": ["other"]}, r"sample_models=\['other'\] must name some of the models \['ckpt'\]"),
    ({"sample_models": []}, r"sample_models=\[\] must name some of the models"),
])
def test_bad_sampling_settings_are_refused(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        _config(tmp_path, **changes)


def test_read_samples_rejects_bad_rows(tmp_path):
    path = tmp_path / "x.samples.jsonl"
    path.write_text('{"index": 0, "samples": ["a", 3]}\n')
    with pytest.raises(ValueError, match=r"x.samples.jsonl:1: samples must be a non-empty list of str"):
        read_samples(path)
    path.write_text('{"index": 0, "prediction": "a"}\n')
    with pytest.raises(ValueError, match=r'needs "index" and "samples"'):
        read_samples(path)


def test_sample_models_limits_sampling_to_the_named_models(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    engine = _engine()
    cfg = _config(tmp_path, model={"a": str(tmp_path / "a"), "b": str(tmp_path / "b")}, sample_models=["b"])
    results = run_evaluation(cfg, engine_factory=lambda path, cfg: engine, log=lambda m: None)
    assert "self_consistency" not in results["a"]["toy"] and results["b"]["toy"]["self_consistency"]["k"] == 4
    assert not (tmp_path / "out" / "predictions" / "a" / "toy.samples.jsonl").exists()
    assert sum(params.temperature > 0 for _, params in engine.calls) == 2  # b's 3 questions in batches of 2
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| b | toy | 4 |" in report and "| a | toy | 4 |" not in report
