"""Self-consistency of sampled answers: how much better than its greedy answer a model could do by
choosing among its own samples.

For each question a model answers greedily once and samples K more answers. Four accuracies, in
percent of the questions:

- ``greedy``: the greedy answer (what the benchmark score is);
- ``mean``: the average sample (mean@K, the model's accuracy at the sampling temperature);
- ``majority``: the answer most samples agree on (maj@K, self-consistency voting);
- ``pass``: at least one sample right (pass@K).

``majority - greedy`` estimates what reordering the model's own answers can gain, the sharpening that
preference optimisation on pairs of its own samples does; ``pass`` says how often a right answer is
there to prefer at all (with few possible answers, many of those right samples are lucky).

Votes go to what the scorer parses (a number, yes/no, an option letter, or the normalised answer
text), so "7", "7.0" and "seven" are one vote; ties go to the answer sampled first.

    from mpo.eval.consistency import self_consistency
    self_consistency(items, greedy={"0": "... Final answer: 3"}, samples={"0": [...K texts...]}, cot=True)
"""

from __future__ import annotations

from collections import Counter

from mpo.eval.benchmarks import Item
from mpo.eval.extract import answer_span, extract_number, extract_option, extract_yes_no, normalize_answer
from mpo.eval.scorers import custom_item_values

__all__ = ["answer_key", "self_consistency"]


def answer_key(item: Item, prediction: str, *, cot: bool = False) -> str | None:
    """What a vote counts for ``prediction`` of a custom-benchmark item: the parsed answer in a
    canonical form, or None when nothing can be parsed (such a sample votes for nothing)."""
    if item.scorer == "choice":
        return extract_option(prediction, item.options, cot=cot)
    if item.scorer == "yesno":
        return extract_yes_no(prediction, cot=cot)
    if item.scorer == "number":
        number = extract_number(prediction, cot=cot)
        return None if number is None else repr(float(number))
    span = answer_span(prediction, cot=cot).strip()
    key = " ".join(span.lower().split()) if item.scorer == "exact" else normalize_answer(span)
    return key or None


def _majority_index(keys: list[str | None]) -> int | None:
    """Index of the first sample carrying the most frequent non-None key (ties: sampled first)."""
    counts = Counter(key for key in keys if key is not None)
    if not counts:
        return None
    top = max(counts.values())
    return next(i for i, key in enumerate(keys) if key is not None and counts[key] == top)


def self_consistency(items: list[Item], greedy: dict, samples: dict, *, cot: bool = False) -> dict:
    """Greedy, mean@K, maj@K and pass@K accuracy (0–100) of one model on a custom benchmark.

    Args:
        items: the benchmark's items (custom benchmarks: each item has a ``scorer``).
        greedy: item index → greedy answer text (keys match by ``str(index)``).
        samples: item index → the K sampled answer texts; every item needs the same K >= 1.
        cot: answers follow the chain-of-thought prompt (parse after the last "Final answer:").
    Returns:
        ``{"k", "num_items", "greedy", "mean", "majority", "pass", "majority_minus_greedy"}``.
    Raises:
        ValueError: no items, an item without greedy answer or samples, or unequal sample counts.
    """
    if not items:
        raise ValueError("no items: self-consistency needs at least one question")
    by_key = {str(key): value for key, value in samples.items()}
    greedy = {str(key): value for key, value in greedy.items()}
    missing = [item.index for item in items if str(item.index) not in by_key or str(item.index) not in greedy]
    if missing:
        raise ValueError(f"{len(missing)} questions lack a greedy answer or samples (e.g. index {missing[0]!r})")
    counts = {len(by_key[str(item.index)]) for item in items}
    if len(counts) != 1 or 0 in counts:
        raise ValueError(f"every question needs the same number (>= 1) of samples, got {sorted(counts)}")
    (k,) = counts
    greedy_values = custom_item_values(items, greedy, cot=cot)
    # values[j][index]: sample j of every question, scored like a prediction of its own.
    values = [custom_item_values(items, {str(item.index): by_key[str(item.index)][j] for item in items}, cot=cot)
              for j in range(k)]
    totals = Counter()
    for item in items:
        key = str(item.index)
        scores = [values[j][key] for j in range(k)]
        chosen = _majority_index([answer_key(item, text, cot=cot) for text in by_key[key]])
        totals["greedy"] += greedy_values[key]
        totals["mean"] += sum(scores) / k
        totals["majority"] += 0.0 if chosen is None else scores[chosen]
        totals["pass"] += max(scores)
    result = {"k": k, "num_items": len(items)}
    result.update({name: 100.0 * totals[name] / len(items) for name in ("greedy", "mean", "majority", "pass")})
    result["majority_minus_greedy"] = 100.0 * (totals["majority"] - totals["greedy"]) / len(items)
    return result
