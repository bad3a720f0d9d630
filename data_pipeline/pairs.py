"""Turn K sampled responses to one question into MMPR preference pairs (REFERENCE.md §4 step 6).

    classified = classify_responses(responses, ground_truth="B", choices=["cat", "dog"])
    if question_outcome(classified) == "mixed":
        pairs = make_pairs(classified, max_pairs=15, seed=0)            # *_correctness_rules
    format_pairs = make_format_pairs(classified, max_pairs=15, seed=0)  # *_format_rules

Positives are format-valid, correct responses; negatives are format-valid,
wrong ones; format failures (no parsable answer, conflicting answers, no
reasoning) form their own pair kind.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from data_pipeline.answers import MATCH_MODES, MIN_REASONING_WORDS, check_response_format, is_correct

__all__ = [
    "Classified",
    "Pair",
    "QUESTION_OUTCOMES",
    "ScoredResponse",
    "classify_responses",
    "make_format_pairs",
    "make_pairs",
    "question_outcome",
]

QUESTION_OUTCOMES = ("all_correct", "all_wrong", "mixed", "no_valid")


@dataclass(frozen=True)
class ScoredResponse:
    """One sampled response after the format check.

    Attributes:
        index: position of the response in the sampled list.
        response: the full response text.
        answer: the extracted answer, or None for a format failure.
        reason: "ok", or why the format check failed.
    """

    index: int
    response: str
    answer: str | None
    reason: str


@dataclass
class Classified:
    """Responses of one question sorted into three lists, each in sampling order."""

    positives: list[ScoredResponse] = field(default_factory=list)
    negatives: list[ScoredResponse] = field(default_factory=list)
    format_failures: list[ScoredResponse] = field(default_factory=list)

    @property
    def num_responses(self) -> int:
        """Total number of classified responses."""
        return len(self.positives) + len(self.negatives) + len(self.format_failures)


@dataclass(frozen=True)
class Pair:
    """A preference pair: ``chosen`` is preferred over ``rejected``.

    Attributes:
        chosen: the chosen (correct) response text.
        rejected: the rejected response text.
        chosen_answer: the chosen response's extracted answer.
        rejected_answer: the rejected response's extracted answer (None for "format" pairs).
        chosen_index: index of the chosen response in the sampled list.
        rejected_index: index of the rejected response in the sampled list.
        kind: "correctness" (rejected is wrong) or "format" (rejected fails the format check).
    """

    chosen: str
    rejected: str
    chosen_answer: str
    rejected_answer: str | None
    chosen_index: int
    rejected_index: int
    kind: str


def classify_responses(
    responses: Sequence[str],
    ground_truth: str | Sequence[str],
    *,
    choices: Sequence[str] | Mapping[str, str] | None = None,
    mode: str = "auto",
    min_reasoning_words: int = MIN_REASONING_WORDS,
) -> Classified:
    """Split sampled responses into positives, negatives and format failures.

    Each response goes through :func:`~data_pipeline.answers.check_response_format`;
    format-valid ones are matched against ``ground_truth`` with
    :func:`~data_pipeline.answers.is_correct` (``choices`` and ``mode`` are passed on).

    Args:
        responses: the K sampled responses of one question (a non-string item is a format failure).
        ground_truth: the answer, or a list of acceptable answers.
        choices: option texts of a multiple choice question, or None.
        mode: the matching mode, one of ``MATCH_MODES``.
        min_reasoning_words: words required before the answer.

    Returns:
        A :class:`Classified` whose lists keep sampling order.

    Raises:
        ValueError: unknown mode, or ``responses`` given as a single string.
    """
    if mode not in MATCH_MODES:
        raise ValueError(f"unknown match mode {mode!r}; use one of {', '.join(MATCH_MODES)}")
    if isinstance(responses, str):
        raise ValueError("responses must be a list of response strings, got a single string")
    classified = Classified()
    for index, response in enumerate(responses):
        check = check_response_format(response, min_reasoning_words=min_reasoning_words)
        text = response if isinstance(response, str) else ""
        scored = ScoredResponse(index, text, check.answer, check.reason)
        if not check.ok:
            classified.format_failures.append(scored)
        elif is_correct(check.answer, ground_truth, choices=choices, mode=mode):
            classified.positives.append(scored)
        else:
            classified.negatives.append(scored)
    return classified


def question_outcome(classified: Classified) -> str:
    """How a question fared over its format-valid responses.

    Returns:
        "no_valid" when no response passed the format check, "all_correct" when
        every valid response is correct (the driver drops the question),
        "all_wrong" when none is (kept aside as a hard question), else "mixed".
        Format failures do not count here; format pairs can still be built.
    """
    if not classified.positives and not classified.negatives:
        return "no_valid"
    if not classified.negatives:
        return "all_correct"
    if not classified.positives:
        return "all_wrong"
    return "mixed"


def _check_max_pairs(max_pairs: int) -> None:
    if isinstance(max_pairs, bool) or not isinstance(max_pairs, int) or max_pairs < 1:
        raise ValueError(f"max_pairs must be a positive integer, got {max_pairs!r}")


def _dedup_shuffle_cut(candidates: Iterable[Pair], max_pairs: int, seed: int) -> list[Pair]:
    """Drop repeated (chosen, rejected) texts, shuffle with ``random.Random(seed)``, keep ``max_pairs``."""
    seen: set[tuple[str, str]] = set()
    unique = []
    for pair in candidates:  # candidates arrive in index order, so the first copy kept is deterministic
        key = (pair.chosen, pair.rejected)
        if key not in seen:
            seen.add(key)
            unique.append(pair)
    random.Random(seed).shuffle(unique)
    return unique[:max_pairs]


def _entailed(positive_answer: str, negative_answer: str) -> bool:
    """A negative whose answer contains the positive's ("5" in "15", "cat" in "a cat") is ambiguous."""
    return positive_answer.casefold() in negative_answer.casefold()


