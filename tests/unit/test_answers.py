"""Answer extraction, format check and matching (data_pipeline/answers.py)."""

from __future__ import annotations

import functools
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_pipeline.answers import (
    MATCH_MODES,
    anls_score,
    check_response_format,
    extract_choice_letter,
    extract_final_answer,
    find_boxed,
    format_ok,
    is_correct,
    levenshtein,
    parse_number,
    vqa_normalize,
)

REASONING = "The chart shows four bars, and the tallest one is the third bar.\n"
ABCD = ["a red apple", "a green pear", "a yellow banana", "a purple grape"]

# (prediction, ground truth, choices, mode, expected)
MATCH_TABLE = [
    # --- option letters, many styles ---
    ("A", "A", None, "auto", True),
    ("(B)", "B", None, "auto", True),
    ("B.", "B", None, "auto", True),
    ("C:", "C", None, "auto", True),
    ("C: a yellow banana", "C", ABCD, "auto", True),
    ("(D) a purple grape", "D", ABCD, "auto", True),
    ("Option A", "A", None, "auto", True),
    ("the answer is (B)", "B", None, "auto", True),
    ("The correct option is D", "D", None, "auto", True),
    ("**C**", "C", None, "auto", True),
    ("[B]", "B", None, "choice", True),
    ("b)", "B", None, "choice", True),
    ("a yellow banana", "C", ABCD, "auto", True),
    ("It is a yellow banana", "C", ABCD, "auto", True),
    ("C", "a yellow banana", ABCD, "auto", True),
    ("A", "a yellow banana", ABCD, "auto", False),
    ("(B)", "A", None, "auto", False),
    ("Option C", "B", None, "auto", False),
    ("a green pear", "C", ABCD, "auto", False),
    ("A or B", "A", None, "auto", False),
    ("B", "B", {"A": "cat", "B": "dog"}, "choice", True),
    ("dog", "B", {"a": "cat", "b": "dog"}, "auto", True),
    ("red and blue", "B", ["red", "red and blue"], "choice", True),
    ("So the answer should be B", "B", ["x", "y"], "choice", True),
    # --- numbers: units, commas, percent, fractions ---
    ("42", "42", None, "auto", True),
    ("42 apples", "42", None, "auto", True),
    ("12 cm", "12", None, "auto", True),
    ("12 cm^2", "12", None, "auto", True),
    ("3 m/s", "3", None, "auto", True),
    ("$1,234.50", "1234.5", None, "auto", True),
    ("1,234", "1234", None, "auto", True),
    ("45%", "45", None, "auto", True),
    ("45%", "0.45", None, "auto", True),
    ("0.45", "45%", None, "auto", True),
    ("30°", "30", None, "auto", True),
    ("60^\\circ", "60", None, "auto", True),
    ("1/2", "0.5", None, "auto", True),
    ("0.3333", "1/3", None, "number", True),
    ("0.332", "1/3", None, "number", False),  # off by 4e-3 relative
    ("3.1416", "3.14159", None, "number", True),
    ("3.15", "3.14159", None, "number", False),
    ("x = 5", "5", None, "auto", True),
    ("five", "5", None, "number", True),
    ("−3", "-3", None, "auto", True),
    ("2021", "2020", None, "auto", False),  # integers compare exactly
    ("5 or 6", "5", None, "number", False),
    ("1, 2", "1", None, "number", False),
    ("7", "8", None, "auto", False),
    ("x/2", "2", None, "number", False),
    # --- relaxed (charts) ---
    ("104", "100", None, "relaxed", True),
    ("95.5", "100", None, "relaxed", True),
    ("106", "100", None, "relaxed", False),
    ("Brazil", "brazil", None, "relaxed", True),
    ("Brazil", "Chile", None, "relaxed", False),
    # --- math: LaTeX, fractions, expressions ---
    ("0.5", "\\frac{1}{2}", None, "auto", True),
    ("\\frac{2}{4}", "0.5", None, "auto", True),
    ("\\dfrac{1}{2}", "\\frac{1}{2}", None, "math", True),
    ("1.4142", "\\sqrt{2}", None, "auto", True),
    ("\\sqrt{2}", "\\sqrt{2}", None, "auto", True),
    ("2\\sqrt{2}", "\\sqrt{8}", None, "math", True),
    ("1.5", "\\sqrt{2}", None, "auto", False),
    ("6.2832", "2\\pi", None, "auto", True),
    ("2 \\pi", "2\\pi", None, "auto", True),
    ("\\pi", "2\\pi", None, "auto", False),
    ("x^2+1", "1+x^2", None, "math", True),
    ("x^2-1", "1+x^2", None, "math", False),
    ("\\frac{\\sqrt{3}}{2}", "\\sqrt{3}/2", None, "math", True),
    # --- yes / no ---
    ("Yes", "yes", None, "auto", True),
    ("yes.", "Yes", None, "auto", True),
    ("Yes, the cat is black.", "yes", None, "auto", True),
    ("No, there is none.", "no", None, "auto", True),
    ("No", "yes", None, "auto", False),
    ("I cannot tell", "yes", None, "yesno", False),
    ("yes or no", "yes", None, "yesno", False),
    ("Yes/no", "no", None, "yesno", False),
    ("Yes, there is no dog.", "yes", None, "yesno", True),
    ("The answer is no.", "no", None, "yesno", True),
    # --- free text, VQA normalisation ---
    ("The Cat", "cat", None, "auto", True),
    ("a red car.", "red car", None, "auto", True),
    ("two", "2", None, "vqa", True),
    ("don't know", "dont know", None, "vqa", True),
    ("t-shirt", "t shirt", None, "vqa", True),
    ("dog", "cat", None, "auto", False),
    ("  New   York ", "new york", None, "exact", True),
    ("New York City", "new york", None, "exact", False),
    # --- ANLS: 1 - lev / max_len >= 0.5 ---
    ("hallo world", "hello world", None, "anls", True),  # 1 - 1/11
    ("abxy", "abcd", None, "anls", True),  # exactly 0.5
    ("axyz", "abcd", None, "anls", False),  # 0.25
    ("INVOICE  No. 123", "invoice no. 123", None, "anls", True),
    ("1234567", "1235", None, "anls", True),  # lev 3: 1 - 3/7 = 0.571
    ("19", "1235", None, "anls", False),  # lev 3: 1 - 3/4 = 0.25
    # --- lists of acceptable answers ---
    ("colour", ["color", "colour"], None, "auto", True),
    ("4", ["four", "4"], None, "auto", True),
    ("grey", ["color", "colour"], None, "auto", False),
]


