"""Paired comparison of two models on the same questions.

Two accuracies on one question set are not independent samples: what matters is the questions
where the models disagree. ``paired_comparison`` counts the questions only the first model gets
right and those only the second does, and gives McNemar's exact test of whether that split is more
lopsided than chance (a two-sided binomial test with p = 1/2 on the discordant questions).

    from mpo.eval.paired import paired_comparison
    paired_comparison({"0": 1.0, "1": 0.0}, {"0": 1.0, "1": 1.0})
    # {"num_items": 2, "first_only": 0, "second_only": 1, "net_points": 50.0, "mcnemar_p": 1.0}
"""

from __future__ import annotations

import math
from collections.abc import Mapping

__all__ = ["mcnemar_exact_p", "paired_comparison"]


def mcnemar_exact_p(first_only: int, second_only: int) -> float:
    """Two-sided exact McNemar p-value: ``min(1, 2 P(X <= min(b, c)))`` for X ~ Binomial(b + c, 1/2)."""
    for name, value in (("first_only", first_only), ("second_only", second_only)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a count (int >= 0), got {value!r}")
    n = first_only + second_only
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(first_only, second_only) + 1))
    return min(1.0, 2 * tail / 2**n)  # exact integer ratio, rounded once


def paired_comparison(first: Mapping[str, float], second: Mapping[str, float]) -> dict:
    """Compare per-question scores (1 right, 0 wrong) of two models on the same questions.

    Returns ``num_items``, ``first_only`` and ``second_only`` (questions only that model gets right),
    ``net_points`` (second minus first, percentage points of all questions) and ``mcnemar_p``.
    Raises ``ValueError`` when the question sets differ, a score is not 0 or 1, or there are none.
    """
    if set(first) != set(second):
        only = sorted(set(first) ^ set(second), key=str)[:5]
        raise ValueError(f"the two models were scored on different questions (e.g. {only})")
    if not first:
        raise ValueError("no questions to compare")
    for name, scores in (("first", first), ("second", second)):
        bad = [k for k, v in scores.items() if v not in (0, 1)]
        if bad:
            raise ValueError(f"{name}: scores must be 0 or 1 per question, got {scores[bad[0]]!r} for {bad[0]!r}")
    first_only = sum(1 for k in first if first[k] and not second[k])
    second_only = sum(1 for k in first if second[k] and not first[k])
    return {"num_items": len(first), "first_only": first_only, "second_only": second_only,
            "net_points": round(100.0 * (second_only - first_only) / len(first), 2),
            "mcnemar_p": mcnemar_exact_p(first_only, second_only)}