def make_pairs(classified: Classified, *, max_pairs: int = 15, seed: int = 0) -> list[Pair]:
    """Correctness pairs: every positive against every negative, filtered, deduplicated, sampled.

    Pairs whose positive answer is a case-insensitive substring of the negative
    answer are skipped; pairs with the same (chosen, rejected) texts are kept
    once; the rest are shuffled with ``random.Random(seed)`` and cut to
    ``max_pairs``. The result depends only on ``classified`` and ``seed``.

    Args:
        classified: output of :func:`classify_responses`.
        max_pairs: the most pairs to keep (15 in MMPR; 3 for very large sources).
        seed: the shuffle seed.

    Returns:
        Up to ``max_pairs`` pairs of kind "correctness".
    """
    _check_max_pairs(max_pairs)
    candidates = (
        Pair(pos.response, neg.response, pos.answer, neg.answer, pos.index, neg.index, "correctness")
        for pos in classified.positives
        for neg in classified.negatives
        if not _entailed(pos.answer, neg.answer)
    )
    return _dedup_shuffle_cut(candidates, max_pairs, seed)


def make_format_pairs(classified: Classified, *, max_pairs: int = 15, seed: int = 0) -> list[Pair]:
    """Format pairs: every positive against every format failure, deduplicated, shuffled and cut.

    Same sampling as :func:`make_pairs` (no entailment filter: a format failure has
    no answer); empty failures are left out. ``rejected_answer`` is None.
    """
    _check_max_pairs(max_pairs)
    candidates = (
        Pair(pos.response, bad.response, pos.answer, None, pos.index, bad.index, "format")
        for pos in classified.positives
        for bad in classified.format_failures
        if bad.response.strip()  # an empty sample teaches nothing about format
    )
    return _dedup_shuffle_cut(candidates, max_pairs, seed)