@pytest.mark.parametrize("prediction, ground_truth, choices, mode, expected", MATCH_TABLE)
def test_is_correct_table(prediction, ground_truth, choices, mode, expected):
    assert is_correct(prediction, ground_truth, choices=choices, mode=mode) is expected


def test_table_is_large_and_covers_every_mode():
    assert len(MATCH_TABLE) >= 60
    assert {row[3] for row in MATCH_TABLE} == set(MATCH_MODES)


def test_anls_near_misses_on_both_sides():
    assert anls_score("abxy", "abcd") == pytest.approx(0.5)
    assert anls_score("axyz", "abcd") == pytest.approx(0.25)
    assert anls_score("kitten", "sitting") == pytest.approx(1 - 3 / 7)
    assert anls_score("", "") == 1.0
    assert anls_score("", "abc") == 0.0
    assert anls_score("ABC ", "abc") == 1.0
    assert is_correct("kitten", "sitting", mode="anls")  # 0.571
    assert not is_correct("kit", "sitting", mode="anls")  # lev 5: 1 - 5/7 = 0.286


@functools.lru_cache(maxsize=None)
def _reference_levenshtein(first: str, second: str) -> int:
    """Textbook recursion, independent of the two-row DP under test."""
    if not first or not second:
        return len(first) + len(second)
    cost = first[-1] != second[-1]
    return min(
        _reference_levenshtein(first[:-1], second) + 1,
        _reference_levenshtein(first, second[:-1]) + 1,
        _reference_levenshtein(first[:-1], second[:-1]) + cost,
    )


def test_levenshtein_hand_values():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("flaw", "lawn") == 2
    assert levenshtein("", "abc") == 3
    assert levenshtein("abc", "abc") == 0
    assert levenshtein("1234567", "1235") == 3


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet="abcx", max_size=7), st.text(alphabet="abcx", max_size=7))
def test_levenshtein_matches_recursion_and_is_symmetric(first, second):
    assert levenshtein(first, second) == _reference_levenshtein(first, second)
    assert levenshtein(first, second) == levenshtein(second, first)


