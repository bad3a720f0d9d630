"""Pair building from classified responses (data_pipeline/pairs.py)."""

from __future__ import annotations

import random

import pytest

from data_pipeline.pairs import (
    Classified,
    Pair,
    ScoredResponse,
    classify_responses,
    make_format_pairs,
    make_pairs,
    question_outcome,
)

WHY = "Counting the apples in the basket one by one gives the total.\n"


def _answer(text: str, variant: str = "") -> str:
    return f"{WHY}{variant}Final answer: {text}"


def _scored(index: int, answer: str | None, response: str | None = None) -> ScoredResponse:
    text = response or f"response {index} -> {answer}"
    return ScoredResponse(index, text, answer, "ok" if answer else "bad")


def test_classify_responses_sorts_and_keeps_order():
    responses = [
        _answer("5"),  # 0 positive
        _answer("7"),  # 1 negative
        "Final answer: 5",  # 2 format failure (no reasoning)
        _answer("five apples", "I recount. "),  # 3 positive (number word + unit)
        _answer("15"),  # 4 negative
        None,  # 5 format failure (not a string)
        WHY + "Final answer: 5\nFinal answer: 6",  # 6 format failure (conflicting)
    ]
    classified = classify_responses(responses, "5")
    assert [r.index for r in classified.positives] == [0, 3]
    assert [r.index for r in classified.negatives] == [1, 4]
    assert [r.index for r in classified.format_failures] == [2, 5, 6]
    assert [r.answer for r in classified.positives] == ["5", "five apples"]
    assert [r.answer for r in classified.negatives] == ["7", "15"]
    assert all(r.answer is None for r in classified.format_failures)
    assert "no reasoning" in classified.format_failures[0].reason
    assert classified.format_failures[1].response == ""
    assert "conflicting" in classified.format_failures[2].reason
    assert classified.num_responses == 7


def test_classify_with_choices_and_mode():
    responses = [_answer("(B)"), _answer("a dog"), _answer("A"), _answer("Option C")]
    classified = classify_responses(responses, "B", choices=["a cat", "a dog", "a cow"])
    assert [r.index for r in classified.positives] == [0, 1]
    assert [r.index for r in classified.negatives] == [2, 3]
    strict = classify_responses(responses, "B", mode="exact")
    assert [r.index for r in strict.positives] == []


def test_make_pairs_is_positives_times_negatives():
    classified = Classified(
        positives=[_scored(0, "B"), _scored(2, "B")],
        negatives=[_scored(1, "A"), _scored(3, "C"), _scored(4, "D")],
    )
    pairs = make_pairs(classified, max_pairs=15, seed=0)
    assert len(pairs) == 6
    assert {(p.chosen_index, p.rejected_index) for p in pairs} == {(c, r) for c in (0, 2) for r in (1, 3, 4)}
    for pair in pairs:
        assert pair.kind == "correctness"
        assert pair.chosen == f"response {pair.chosen_index} -> B"
        assert pair.rejected_answer == pair.rejected.rsplit("-> ", 1)[1]
        assert pair.chosen_answer == "B"


def test_make_pairs_skips_entailed_negatives():
    # "5" is a substring of "15" and of "5 or 6": those negatives could be read as right.
    classified = Classified(
        positives=[_scored(0, "5")],
        negatives=[_scored(1, "15"), _scored(2, "7"), _scored(3, "5 or 6"), _scored(4, "Cat")],
    )
    assert {p.rejected_index for p in make_pairs(classified)} == {2, 4}
    # Case-insensitive: "cat" is inside "Black CAT".
    classified = Classified(
        positives=[_scored(0, "cat")], negatives=[_scored(1, "Black CAT"), _scored(2, "dog")]
    )
    assert [p.rejected_index for p in make_pairs(classified)] == [2]


def test_make_pairs_deduplicates_identical_texts():
    same_positive = "Both say B.\nFinal answer: B"
    classified = Classified(
        positives=[_scored(0, "B", same_positive), _scored(1, "B", same_positive), _scored(2, "B")],
        negatives=[_scored(3, "A", "x A"), _scored(4, "A", "x A")],
    )
    pairs = make_pairs(classified)
    # Unique (chosen, rejected) texts: {same_positive, response 2} x {"x A"} = 2 pairs.
    assert len(pairs) == 2
    assert len({(p.chosen, p.rejected) for p in pairs}) == 2
    # The first occurrence (lowest indices) is the one kept.
    assert {(p.chosen_index, p.rejected_index) for p in pairs} == {(0, 3), (2, 3)}


