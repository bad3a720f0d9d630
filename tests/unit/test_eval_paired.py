"""mpo.eval.paired: McNemar's exact test and the paired comparison, hand-worked."""

from __future__ import annotations

import math

import pytest

from mpo.eval.paired import mcnemar_exact_p, paired_comparison


@pytest.mark.parametrize("b,c,expected", [
    (0, 0, 1.0),                  # no discordant question: no evidence either way
    (0, 5, 2 / 32),               # P(X <= 0) = 1/32 for n = 5, doubled
    (5, 0, 2 / 32),               # symmetric
    (1, 5, 2 * 7 / 64),           # (C(6,0) + C(6,1)) / 2^6, doubled
    (3, 3, 1.0),                  # an even split caps at 1
    (42, 55, 2 * sum(math.comb(97, i) for i in range(43)) / 2**97),
])
def test_mcnemar_exact_p_hand_worked(b, c, expected):
    assert mcnemar_exact_p(b, c) == pytest.approx(expected, rel=1e-12)


def test_mcnemar_exact_p_large_counts_stay_finite():
    p = mcnemar_exact_p(600, 700)  # 2^1300 does not fit a float; the ratio does
    assert 0.0 < p < 0.01


@pytest.mark.parametrize("b,c", [(-1, 2), (1.5, 2), (True, 2), (2, "3")])
def test_mcnemar_exact_p_rejects_non_counts(b, c):
    with pytest.raises(ValueError, match="count"):
        mcnemar_exact_p(b, c)


def test_paired_comparison_hand_worked():
    first = {"0": 1, "1": 1, "2": 0, "3": 0, "4": 1}
    second = {"0": 1, "1": 0, "2": 1, "3": 1, "4": 1}  # question 1 lost, questions 2 and 3 gained
    result = paired_comparison(first, second)
    assert result == {"num_items": 5, "first_only": 1, "second_only": 2, "net_points": 20.0,
                      "mcnemar_p": pytest.approx(1.0)}
    assert paired_comparison(second, first)["net_points"] == -20.0


def test_paired_comparison_rejects_bad_input():
    with pytest.raises(ValueError, match="different questions"):
        paired_comparison({"0": 1, "1": 0}, {"0": 1, "2": 0})
    with pytest.raises(ValueError, match="no questions"):
        paired_comparison({}, {})
    with pytest.raises(ValueError, match="0 or 1"):
        paired_comparison({"0": 0.5}, {"0": 1})  # an ANLS similarity is not a right/wrong answer