# (response, expected answer or None)
EXTRACTION_TABLE = [
    (REASONING + "Final answer: B", "B"),
    (REASONING + "Final answer: B.", "B"),
    (REASONING + "final ANSWER:   c  ", "c"),
    (REASONING + "Final Answer： 42", "42"),  # full-width colon
    (REASONING + "**Final answer:** 42", "42"),
    (REASONING + "**Final Answer**: (C)", "(C)"),
    (REASONING + "Final answer: **3 apples**.", "3 apples"),
    (REASONING + "Final answer: $\\frac{1}{2}$", "\\frac{1}{2}"),
    (REASONING + "Final answer: \\boxed{\\frac{\\sqrt{3}}{2}}.", "\\frac{\\sqrt{3}}{2}"),
    (REASONING + "Final answer: B\nBecause the third bar is tallest.", "B"),
    (REASONING + "Final answer:\n\n$$\n\\frac{1}{2}\n$$\n\nDone.", "\\frac{1}{2}"),
    (REASONING + "Final answer: 3\nLet me double check: yes.\nFinal answer: 3", "3"),
    (REASONING + "Final answer: (B)\nFinal answer: B", "B"),  # same option twice is no conflict
    (REASONING + "Final answer: 3\nFinal answer: 3.0", "3.0"),
    ('I will use the format "Final answer: .." as asked. ' + REASONING + "Final answer: D", "D"),
    (REASONING + "Answer: \\boxed{7}", "7"),
    (REASONING + "So x = \\boxed{\\frac{1}{\\sqrt{2}}}.", "\\frac{1}{\\sqrt{2}}"),
    (REASONING + "We get \\boxed{5} and again \\boxed{5}", "5"),
    (REASONING + "\\boxed{\\frac{1}{2} \\boxed{7}", "7"),  # the unclosed first box is ignored
    (REASONING + "Final answer: 12\n(the \\boxed{13} above was a typo)", "12"),  # trigger wins
    # failures
    (REASONING + "Final answer: 3\nWait, I misread.\nFinal answer: 4", None),  # conflicting
    (REASONING + "\\boxed{1} and \\boxed{2}", None),  # conflicting boxes
    ("Final answer: B", None),  # no reasoning
    ("Answer: \\boxed{7}", None),  # no reasoning
    ("So it is B.\nFinal answer: B", None),  # 4 words < 5
    (REASONING + "Final answer:", None),  # empty
    (REASONING + "Final answer: ..", None),  # placeholder
    (REASONING + "Final answer: **  **", None),
    (REASONING + "The answer is B.", None),  # no trigger
    (REASONING + "Answer: \\boxed{7", None),  # unbalanced box
    ("", None),
    ("   \n ", None),
]


@pytest.mark.parametrize("response, expected", EXTRACTION_TABLE)
def test_extract_final_answer_table(response, expected):
    assert extract_final_answer(response) == expected
    assert format_ok(response)[0] is (expected is not None)


def test_format_ok_reasons():
    assert format_ok(REASONING + "Final answer: B") == (True, "ok")
    ok, reason = format_ok(REASONING + "Final answer: 3\nFinal answer: 4")
    assert not ok and "conflicting" in reason and "'3'" in reason and "'4'" in reason
    ok, reason = format_ok("Final answer: 5")
    assert not ok and "no reasoning" in reason
    ok, reason = format_ok(REASONING + "Final answer: ")
    assert not ok and "empty answer" in reason
    ok, reason = format_ok(REASONING)
    assert not ok and "no answer" in reason
    assert format_ok("") == (False, "empty response")
    assert format_ok(None) == (False, "empty response")  # type: ignore[arg-type]


def test_reasoning_threshold_is_configurable():
    response = "It is B.\nFinal answer: B"
    assert extract_final_answer(response) is None
    assert extract_final_answer(response, min_reasoning_words=2) == "B"
    check = check_response_format(REASONING + "Answer: \\boxed{7}")
    assert (check.ok, check.answer, check.source) == (True, "7", "boxed")