def _grid(num_positives: int, num_negatives: int) -> Classified:
    return Classified(
        positives=[_scored(i, "B") for i in range(num_positives)],
        negatives=[_scored(100 + j, "A") for j in range(num_negatives)],
    )


def test_make_pairs_is_deterministic_for_a_seed_and_follows_random_random():
    classified = _grid(4, 5)
    first = make_pairs(classified, max_pairs=15, seed=7)
    assert first == make_pairs(classified, max_pairs=15, seed=7)
    # The documented sampling: candidates in index order, random.Random(seed).shuffle, cut.
    expected = [(c, 100 + r) for c in range(4) for r in range(5)]
    random.Random(7).shuffle(expected)
    assert [(p.chosen_index, p.rejected_index) for p in first] == expected[:15]
    orders = {
        tuple((p.chosen_index, p.rejected_index) for p in make_pairs(classified, seed=seed))
        for seed in range(5)
    }
    assert len(orders) > 1  # the seed matters


def test_make_pairs_max_pairs_cut():
    classified = _grid(4, 4)  # 16 candidates
    assert len(make_pairs(classified, max_pairs=15)) == 15
    assert len(make_pairs(classified, max_pairs=100)) == 16
    three = make_pairs(classified, max_pairs=3, seed=1)
    assert len(three) == 3
    assert three == make_pairs(classified, max_pairs=16, seed=1)[:3]


def test_make_pairs_empty_sides():
    assert make_pairs(_grid(0, 3)) == []
    assert make_pairs(_grid(3, 0)) == []


def test_make_format_pairs():
    classified = Classified(
        positives=[_scored(0, "B"), _scored(1, "B")],
        negatives=[_scored(2, "A")],
        format_failures=[_scored(3, None), _scored(4, None, "   "), _scored(5, None)],
    )
    pairs = make_format_pairs(classified, max_pairs=15, seed=0)
    assert {(p.chosen_index, p.rejected_index) for p in pairs} == {(0, 3), (0, 5), (1, 3), (1, 5)}
    assert all(p.kind == "format" and p.rejected_answer is None and p.chosen_answer == "B" for p in pairs)
    assert pairs == make_format_pairs(classified, max_pairs=15, seed=0)
    assert len(make_format_pairs(classified, max_pairs=1, seed=0)) == 1


def test_end_to_end_from_raw_responses():
    responses = [_answer("B"), _answer("A"), _answer("B", "Checking again. "), _answer("D"), "B"]
    classified = classify_responses(responses, "B")
    pairs = make_pairs(classified, max_pairs=15, seed=0)
    assert sorted((p.chosen_index, p.rejected_index) for p in pairs) == [(0, 1), (0, 3), (2, 1), (2, 3)]
    assert pairs[0] == Pair(
        responses[pairs[0].chosen_index],
        responses[pairs[0].rejected_index],
        "B",
        pairs[0].rejected_answer,
        pairs[0].chosen_index,
        pairs[0].rejected_index,
        "correctness",
    )
    format_pairs = make_format_pairs(classified)
    assert sorted((p.chosen_index, p.rejected_index) for p in format_pairs) == [(0, 4), (2, 4)]
    assert question_outcome(classified) == "mixed"


@pytest.mark.parametrize(
    "num_pos, num_neg, num_fail, outcome",
    [
        (2, 0, 0, "all_correct"),
        (2, 0, 3, "all_correct"),
        (0, 2, 0, "all_wrong"),
        (0, 2, 5, "all_wrong"),
        (1, 1, 0, "mixed"),
        (0, 0, 4, "no_valid"),
        (0, 0, 0, "no_valid"),
    ],
)
def test_question_outcome(num_pos, num_neg, num_fail, outcome):
    classified = Classified(
        positives=[_scored(i, "B") for i in range(num_pos)],
        negatives=[_scored(10 + i, "A") for i in range(num_neg)],
        format_failures=[_scored(20 + i, None) for i in range(num_fail)],
    )
    assert question_outcome(classified) == outcome


@pytest.mark.parametrize("max_pairs", [0, -1, 1.5, True, "3"])
def test_bad_max_pairs(max_pairs):
    with pytest.raises(ValueError, match="max_pairs must be a positive integer"):
        make_pairs(_grid(1, 1), max_pairs=max_pairs)
    with pytest.raises(ValueError, match="max_pairs must be a positive integer"):
        make_format_pairs(_grid(1, 1), max_pairs=max_pairs)


def test_bad_classify_inputs():
    with pytest.raises(ValueError, match="unknown match mode"):
        classify_responses([_answer("B")], "B", mode="nearly")
    with pytest.raises(ValueError, match="single string"):
        classify_responses(_answer("B"), "B")
