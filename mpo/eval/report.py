"""Write evaluation results: results.json, report.md (benchmark × model table) and scores.png.

    from mpo.eval.report import write_results
    paths = write_results("outputs/eval", {"InternVL2_5-4B": {"mmbench": score_dict, ...},
                                           "InternVL2_5-4B-MPO": {...}})

results.json shape:
- one model:      ``{benchmark: score_dict}``
- several models: ``{model_name: {benchmark: score_dict}}`` (models in the order given)
where ``score_dict`` is what ``mpo.eval.scorers.score`` returns (at least ``overall`` and
``categories``, 0–100). report.md shows each model's ``overall`` with the delta to the first model, and a
self-consistency table when scores carry ``self_consistency`` (``samples=K`` runs).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

# The object-oriented API draws without pyplot, so no global backend switch and no display needed.
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _validate(results: dict) -> None:
    if not isinstance(results, dict) or not results:
        raise ValueError("results is empty: pass {model_name: {benchmark: score_dict}}")
    for model, benchmarks in results.items():
        if not isinstance(benchmarks, dict) or not benchmarks:
            raise ValueError(f"results[{model!r}] must be a non-empty dict benchmark → score_dict")
        for bench, scores in benchmarks.items():
            if not isinstance(scores, dict) or "overall" not in scores:
                raise ValueError(f"results[{model!r}][{bench!r}] has no 'overall'; pass the dict "
                                 "returned by mpo.eval.scorers.score")
            overall = scores["overall"]
            if not isinstance(overall, (int, float)) or not math.isfinite(overall):
                raise ValueError(f"results[{model!r}][{bench!r}]['overall'] must be a finite number, "
                                 f"got {overall!r}")


def _benchmark_order(results: dict) -> list[str]:
    """Benchmarks in first-seen order across models."""
    order: list[str] = []
    for benchmarks in results.values():
        order.extend(b for b in benchmarks if b not in order)
    return order


def _markdown_table(results: dict) -> str:
    models = list(results)
    baseline = results[models[0]]
    header = ["benchmark", *models]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(models)) + "|"]
    for bench in _benchmark_order(results):
        cells = [bench]
        for position, model in enumerate(models):
            scores = results[model].get(bench)
            if scores is None:
                cells.append("—")
                continue
            cell = f"{scores['overall']:.1f}"
            if position > 0 and bench in baseline:
                cell += f" ({scores['overall'] - baseline[bench]['overall']:+.1f})"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _consistency_section(results: dict) -> list[str]:
    """Lines of the self-consistency table (``samples=K`` runs; see mpo.eval.consistency), or none."""
    rows = [(model, bench, scores["self_consistency"]) for model in results
            for bench, scores in results[model].items() if isinstance(scores.get("self_consistency"), dict)]
    if not rows:
        return []
    lines = ["## Self-consistency", "",
             "K answers sampled per question besides the greedy one: mean@K (average sample), maj@K (the answer "
             "most samples give), pass@K (any sample right). maj@K − greedy is what choosing among the model's "
             "own answers could gain.", "",
             "| model | benchmark | K | T | greedy | mean@K | maj@K | pass@K | maj@K − greedy |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for model, bench, sc in rows:
        lines.append(f"| {model} | {bench} | {sc['k']} | {sc.get('temperature', '')} | {sc['greedy']:.1f} | "
                     f"{sc['mean']:.1f} | {sc['majority']:.1f} | {sc['pass']:.1f} | {sc['majority_minus_greedy']:+.1f} |")
    return lines + [""]


def render_markdown(results: dict[str, dict[str, dict]]) -> str:
    """Return report.md's text: a benchmark × model table of ``overall`` (0–100) with deltas vs the
    first model in parentheses, then per-benchmark notes (missing predictions, judge-only items)."""
    _validate(results)
    models = list(results)
    parts = ["# Evaluation results", ""]
    if len(models) > 1:
        parts += [f"Scores are 0–100; deltas in parentheses are against `{models[0]}`.", ""]
    else:
        parts += ["Scores are 0–100.", ""]
    parts += [_markdown_table(results), ""]
    parts += _consistency_section(results)
    notes = []
    for model in models:
        for bench, scores in results[model].items():
            if scores.get("missing"):
                notes.append(f"- {model} / {bench}: {scores['missing']} items had no prediction "
                             "(scored wrong).")
            if scores.get("needs_judge"):
                notes.append(f"- {model} / {bench}: {scores['needs_judge']} items need a judge model and "
                             "are excluded from the score.")
    if notes:
        parts += ["## Notes", "", *notes, ""]
    return "\n".join(parts)


def plot_scores(results: dict[str, dict[str, dict]], path: str | os.PathLike) -> None:
    """Save a grouped bar chart (one group per benchmark, one bar per model, y = overall 0–100)."""
    _validate(results)
    models, benchmarks = list(results), _benchmark_order(results)
    figure = Figure(figsize=(max(6.0, 1.2 * len(benchmarks) * max(1, len(models)) / 2 + 2), 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    width = 0.8 / len(models)
    for position, model in enumerate(models):
        xs = [i + (position - (len(models) - 1) / 2) * width for i in range(len(benchmarks))]
        heights = [results[model][b]["overall"] if b in results[model] else 0.0 for b in benchmarks]
        bars = axes.bar(xs, heights, width=width, label=model)
        labels = [f"{h:.1f}" if b in results[model] else "" for h, b in zip(heights, benchmarks)]
        axes.bar_label(bars, labels=labels, fontsize=7, padding=1)
    axes.set_xticks(range(len(benchmarks)), benchmarks, rotation=20, ha="right")
    axes.set_ylim(0, 105)
    axes.set_ylabel("score (0–100)")
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def _json_safe(value):
    """Replace NaN/inf (not valid JSON) with None; tuples become lists."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_results(output_dir: str | os.PathLike, results: dict[str, dict[str, dict]]) -> dict[str, Path]:
    """Write results.json, report.md and scores.png into ``output_dir`` (created if needed).

    Args:
        output_dir: destination folder.
        results: model name → benchmark name → score dict (from ``mpo.eval.scorers.score``).
    Returns:
        {"json": path, "markdown": path, "plot": path}.
    results.json holds ``{benchmark: score_dict}`` for one model and ``{model: {benchmark:
    score_dict}}`` for several (see the module docstring).
    """
    _validate(results)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = next(iter(results.values())) if len(results) == 1 else results
    paths = {"json": out / "results.json", "markdown": out / "report.md", "plot": out / "scores.png"}
    text = json.dumps(_json_safe(payload), indent=2, ensure_ascii=False) + "\n"
    paths["json"].write_text(text, encoding="utf-8")
    paths["markdown"].write_text(render_markdown(results), encoding="utf-8")
    plot_scores(results, paths["plot"])
    return paths
