"""The demo's report: held-out accuracy per stage, pair statistics, timings and training curves.

Reads what the stages wrote under the demo directory (``eval/results.json``, ``pairs/stats.json``,
``sft/metrics.jsonl``, ``mpo/metrics.jsonl``, ``mpo_awq/awq_report.json``) and writes:

- ``report.json``: ``{"seed", "device", "settings", "accuracy": {"sft", "mpo", "mpo_awq"} (percent of
  held-out questions right), "accuracy_by_kind", "deltas", "paired" (per compared stage: questions only
  one model gets right and McNemar's exact p, ``mpo.eval.paired``), "answer_priors",
  "self_consistency" (per model: greedy, mean@K, maj@K, pass@K; ``mpo.eval.consistency``), "pairs",
  "training", "awq", "timings_s", "table"}``.
- ``report.md``: the same as tables, with the figures below.
- ``sft_curves.png`` (SFT loss), ``mpo_curves.png`` (MPO losses, rewards, reward accuracy),
  ``accuracy.png`` (accuracy per stage).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from mpo.demo_plots import plot_accuracy, plot_mpo, plot_sft

EVAL_MODELS = ("sft", "mpo", "mpo_awq")
MODEL_LABELS = {"sft": "SFT", "mpo": "MPO", "mpo_awq": "MPO-AWQ (4-bit)"}
BENCHMARK = "synthetic"  # the custom benchmark's name (its file stem)
TIMED_STAGES = ("task", "model", "sft", "pairs", "mpo", "awq", "eval", "total")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: its stage did not finish (see the logs/ folder)")
    return json.loads(path.read_text(encoding="utf-8"))


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: its stage did not finish (see the logs/ folder)")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_metrics(path: Path) -> list[dict]:
    """The trainer's metrics.jsonl rows (one per logged optimizer step)."""
    return _read_jsonl(path)


def accuracies(results: dict) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """(overall accuracy per model, accuracy per question kind per model), both in percent.

    ``results`` is the evaluation's results.json: ``{model: {benchmark: score}}``.
    """
    overall, by_kind = {}, {}
    for name in EVAL_MODELS:
        if name not in results or BENCHMARK not in results[name]:
            raise ValueError(f"evaluation results lack {name}/{BENCHMARK}; found {sorted(results)}")
        score = results[name][BENCHMARK]
        overall[name] = round(float(score["overall"]), 2)
        by_kind[name] = {kind: round(float(v), 2) for kind, v in score.get("categories", {}).items()}
    return overall, by_kind


def self_consistency(results: dict) -> dict[str, dict]:
    """Each model's self-consistency scores (greedy, mean@K, maj@K, pass@K; ``mpo.eval.consistency``)
    from results.json, rounded; empty when the evaluation sampled nothing (``consistency_samples=0``)."""
    found = {}
    for name in EVAL_MODELS:
        scores = results.get(name, {}).get(BENCHMARK, {}).get("self_consistency")
        if scores:
            found[name] = {key: round(value, 2) if isinstance(value, float) else value for key, value in scores.items()}
    return found


def pair_statistics(stats: dict) -> dict:
    """The pair builder's totals: questions, samples, positive rate, outcomes, pairs per kind."""
    total = stats["total"]
    gt, ntp = total["ground_truth"], total["dropout_ntp"]
    return {
        "questions": total["questions"],
        "samples": total["samples"],
        "generated_tokens": total["generated_tokens"],
        "ground_truth_questions": gt["questions"],
        "positive": gt["positive"],
        "negative": gt["negative"],
        "format_failure": gt["format_failure"],
        "positive_rate": gt["positive_rate"],
        "outcomes": dict(gt["outcomes"]),
        "dropout_ntp_questions": ntp["questions"],
        "pairs": dict(total["pairs"]),
        "num_pairs": sum(total["pairs"].values()),
        "hard_questions": total["hard_questions"],
        "dropped_all_correct": total["dropped_all_correct"],
    }


def training_summary(rows: list[dict]) -> dict:
    """First and last logged values of a training run (losses, rewards), and its step count."""
    keys = ("loss", "loss_sft", "loss_dpo", "loss_bco", "reward_accuracy", "reward_margin", "rewards_chosen",
            "rewards_rejected")
    first, last = rows[0], rows[-1]
    return {"steps": last["step"], "first": {k: first.get(k) for k in keys}, "last": {k: last.get(k) for k in keys}}


