"""Rule-based scoring per benchmark (VLMEvalKit conventions, REFERENCE §7), no judge model.

    from mpo.eval.scorers import score
    result = score("mmbench", items, {item.index: text, ...})
    result["overall"], result["categories"]          # 0–100

Every result has ``overall`` (0–100), ``categories`` (category → 0–100), ``num_items`` (rows read),
``num_scored`` (units behind ``overall``: rows, circular groups, …) and ``missing`` (rows without a
prediction; they count as wrong). Benchmark-specific fields are documented on each scorer.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from collections.abc import Callable, Iterable

from mpo.eval.benchmarks import Item, get_benchmark
from mpo.eval.extract import (
    anls,
    answer_span,
    extract_number,
    extract_option,
    extract_yes_no,
    normalize_answer,
    numbers_match,
)

CIRCULAR_GROUP_MODULUS = 1_000_000
# OCRBench categories whose answers are LaTeX: VLMEvalKit compares them with all spaces removed
# and without lower-casing (case carries meaning in LaTeX).
_OCR_SPACE_FREE_MARKERS = ("mathematical expression", "hme")
_YES_NO_GOLD = {"yes": "yes", "no": "no", "1": "yes", "0": "no", "true": "yes", "false": "no"}


def _percent(values: Iterable[float]) -> float:
    values = list(values)
    return 100.0 * sum(values) / len(values) if values else 0.0


def _by_key(pairs: Iterable[tuple[str | None, float]]) -> dict[str, float]:
    """Mean (0–100) per key, skipping rows without a key; keys sorted for stable reports."""
    grouped: dict[str, list[float]] = defaultdict(list)
    for key, value in pairs:
        if key is not None:
            grouped[key].append(value)
    return {key: _percent(grouped[key]) for key in sorted(grouped)}


def _summary(items: list[Item], values: list[float], num_items: int, missing: int) -> dict:
    """Common result fields for per-unit scores ``values`` aligned with representative ``items``."""
    result = {
        "overall": _percent(values),
        "categories": _by_key((item.category, v) for item, v in zip(items, values)),
        "num_items": num_items,
        "num_scored": len(values),
        "missing": missing,
    }
    l2 = _by_key((item.l2_category, v) for item, v in zip(items, values))
    if l2:
        result["l2_categories"] = l2
    splits = _by_key((item.split, v) for item, v in zip(items, values))
    if len(splits) > 1:
        result["splits"] = splits
    return result


def _prediction_lookup(items: list[Item], predictions: dict) -> tuple[Callable[[Item], str | None], int]:
    """Map predictions by ``str(index)`` (so 7 and "7" agree); return (lookup, number missing)."""
    by_key = {str(key): value for key, value in predictions.items()}
    for key, value in by_key.items():
        if value is not None and not isinstance(value, str):
            raise ValueError(f"prediction for index {key!r} must be a str, got {type(value).__name__}")
    missing = sum(1 for item in items if by_key.get(str(item.index)) is None)
    return (lambda item: by_key.get(str(item.index))), missing


def _gold_letter(item: Item) -> str:
    gold = (item.answer if isinstance(item.answer, str) else "").strip()
    if gold.upper() in item.options and len(gold) == 1:
        return gold.upper()
    matches = [letter for letter, text in item.options.items() if text.strip() == gold]
    if len(matches) == 1:
        return matches[0]
    raise ValueError(f"item {item.index!r}: answer {item.answer!r} is neither an option letter nor "
                     f"an option text of {item.options}; fix the benchmark file")


def _mcq_correct(item: Item, prediction: str | None, cot: bool) -> float:
    if not item.options:
        raise ValueError(f"item {item.index!r} has no options (A, B, … columns) but is multiple choice")
    gold = _gold_letter(item)
    return float(prediction is not None and extract_option(prediction, item.options, cot=cot) == gold)


def _score_mcq(items: list[Item], lookup, missing: int, cot: bool) -> dict:
    """MMStar, AI2D: one row = one question, right when the extracted letter equals the answer."""
    values = [_mcq_correct(item, lookup(item), cot) for item in items]
    return _summary(items, values, len(items), missing)


def _score_circular(items: list[Item], lookup, missing: int, cot: bool) -> dict:
    """MMBench: rows with index ≥ 1e6 are rotations of row index % 1e6; a group is right only when
    every one of its rows is. Extra fields: ``num_groups``, ``vanilla`` (accuracy on the original
    rows alone, 0–100)."""
    groups: dict[int, list[Item]] = defaultdict(list)
    for item in items:
        if not isinstance(item.index, int):
            raise ValueError(f"MMBench index {item.index!r} is not an integer; circular groups need "
                             "integer indices (group = index % 1,000,000)")
        groups[item.index % CIRCULAR_GROUP_MODULUS].append(item)
    correct = {str(item.index): _mcq_correct(item, lookup(item), cot) for item in items}
    keys = sorted(groups)
    representatives = [min(groups[k], key=lambda item: item.index) for k in keys]
    values = [float(all(correct[str(item.index)] for item in groups[k])) for k in keys]
    result = _summary(representatives, values, len(items), missing)
    result["num_groups"] = len(keys)
    result["vanilla"] = _percent(correct[str(item.index)] for item in items
                                 if item.index < CIRCULAR_GROUP_MODULUS)
    return result


def _gold_list(answer: str | list[str] | None) -> list[str]:
    """OCRBench-style answers are list literals; anything unparsable is one raw answer."""
    if isinstance(answer, list):
        return [str(a) for a in answer]
    if answer is None:
        return []
    try:
        parsed = ast.literal_eval(answer)
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        return [answer]
    if isinstance(parsed, (list, tuple)):
        return [str(a) for a in parsed]
    return [answer]


def _ocr_hit(prediction: str, golds: list[str], category: str | None) -> bool:
    if any(marker in (category or "").lower() for marker in _OCR_SPACE_FREE_MARKERS):
        squeezed = "".join(prediction.split())
        return any("".join(gold.split()) in squeezed for gold in golds)
    lowered = prediction.lower().strip().replace("\n", " ")
    return any(gold.lower().strip().replace("\n", " ") in lowered for gold in golds)


def _score_ocrbench(items: list[Item], lookup, missing: int, cot: bool) -> dict:
    """OCRBench: right when any gold (list literal) is a lower-cased substring of the prediction.
    Extra fields: ``score_1000`` (1000 × accuracy; equals the number right on the 1,000-item set),
    ``category_counts`` (rows right per category). ``overall`` = score_1000 / 10."""
    values = []
    for item in items:
        prediction = lookup(item)
        golds = _gold_list(item.answer)
        span = answer_span(prediction, cot=cot) if prediction is not None else None
        values.append(float(span is not None and bool(golds) and _ocr_hit(span, golds, item.category)))
    result = _summary(items, values, len(items), missing)
    result["score_1000"] = 1000.0 * sum(values) / len(values)
    result["overall"] = result["score_1000"] / 10.0
    counts: dict[str, int] = defaultdict(int)
    for item, value in zip(items, values):
        counts[item.category or "uncategorized"] += int(value)
    result["category_counts"] = dict(sorted(counts.items()))
    return result


def _hallusion_keys(item: Item) -> tuple[tuple, tuple] | None:
    """(figure key, question key) from set_id/figure_id/question_id columns or, as VLMEvalKit does,
    from an index of the form ``*_*_*_set_figure_question``; None when neither is available."""
    subcategory = item.l2_category or item.extra.get("subcategory")
    ids = [item.extra.get(name) for name in ("set_id", "figure_id", "question_id")]
    if None in ids:
        parts = str(item.index).split("_")
        if len(parts) < 6:
            return None
        ids = parts[3:6]
    set_id, figure_id, question_id = ids
    return (item.category, subcategory, set_id, figure_id), (item.category, subcategory, set_id, question_id)


def _group_all_right(keys: list, values: list[float]) -> float:
    groups: dict = defaultdict(list)
    for key, value in zip(keys, values):
        groups[key].append(value)
    return _percent(float(all(v)) for v in groups.values())


def _hallusion_metrics(items: list[Item], values: list[float]) -> dict:
    keys = [_hallusion_keys(item) for item in items]
    metrics = {"aAcc": _percent(values), "fAcc": None, "qAcc": None}
    if all(k is not None for k in keys):
        metrics["fAcc"] = _group_all_right([k[0] for k in keys], values)
        metrics["qAcc"] = _group_all_right([k[1] for k in keys], values)
    available = [v for v in metrics.values() if v is not None]
    metrics["overall"] = sum(available) / len(available)
    return metrics


def _score_hallusion(items: list[Item], lookup, missing: int, cot: bool) -> dict:
    """HallusionBench: yes/no extraction. aAcc per row; fAcc per figure (category, subcategory,
    set_id, figure_id) and qAcc per question (category, subcategory, set_id, question_id), a group
    counting only when all its rows are right; ``overall`` = mean of the three. Without figure /
    question ids fAcc and qAcc are None and ``overall`` = aAcc. ``categories`` holds each category's
    overall; ``category_metrics`` its aAcc / fAcc / qAcc."""
    values = []
    for item in items:
        gold = _YES_NO_GOLD.get(str(item.answer).strip().lower().rstrip("."))
        if gold is None:
            raise ValueError(f"item {item.index!r}: HallusionBench answer {item.answer!r} is not yes/no")
        prediction = lookup(item)
        values.append(float(prediction is not None and extract_yes_no(prediction, cot=cot) == gold))
    result = _summary(items, values, len(items), missing)
    result.update(_hallusion_metrics(items, values))
    per_category: dict[str, list[int]] = defaultdict(list)
    for position, item in enumerate(items):
        if item.category is not None:
            per_category[item.category].append(position)
    result["category_metrics"] = {
        name: _hallusion_metrics([items[p] for p in rows], [values[p] for p in rows])
        for name, rows in sorted(per_category.items())
    }
    result["categories"] = {name: m["overall"] for name, m in result["category_metrics"].items()}
    return result


def _decimals(text: str) -> int:
    return len(text.split(".", 1)[1]) if "." in text else 0


def _mathvista_free_form(item: Item, prediction: str | None, cot: bool) -> float | None:
    """1/0 for a rule-checkable free-form answer, None when only a judge could decide."""
    gold_text = str(item.answer).strip()
    answer_type = item.extra.get("answer_type")
    if answer_type not in (None, "integer", "float"):
        return None  # "text" and "list" answers need a judge
    try:
        gold = float(gold_text)
    except ValueError:
        return None
    predicted = extract_number(prediction, cot=cot) if prediction is not None else None
    if predicted is None:
        return 0.0
    if answer_type == "integer":
        return float(predicted == round(gold))
    precision = item.extra.get("precision")
    digits = int(float(precision)) if precision not in (None, "", "nan") else _decimals(gold_text)
    return float(round(predicted, digits) == round(gold, digits))


def _mathvista_gold_letter(item: Item) -> str | None:
    letter = (item.extra.get("answer_option") or "").strip().upper()
    if letter in item.options:
        return letter
    try:
        return _gold_letter(item)
    except ValueError:
        return None


def _score_mathvista(items: list[Item], lookup, missing: int, cot: bool) -> dict:
    """MathVista: multiple choice by option extraction (choices from the ``choices`` list column or
    A.. columns), free form by numeric parse honouring ``answer_type`` / ``precision``. Items a rule
    cannot check (text or list answers) are left out of ``overall`` and counted in ``needs_judge``
    (their indices in ``needs_judge_indices``). Categories come from ``task`` when no category."""
    scored_items, values, judge = [], [], []
    for item in items:
        prediction = lookup(item)
        default_type = "multi_choice" if item.options else "free_form"
        is_choice = item.extra.get("question_type", default_type) == "multi_choice"
        if is_choice:
            gold = _mathvista_gold_letter(item) if item.options else None
            value = None if gold is None else float(
                prediction is not None and extract_option(prediction, item.options, cot=cot) == gold)
        else:
            value = _mathvista_free_form(item, prediction, cot)
        if value is None:
            judge.append(item.index)
        else:
            scored_items.append(item)
            values.append(value)
    result = _summary(scored_items, values, len(items), missing)
    if not any(item.category for item in scored_items):
        result["categories"] = _by_key((item.extra.get("task"), v) for item, v in zip(scored_items, values))
    result["needs_judge"] = len(judge)
    result["needs_judge_indices"] = judge
    return result


def _open_answer_correct(prediction: str | None, answer, cot: bool) -> float:
    """Numeric golds: number parse with 1e-3 relative tolerance; text golds: normalised exact match."""
    if prediction is None:
        return 0.0
    for gold in _gold_list(answer):
        try:
            gold_number = float(gold.replace(",", "").strip())
        except ValueError:
            gold_number = None
        if gold_number is not None and numbers_match(extract_number(prediction, cot=cot), gold_number):
            return 1.0
        if normalize_answer(answer_span(prediction, cot=cot)) == normalize_answer(gold):
            return 1.0
    return 0.0


def _score_mmmu(items: list[Item], lookup, missing: int, cot: bool) -> dict:
    """MMMU: rows with options by option extraction, open rows by number / exact match. When a
    ``split`` column holds "validation", ``overall`` and ``categories`` cover those rows only (the
    number papers report as MMMU val), ``overall_split`` says so and ``splits`` has every split."""
    values = [
        _mcq_correct(item, lookup(item), cot) if item.options
        else _open_answer_correct(lookup(item), item.answer, cot)
        for item in items
    ]
    result = _summary(items, values, len(items), missing)
    validation = [(item, v) for item, v in zip(items, values) if item.split == "validation"]
    if validation and len(validation) < len(items):
        val_items, val_values = map(list, zip(*validation))
        sub = _summary(val_items, val_values, len(items), missing)
        result.update(overall=sub["overall"], categories=sub["categories"], num_scored=sub["num_scored"])
        if "l2_categories" in sub:
            result["l2_categories"] = sub["l2_categories"]
        result["overall_split"] = "validation"
    result["num_open"] = sum(1 for item in items if not item.options)
    return result


def _custom_value(item: Item, prediction: str | None, cot: bool) -> float:
    golds = _gold_list(item.answer)
    if not golds:
        raise ValueError(f"item {item.index!r}: empty answer; give the gold answer (or a list of them)")
    if item.scorer == "choice":
        return _mcq_correct(item, prediction, cot)
    if item.scorer == "yesno":
        gold = _YES_NO_GOLD.get(golds[0].strip().lower())
        if gold is None:
            raise ValueError(f"item {item.index!r}: scorer 'yesno' needs answer yes or no, "
                             f"got {item.answer!r}")
        return float(prediction is not None and extract_yes_no(prediction, cot=cot) == gold)
    if item.scorer == "number":
        try:
            gold_numbers = [float(g.replace(",", "")) for g in golds]
        except ValueError as error:
            raise ValueError(f"item {item.index!r}: scorer 'number' needs a numeric answer, "
                             f"got {item.answer!r}") from error
        predicted = extract_number(prediction, cot=cot) if prediction is not None else None
        return float(any(numbers_match(predicted, g) for g in gold_numbers))
    if prediction is None:
        return 0.0
    span = answer_span(prediction, cot=cot).strip()
    if item.scorer == "anls":
        return anls(span, golds)
    # "exact" and "vqa" both compare normalised strings; "exact" only folds case and whitespace.
    if item.scorer == "exact":
        return float(any(" ".join(span.lower().split()) == " ".join(g.lower().split()) for g in golds))
    return float(any(normalize_answer(span) == normalize_answer(g) for g in golds))


def _score_custom(items: list[Item], lookup, missing: int, cot: bool) -> dict:
    """Custom jsonl: each row names its scorer (choice, yesno, number, exact, anls, vqa); ANLS rows
    contribute their similarity (0–1), the others 0/1. Extra field ``scorers``: accuracy per scorer."""
    values = [_custom_value(item, lookup(item), cot) for item in items]
    result = _summary(items, values, len(items), missing)
    result["scorers"] = _by_key((item.scorer, v) for item, v in zip(items, values))
    return result


def custom_item_values(items: list[Item], predictions: dict, *, cot: bool = False) -> dict[str, float]:
    """Per-question values of a custom benchmark, ``{str(index): value}`` (1/0, or the ANLS
    similarity): what ``score`` averages, kept per question for paired comparisons
    (``mpo.eval.paired``). Items without a prediction count as 0."""
    lookup, _ = _prediction_lookup(items, predictions)
    return {str(item.index): _custom_value(item, lookup(item), cot) for item in items}


_SCORERS = {
    "mcq": _score_mcq,
    "circular_mcq": _score_circular,
    "ocr": _score_ocrbench,
    "yesno": _score_hallusion,
    "mathvista": _score_mathvista,
    "mcq_open": _score_mmmu,
    "custom": _score_custom,
}


def score(benchmark_name: str, items: list[Item], predictions: dict, *, cot: bool = False) -> dict:
    """Score predictions for one benchmark.

    Args:
        benchmark_name: registered name or ``custom:PATH.jsonl`` (see ``mpo.eval.benchmarks``).
        items: the benchmark's items from ``load_benchmark``.
        predictions: item index → model output text; keys match by ``str(index)``. Items without a
            prediction count as wrong and are counted in ``missing``.
        cot: predictions follow the chain-of-thought prompt; parse after the last "Final answer:".
    Returns:
        dict with ``overall`` and ``categories`` in 0–100 plus the fields the benchmark's scorer
        documents (MMBench ``vanilla``; OCRBench ``score_1000``; HallusionBench ``aAcc/fAcc/qAcc``;
        MathVista ``needs_judge``; MMMU ``splits``).
    """
    spec = get_benchmark(benchmark_name)
    if not items:
        raise ValueError(f"no items to score for {benchmark_name!r}; load them with load_benchmark first")
    if not isinstance(predictions, dict):
        raise ValueError(f"predictions must be a dict index → text, got {type(predictions).__name__}")
    lookup, missing = _prediction_lookup(items, predictions)
    return _SCORERS[spec.kind](items, lookup, missing, cot)