def test_find_boxed_nested_and_unbalanced():
    assert find_boxed("\\boxed{a} x \\boxed{\\frac{1}{\\sqrt{2}}}") == ["a", "\\frac{1}{\\sqrt{2}}"]
    assert find_boxed("\\boxed{\\boxed{1}}") == ["\\boxed{1}"]  # outermost only
    assert find_boxed("\\boxed {x}") == ["x"]
    assert find_boxed("\\boxed{oops") == []
    assert find_boxed("no box") == []


@pytest.mark.parametrize(
    "text, value, is_integer, percent",
    [
        ("42", 42.0, True, False),
        ("-3.5 cm", -3.5, False, False),
        ("$1,234,567", 1234567.0, True, False),
        ("12.5%", 12.5, False, True),
        ("50 percent", 50.0, True, True),
        ("3/4", 0.75, False, False),
        ("\\frac{3}{4}", 0.75, False, False),
        ("\\text{5 meters}", 5.0, True, False),
        ("about 7 apples", 7.0, True, False),
        ("1e3", 1000.0, False, False),
        ("twelve", 12.0, True, False),
    ],
)
def test_parse_number_values(text, value, is_integer, percent):
    parsed = parse_number(text)
    assert parsed is not None
    assert parsed.value == pytest.approx(value)
    assert (parsed.is_integer, parsed.percent) == (is_integer, percent)


@pytest.mark.parametrize(
    "text", ["", "cat", "2+3", "2\\pi", "\\sqrt{2}", "1, 2", "3:45", "2020-05-01", "1/0", "9" * 400, "x/2"]
)
def test_parse_number_rejects_non_numbers(text):
    assert parse_number(text) is None


def test_vqa_normalize():
    assert vqa_normalize("The Two dogs, aren't they?") == "2 dogs arent they"
    assert vqa_normalize("1,000.5 m.") == "1000.5 m"
    assert vqa_normalize("An apple") == "apple"


def test_extract_choice_letter_styles():
    assert extract_choice_letter("A: a red apple") == "A"
    assert extract_choice_letter("(c)") == "C"
    assert extract_choice_letter("I think the answer is (D).") == "D"
    assert extract_choice_letter("a green pear", ABCD) == "B"
    assert extract_choice_letter("Clearly B", ABCD) == "B"
    assert extract_choice_letter("A or B") is None
    assert extract_choice_letter("a banana, maybe") is None  # no letter, no choices
    assert extract_choice_letter(None) is None  # type: ignore[arg-type]


def test_none_prediction_and_none_ground_truth_are_wrong():
    assert not is_correct(None, "A")
    assert not is_correct("A", [None])
    assert not is_correct("A", [])
    assert is_correct(5, 5.0)  # non-strings are compared as text


def test_bad_inputs_raise_value_error():
    with pytest.raises(ValueError, match="unknown match mode 'fuzzy'"):
        is_correct("A", "A", mode="fuzzy")
    with pytest.raises(ValueError, match="choices must be a list"):
        is_correct("A", "A", choices="A. cat B. dog")
    with pytest.raises(ValueError, match="at most 26"):
        is_correct("A", "A", choices=[str(i) for i in range(27)])


def test_math_mode_works_off_the_main_thread():
    results = []
    worker = threading.Thread(target=lambda: results.append(is_correct("0.5", "\\frac{1}{2}", mode="math")))
    worker.start()
    worker.join()
    assert results == [True]


_WEIRD = st.text(alphabet=st.sampled_from(list("aAbB01/.,%$\\{}()^=-_ *:\n\t\"'é°√π")), max_size=25)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_WEIRD, _WEIRD, st.sampled_from([m for m in MATCH_MODES if m != "math"]))
def test_weird_strings_never_raise(prediction, ground_truth, mode):
    assert is_correct(prediction, ground_truth, mode=mode) in (True, False)
    assert is_correct(prediction, [ground_truth, "B"], choices=["x", "y"], mode=mode) in (True, False)
    extract_final_answer(prediction + "Final answer:" + ground_truth)
    extract_final_answer(REASONING + "\\boxed{" + prediction)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_WEIRD, _WEIRD)
def test_weird_strings_never_raise_in_math_mode(prediction, ground_truth):
    assert is_correct(prediction, ground_truth, mode="math") in (True, False)