def majority_baseline(reference: list[dict], test: list[dict]) -> float:
    """Percent of ``test`` questions answered right by giving each its kind's most frequent answer in ``reference``.

    Both are question records ``{"kind", "answer"}`` (``task/questions/*.jsonl``). What a model scores
    from answer priors alone, without looking at the image: the yardstick for the accuracies above it.
    Ties go to the answer met first in ``reference``; a kind missing from ``reference`` scores 0.
    """
    if not test:
        raise ValueError("majority_baseline needs at least one test question")
    counts: dict[str, Counter] = {}
    for record in reference:
        counts.setdefault(record["kind"], Counter())[record["answer"]] += 1
    majority = {kind: c.most_common(1)[0][0] for kind, c in counts.items()}
    right = sum(record["answer"] == majority.get(record["kind"]) for record in test)
    return round(100.0 * right / len(test), 2)


def modal_answer_share(kinds: list[str], answers: list[str | None]) -> float:
    """Percent of questions whose answer is the model's most frequent answer for that question's kind.

    ``kinds[i]`` and ``answers[i]`` (None: no parsable answer) belong to question i. 100 means the model
    gives one answer per kind whatever the image shows; a model that reads its images spreads its
    answers like the ground truth does (the report gives the ground truth's share).
    """
    if len(kinds) != len(answers) or not kinds:
        raise ValueError(f"need one answer per question, got {len(answers)} answers for {len(kinds)} kinds")
    per_kind: dict[str, Counter] = {}
    for kind, answer in zip(kinds, answers):
        per_kind.setdefault(kind, Counter())[answer] += 1
    return round(100.0 * sum(c.most_common(1)[0][1] for c in per_kind.values()) / len(kinds), 2)


def read_predictions(out_dir: Path) -> dict[str, dict[str, dict]]:
    """Each evaluated model's held-out predictions, ``{model: {str(index): row}}`` (read once, used by
    the answer priors and the paired comparisons)."""
    from mpo.eval.prediction_files import read_predictions as read_file

    out = {}
    for name in EVAL_MODELS:
        path = out_dir / "eval" / "predictions" / name / f"{BENCHMARK}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: its stage did not finish (see the logs/ folder)")
        out[name] = read_file(path)
    return out


def answer_priors(out_dir: Path, predictions: dict[str, dict[str, dict]]) -> dict:
    """Majority baselines of the demo's task and each evaluated model's modal answer share (percent);
    ``predictions`` as `read_predictions` gives them."""
    from data_pipeline.answers import extract_final_answer

    def records(split: str) -> list[dict]:
        return _read_jsonl(out_dir / "task" / "questions" / f"{split}.jsonl")

    test = records("test")
    kinds = [r["kind"] for r in test]
    truth_share = modal_answer_share(kinds, [r["answer"] for r in test])
    shares = {}
    for name in EVAL_MODELS:
        rows = sorted(predictions[name].values(), key=lambda row: row["index"])
        if len(rows) != len(test):
            raise ValueError(f"{name}: {len(rows)} predictions for {len(test)} test questions")
        shares[name] = modal_answer_share(kinds, [extract_final_answer(row["prediction"]) for row in rows])
    return {"train_majority": majority_baseline(records("train"), test),
            "build_majority": majority_baseline(records("build"), test),
            "modal_answer_share": {"ground_truth": truth_share, **shares}}


PAIRED = (("mpo_vs_sft", "sft", "mpo"), ("mpo_awq_vs_mpo", "mpo", "mpo_awq"))


def paired_statistics(out_dir: Path, predictions: dict[str, dict[str, dict]]) -> dict[str, dict]:
    """Paired comparisons on the held-out questions: MPO against SFT, MPO-AWQ against MPO."""
    from mpo.eval.benchmarks import load_benchmark
    from mpo.eval.paired import paired_comparison
    from mpo.eval.scorers import custom_item_values

    items = load_benchmark(f"custom:{out_dir / 'task' / 'eval_items' / f'{BENCHMARK}.jsonl'}")
    values = {name: custom_item_values(items, {k: r["prediction"] for k, r in rows.items()}, cot=True)
              for name, rows in predictions.items()}
    return {key: paired_comparison(values[a], values[b]) for key, a, b in PAIRED}


def _fmt(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def accuracy_table(overall: dict[str, float], num_test: int, paired: dict[str, dict] | None = None) -> str:
    """Markdown table: accuracy per stage, its change against SFT (percentage points) and, with
    ``paired``, each stage against the one before it: questions only either gets right, McNemar's p."""
    head = f"| model | held-out accuracy (%, {num_test} questions) | vs SFT (points) |"
    rule = "|---|---:|---:|"
    if paired:
        head += " vs previous stage: only previous / only this right | McNemar p |"
        rule += "---:|---:|"
    lines = [head, rule]
    against = {b: key for key, _, b in PAIRED}
    for name in EVAL_MODELS:
        delta = "" if name == "sft" else f"{overall[name] - overall['sft']:+.1f}"
        row = f"| {MODEL_LABELS[name]} | {overall[name]:.1f} | {delta} |"
        if paired:
            cmp = paired.get(against.get(name, ""))
            row += (f" {cmp['first_only']} / {cmp['second_only']} | {cmp['mcnemar_p']:.3f} |" if cmp else " | |")
        lines.append(row)
    return "\n".join(lines)


def _kind_table(by_kind: dict[str, dict[str, float]]) -> str:
    kinds = sorted({k for scores in by_kind.values() for k in scores})
    if not kinds:
        return "(no per-kind scores)"
    lines = ["| kind | " + " | ".join(MODEL_LABELS[m] for m in EVAL_MODELS) + " |",
             "|---|" + "---:|" * len(EVAL_MODELS)]
    for kind in kinds:
        lines.append(f"| {kind} | " + " | ".join(_fmt(by_kind[m].get(kind)) for m in EVAL_MODELS) + " |")
    return "\n".join(lines)


def _pairs_section(pairs: dict) -> str:
    rate = pairs["positive_rate"]
    outcomes = ", ".join(f"{k} {v}" for k, v in sorted(pairs["outcomes"].items())) or "none"
    kinds = ", ".join(f"{k} {v}" for k, v in pairs["pairs"].items()) or "none"
    return "\n".join([
        f"- questions: {pairs['questions']} ({pairs['ground_truth_questions']} with their answer, "
        f"{pairs['dropout_ntp_questions']} with it withheld: Dropout-NTP)",
        f"- samples: {pairs['samples']} ({pairs['generated_tokens']} tokens); right {pairs['positive']}, "
        f"wrong {pairs['negative']}, no parsable answer {pairs['format_failure']} "
        f"(positive rate {'n/a' if rate is None else f'{rate:.3f}'})",
        f"- questions by outcome: {outcomes}",
        f"- pairs: {pairs['num_pairs']} ({kinds})",
    ])


def _priors_section(report: dict) -> str:
    priors, overall = report["answer_priors"], report["accuracy"]
    shares = priors["modal_answer_share"]
    text = [
        f"Answering every question with its kind's most frequent answer, without looking at the image, scores "
        f"{priors['build_majority']:.1f} % (majority of the build split, the questions the pairs come from) or "
        f"{priors['train_majority']:.1f} % (of the SFT training split).",
        "",
        "Share of answers that are the model's most frequent answer for the question's kind (100 % = one answer "
        "per kind whatever the image shows): ground truth " + f"{shares['ground_truth']:.1f} %, "
        + ", ".join(f"{MODEL_LABELS[m]} {shares[m]:.1f} %" for m in EVAL_MODELS) + ".",
        "",
    ]
    best = max(priors["build_majority"], priors["train_majority"])
    for name in ("sft", "mpo"):
        margin = overall[name] - best
        verdict = ("more than per-kind answer priors explain" if margin > 2.0 else
                   "not more than per-kind answer priors explain (2 points is the noise of a few hundred questions)")
        text.append(f"- {MODEL_LABELS[name]}: {overall[name]:.1f} %, {margin:+.1f} points against the better majority "
                    f"baseline ({best:.1f} %): {verdict}.")
    return "\n".join(text)


def _consistency_section(report: dict) -> list[str]:
    found = report["self_consistency"]
    if not found:
        return []
    first = next(iter(found.values()))
    k, temperature = first["k"], first["temperature"]
    lines = ["### What sharpening could gain", "",
             f"Each model also sampled {k} answers per held-out question at temperature {temperature} (the pair "
             "builder's). maj@K is the answer most samples give, pass@K whether any is right. Preference pairs "
             "of the SFT model's own samples teach it to prefer its right answers to its wrong ones; the SFT "
             "model's maj@K − greedy estimates what that reordering can gain when the pairs add nothing new "
             "(pass@K counts many lucky samples: most questions have only a few possible answers).", "",
             "| model | greedy | mean@K | maj@K | pass@K | maj@K − greedy |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {MODEL_LABELS[m]} | {sc['greedy']:.1f} | {sc['mean']:.1f} | {sc['majority']:.1f} | {sc['pass']:.1f} | "
              f"{sc['majority_minus_greedy']:+.1f} |" for m, sc in found.items()]
    return lines + [""]


def _timings_table(timings: dict[str, float]) -> str:
    lines = ["| stage | seconds |", "|---|---:|"]
    lines += [f"| {name} | {timings[name]:.1f} |" for name in TIMED_STAGES if name in timings]
    return "\n".join(lines)


def write_report(out_dir: Path, *, seed: int, device: str, settings, timings: dict[str, float]) -> dict:
    """Write report.json, report.md and the PNGs into ``out_dir``; return the report dict."""
    results = _read_json(out_dir / "eval" / "results.json")
    overall, by_kind = accuracies(results)
    pairs = pair_statistics(_read_json(out_dir / "pairs" / "stats.json"))
    sft_rows, mpo_rows = read_metrics(out_dir / "sft" / "metrics.jsonl"), read_metrics(out_dir / "mpo" / "metrics.jsonl")
    awq_path = out_dir / "mpo_awq" / "awq_report.json"
    awq = _read_json(awq_path) if awq_path.is_file() else {}
    predictions = read_predictions(out_dir)
    paired = paired_statistics(out_dir, predictions)
    table = accuracy_table(overall, settings.num_test, paired)
    report = {
        "seed": seed,
        "device": device,
        "settings": settings.to_dict(),
        "accuracy": overall,
        "accuracy_by_kind": by_kind,
        "deltas": {"mpo_minus_sft": round(overall["mpo"] - overall["sft"], 2),
                   "mpo_awq_minus_mpo": round(overall["mpo_awq"] - overall["mpo"], 2)},
        "paired": paired,
        "answer_priors": answer_priors(out_dir, predictions),
        "self_consistency": self_consistency(results),
        "pairs": pairs,
        "training": {"sft": training_summary(sft_rows), "mpo": training_summary(mpo_rows)},
        "awq": {"total_time_s": awq.get("total_time_s")},
        "timings_s": timings,
        "table": table,
    }
    plot_sft(sft_rows, out_dir / "sft_curves.png")
    plot_mpo(mpo_rows, out_dir / "mpo_curves.png")
    plot_accuracy(overall, MODEL_LABELS, out_dir / "accuracy.png")
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out_dir / "report.md").write_text(_markdown(report, by_kind, pairs, timings), encoding="utf-8")
    return report


def _markdown(report: dict, by_kind: dict, pairs: dict, timings: dict) -> str:
    mpo_last = report["training"]["mpo"]["last"]
    return "\n".join([
        "# MPO demo report",
        "",
        f"Synthetic visual task, seed {report['seed']}, device {report['device']}. Every model answers the "
        "held-out questions greedily with the chain-of-thought prompt; an answer counts when the text after "
        "its last \"Final answer:\" matches the ground truth.",
        "",
        "## Held-out accuracy",
        "",
        report["table"],
        "",
        "McNemar's exact test asks whether the questions that only one of two models gets right split "
        "more unevenly than chance; p above 0.05 means the change is within what "
        f"{report['paired']['mpo_vs_sft']['num_items']} questions can tell apart.",
        "",
        "![accuracy](accuracy.png)",
        "",
        "### By question kind (%)",
        "",
        _kind_table(by_kind),
        "",
        "### Against answer priors",
        "",
        _priors_section(report),
        "",
        *_consistency_section(report),
        "## Preference pairs (built from the SFT model's own samples)",
        "",
        _pairs_section(pairs),
        "",
        "## Training",
        "",
        f"SFT: {report['training']['sft']['steps']} steps. MPO: {report['training']['mpo']['steps']} steps, "
        f"last logged reward accuracy {_fmt(mpo_last.get('reward_accuracy'), 2)}, "
        f"margin {_fmt(mpo_last.get('reward_margin'), 3)}.",
        "",
        "![SFT loss](sft_curves.png)",
        "",
        "![MPO curves](mpo_curves.png)",
        "",
        "## Time per stage",
        "",
        _timings_table(timings),
        "",
        "The commands each stage ran are in `commands.sh`; their output is in `logs/`.",
        "",
    ])
