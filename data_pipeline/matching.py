"""Answer matching for MMPR pair building: is an extracted answer the ground truth?

:func:`is_correct` compares a short answer (from
:func:`data_pipeline.answers.extract_final_answer`) with the ground truth in one of
:data:`MATCH_MODES` (REFERENCE.md §4 step 5): option letters, numbers with units and
tolerances, math-verify equivalence, VQA normalisation, yes/no, or ANLS.

    >>> is_correct("42 units", "42")
    True
    >>> is_correct("the answer is (B)", "B")
    True

The primitives (:func:`parse_number`, :func:`vqa_normalize`, :func:`levenshtein`,
:func:`anls_score`, :func:`extract_choice_letter`) are public so evaluation code can
reuse them. Everything is pure Python (math-verify is imported lazily, only for the
"math" mode), so the module is cheap to import in data-loader workers.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "ANLS_THRESHOLD",
    "MATCH_MODES",
    "NUMBER_REL_TOL",
    "RELAXED_REL_TOL",
    "ParsedNumber",
    "anls_score",
    "extract_choice_letter",
    "is_correct",
    "levenshtein",
    "parse_number",
    "same_answer",
    "vqa_normalize",
]

NUMBER_REL_TOL = 1e-3
"""Relative tolerance of the "number" mode (REFERENCE.md §4 step 5)."""
RELAXED_REL_TOL = 0.05
"""Relative tolerance of the "relaxed" (chart) mode."""
ANLS_THRESHOLD = 0.5
"""ANLS similarity at or above which a document answer counts as correct."""
MATCH_MODES = ("auto", "exact", "choice", "number", "relaxed", "math", "vqa", "anls", "yesno")


# ---------------------------------------------------------------------------
# Normalisation helpers
# ---------------------------------------------------------------------------

_NUMBER_WORDS = {
    "zero": "0", "none": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10", "eleven": "11",
    "twelve": "12", "thirteen": "13", "fourteen": "14", "fifteen": "15", "sixteen": "16",
    "seventeen": "17", "eighteen": "18", "nineteen": "19", "twenty": "20", "thirty": "30",
    "forty": "40", "fifty": "50", "sixty": "60", "seventy": "70", "eighty": "80", "ninety": "90",
    "hundred": "100",
}  # fmt: skip
_ARTICLES = frozenset({"a", "an", "the"})


def _normalize_exact(text: str) -> str:
    return " ".join(text.casefold().split())


def vqa_normalize(text: str) -> str:
    """VQA-style normalisation: lowercase; digits for number words ("two" -> "2");
    no articles (a, an, the); no apostrophes, so "don't" and "dont" agree; other
    punctuation becomes a space, except decimal points and thousands commas inside numbers.
    """
    text = text.lower().replace("’", "'")
    text = re.sub(r"(?<=\d),(?=\d)", "", text)
    text = text.replace("'", "")
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", text)
    text = re.sub(r"[^\w\s.]|_", " ", text)
    tokens = [_NUMBER_WORDS.get(token, token) for token in text.split() if token not in _ARTICLES]
    return " ".join(tokens)


def levenshtein(first: str, second: str) -> int:
    """Edit distance (insertions, deletions, substitutions; each costs 1) between two strings."""
    if len(first) < len(second):
        first, second = second, first
    previous = list(range(len(second) + 1))
    for i, char_a in enumerate(first, start=1):
        current = [i]
        for j, char_b in enumerate(second, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def anls_score(prediction: str, ground_truth: str) -> float:
    """Normalised Levenshtein similarity 1 - dist / max(len(pred), len(gt)), in [0, 1].

    Both strings are lowercased and whitespace-collapsed first. Dividing by the
    longer length keeps the score in [0, 1]; InternVL's evaluation divides by one
    string's length instead (REFERENCE.md §4), which lets long predictions go negative.
    """
    pred = " ".join(prediction.lower().split())
    gt = " ".join(ground_truth.lower().split())
    longest = max(len(pred), len(gt))
    if longest == 0:
        return 1.0
    return 1.0 - levenshtein(pred, gt) / longest


def _anls_match(pred: str, gt: str) -> bool:
    pred_len, gt_len = len(" ".join(pred.split())), len(" ".join(gt.split()))
    # The edit distance is at least the length difference: skip the quadratic DP when that alone fails.
    if max(pred_len, gt_len) and 1 - abs(pred_len - gt_len) / max(pred_len, gt_len) < ANLS_THRESHOLD:
        return False
    return anls_score(pred, gt) >= ANLS_THRESHOLD


# ---------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedNumber:
    """A number read from free text by :func:`parse_number`.

    Attributes:
        value: the value as written ("45%" gives 45.0).
        is_integer: written as an integer literal (no decimal point, fraction or exponent).
        percent: a percent sign (or the word "percent") was present.
    """

    value: float
    is_integer: bool
    percent: bool


_NUM = r"(?:\d+(?:\.\d+)?|\.\d+)"
_NUMBER_TOKEN_RE = re.compile(rf"[-+]?{_NUM}(?:[eE][-+]?\d+)?(?:\s*/\s*{_NUM})?")
_NOT_A_PLAIN_NUMBER_RE = re.compile(r"π|√|∞|\\pi|sqrt|\\infty|\\[a-zA-Z]+")
_LATEX_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_LATEX_TEXT_RE = re.compile(r"\\(?:text|textbf|mathrm|mathbf|operatorname)\s*\{([^{}]*)\}")
# What may surround a number: words (units, "x =", "about"), light punctuation.
_RESIDUE_RE = re.compile(r"(?:[^\W\d_]|[\s.,:;!?'\"~-])*")


def parse_number(text: str) -> ParsedNumber | None:
    """Read a single number from a short answer, or None when there is none or several.

    Strips what surrounds a number in answers: currency ($, €, £, ¥), %, degrees
    (°, ^\\circ), thousands commas ("1,234"), unit words ("12 cm", "5 apples",
    "3 m/s", "4 cm^2"), a leading "x =" and LaTeX wrappers (\\text{}, \\frac{a}{b} of
    numbers). Fractions "1/2" are divided out; number words ("five") are read when
    the text has no digits. Expressions ("2+3", "2\\pi", "\\sqrt{2}", "x/2"),
    lists ("1, 2"), dates and times give None, as do non-finite values.
    """
    if not isinstance(text, str) or len(text) > 1000:  # long text is not a short answer
        return None
    text = text.replace("−", "-").replace("\\%", "%").replace("\\$", "$")
    text = _LATEX_TEXT_RE.sub(r" \1 ", text)
    text = _LATEX_FRAC_RE.sub(r"(\1)/(\2)", text)
    text = re.sub(r"\((\s*[-+]?[\d.]+\s*)\)", r"\1", text)  # "(1)/(2)" from \frac{1}{2}
    text = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree|°", " ", text)
    text = re.sub(r"\\[,;!: ]|\\quad|\\qquad|[$€£¥]", " ", text)
    percent = "%" in text or re.search(r"\bper\s?cent\b", text, re.IGNORECASE) is not None
    text = re.sub(r"%|\bper\s?cent\b", " ", text, flags=re.IGNORECASE)
    if _NOT_A_PLAIN_NUMBER_RE.search(text):
        return None
    text = text.rsplit("=", 1)[-1]
    text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text)
    text = re.sub(r"(?<=[^\W\d_])\s*\^\s*\{?\s*[23]\s*\}?|[²³]", "", text)  # cm^2, m³
    text = re.sub(r"(?<=[^\W\d_])/(?=[^\W\d_])", " ", text)  # m/s, km/h
    if not re.search(r"\d", text):
        words = re.split(r"(\W+)", text)
        text = "".join(_NUMBER_WORDS.get(word.lower(), word) for word in words)
    tokens = _NUMBER_TOKEN_RE.findall(text)
    if not tokens or not _RESIDUE_RE.fullmatch(_NUMBER_TOKEN_RE.sub(" ", text)):
        return None
    values = set()
    is_integer = True
    for token in tokens:
        numerator, _, denominator = token.replace(" ", "").partition("/")
        try:
            value = float(numerator) / float(denominator) if denominator else float(numerator)
        except (ZeroDivisionError, ValueError, OverflowError):
            return None
        if not math.isfinite(value):
            return None
        values.add(value)
        is_integer = is_integer and not denominator and re.fullmatch(r"[-+]?\d+", numerator) is not None
    if len(values) != 1:  # "5 or 6", "1, 2", "3:45"
        return None
    return ParsedNumber(values.pop(), is_integer, percent)


def _numbers_close(pred: ParsedNumber, gt: ParsedNumber, rel_tol: float, integers_exact: bool) -> bool:
    """Relative-tolerance comparison; a side written with % may also be read as a fraction (45% = 0.45)."""
    if integers_exact and pred.is_integer and gt.is_integer and pred.percent == gt.percent:
        return pred.value == gt.value
    pred_values = {pred.value} | ({pred.value / 100} if pred.percent and not gt.percent else set())
    gt_values = {gt.value} | ({gt.value / 100} if gt.percent and not pred.percent else set())
    return any(abs(p - g) <= rel_tol * abs(g) + 1e-12 for p in pred_values for g in gt_values)


def _number_match(pred: str, gt: str, rel_tol: float = NUMBER_REL_TOL, integers_exact: bool = True) -> bool:
    pred_number, gt_number = parse_number(pred), parse_number(gt)
    if pred_number is None or gt_number is None:
        return False
    return _numbers_close(pred_number, gt_number, rel_tol, integers_exact)


# ---------------------------------------------------------------------------
# Math (math-verify), yes/no, multiple choice
# ---------------------------------------------------------------------------


def _math_verify_parse(text: str, parse, timeout: int | None) -> list:
    if "$" not in text and "\\boxed" not in text:
        text = f"${text}$"  # math-verify reads LaTeX ("\\sqrt{2}", "2\\pi") only inside delimiters
    return parse(text, parsing_timeout=timeout)


def _sympy_value(parsed: list) -> float | None:
    for item in parsed:
        try:
            if getattr(item, "is_number", False):
                value = complex(item.evalf())
                if value.imag == 0 and math.isfinite(value.real):
                    return value.real
        except Exception:  # sympy raises many types for odd expressions
            return None
    return None


def _math_match(pred: str, gt: str) -> bool:
    """Symbolic equivalence with math-verify, else numeric closeness (rel 1e-3) of the evaluated values."""
    from math_verify import parse, verify  # lazy: costs ~0.3 s to import

    # math-verify times out through signal.alarm, which only works on the main thread.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    pred_value = gt_value = None
    try:
        gt_parsed = _math_verify_parse(gt, parse, timeout)
        pred_parsed = _math_verify_parse(pred, parse, timeout)
        if gt_parsed and pred_parsed and verify(gt_parsed, pred_parsed, timeout_seconds=timeout):
            return True
        gt_value, pred_value = _sympy_value(gt_parsed), _sympy_value(pred_parsed)
    except Exception:  # math-verify and sympy may raise on malformed LaTeX; treat as "not equal"
        pass
    if gt_value is not None and pred_value is not None:
        return abs(pred_value - gt_value) <= NUMBER_REL_TOL * abs(gt_value) + 1e-12
    return _number_match(pred, gt)


def _yes_no(text: str) -> str | None:
    """"yes"/"no" from the first word ("Yes, there is no dog" is yes), else the only one present."""
    tokens = re.findall(r"[a-z]+", text.lower())
    if tokens and tokens[0] in ("yes", "no"):
        hedged = len(tokens) > 1 and tokens[1] in ("or", "yes", "no")  # "yes or no", "yes/no"
        return None if hedged else tokens[0]
    found = {token for token in tokens if token in ("yes", "no")}
    return found.pop() if len(found) == 1 else None


_BRACKETED_LETTER_RE = re.compile(r"[(\[]\s*([A-Za-z])\s*[)\]]\s*(?:[.:：]\s*)?(.*)", re.DOTALL)
_BARE_LETTER_RE = re.compile(r"([A-Za-z])\s*(?:[.:：)]\s*(.*))?", re.DOTALL)
_KEYWORD_LETTER_RE = re.compile(
    r"(?i:option|choice|answer)(?:\s+(?i:is|should\s+be|would\s+be))?\s*[:：]?\s*"
    r"(?:\(([A-Za-z])\)|\[([A-Za-z])\]|([A-Z]))(?![A-Za-z0-9])"
)


def _strict_letter(text: str) -> str | None:
    """The letter of "A", "(A)", "[A]", "A.", "A:", "A)", "A: text", "(A) text"; else None."""
    text = text.strip().strip("*").strip()
    match = _BRACKETED_LETTER_RE.fullmatch(text) or _BARE_LETTER_RE.fullmatch(text)
    return match.group(1).upper() if match else None


def _normalize_option(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.casefold()).split())


def _choices_map(choices: Sequence[str] | Mapping[str, str] | None) -> dict[str, str] | None:
    """Letter -> option text; ValueError when ``choices`` is neither a list nor a dict."""
    if choices is None:
        return None
    if isinstance(choices, Mapping):
        return {str(letter).strip().upper(): str(text) for letter, text in choices.items()}
    if isinstance(choices, (str, bytes)) or not isinstance(choices, Sequence):
        raise ValueError(
            f"choices must be a list of option texts in A, B, C order or a dict letter -> text, "
            f"got {type(choices).__name__}"
        )
    if len(choices) > 26:
        raise ValueError(f"choices has {len(choices)} options; at most 26 (A-Z) are supported")
    return {chr(ord("A") + i): str(text) for i, text in enumerate(choices)}


def _option_from_text(text: str, choices: dict[str, str]) -> str | None:
    """Letter whose option text equals ``text``, else the unique option text found inside it."""
    norm = _normalize_option(text)
    options = {letter: _normalize_option(option) for letter, option in choices.items()}
    options = {letter: option for letter, option in options.items() if option}
    exact = [letter for letter, option in options.items() if option == norm]
    if len(exact) == 1:
        return exact[0]
    padded = f" {norm} "
    contained = [letter for letter, option in options.items() if f" {option} " in padded]
    # "red and blue" contains both "red" and "red and blue": keep the most specific option.
    contained = [a for a in contained if not any(b != a and options[a] in options[b] for b in contained)]
    return contained[0] if len(contained) == 1 else None


def extract_choice_letter(
    prediction: str, choices: Sequence[str] | Mapping[str, str] | None = None
) -> str | None:
    """The option letter a short answer designates, uppercase, or None when unclear.

    Tried in order: a letter form ("A", "(A)", "A.", "A: text", "**C**"); a keyword
    form ("Option A", "the answer is (B)", the last such phrase wins); with
    ``choices``, the option text itself or the one option text contained in the
    answer; finally one valid capital letter among the last three words.
    """
    if not isinstance(prediction, str):
        return None
    choice_map = _choices_map(choices)
    valid = set(choice_map) if choice_map else {chr(c) for c in range(ord("A"), ord("Z") + 1)}
    letter = _strict_letter(prediction)
    if letter is not None:
        return letter
    keyword_matches = list(_KEYWORD_LETTER_RE.finditer(prediction))
    if keyword_matches:
        last = keyword_matches[-1]
        return next(group for group in last.groups() if group).upper()
    if choice_map:
        letter = _option_from_text(prediction, choice_map)
        if letter is not None:
            return letter
    tail = re.findall(r"[A-Za-z]+", prediction)[-3:]
    candidates = {token for token in tail if len(token) == 1 and token in valid}
    return candidates.pop() if len(candidates) == 1 else None


def _choice_match(pred: str, gt: str, choices: dict[str, str] | None) -> bool:
    gt_letter = _strict_letter(gt)
    if gt_letter is None and choices:
        # The ground truth may be an option text: it must equal one option (not merely contain it).
        gt_norm = _normalize_option(gt) or None  # an all-punctuation truth names no option
        letters = [letter for letter, text in choices.items() if _normalize_option(text) == gt_norm]
        gt_letter = letters[0] if len(letters) == 1 else None
    if gt_letter is None:
        return _normalize_option(pred) == _normalize_option(gt)
    return extract_choice_letter(pred, choices) == gt_letter


# ---------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------


def _has_latex(text: str) -> bool:
    return "\\" in text or "^" in text or "frac" in text


def _auto_kind(gt: str, choices: dict[str, str] | None) -> str:
    if choices is not None or re.fullmatch(r"\s*\(?[A-Z]\)?\.?\s*", gt):
        return "choice"
    if _normalize_exact(gt) in ("yes", "no"):
        return "yesno"
    if parse_number(gt) is not None:
        return "number"
    if _has_latex(gt):
        return "math"
    return "text"


def _match_one(pred: str, gt: str, choices: dict[str, str] | None, mode: str) -> bool:
    if _normalize_exact(pred) == _normalize_exact(gt):
        return True  # case-insensitive exact match settles every mode
    if mode == "exact":
        return False
    kind = _auto_kind(gt, choices) if mode == "auto" else mode
    if kind == "choice":
        return _choice_match(pred, gt, choices)
    if kind == "yesno":
        gt_word = _yes_no(gt)
        return gt_word is not None and _yes_no(pred) == gt_word
    if kind == "number":
        if _number_match(pred, gt):
            return True
        return mode == "auto" and _has_latex(pred) and _math_match(pred, gt)
    if kind == "relaxed":
        return _number_match(pred, gt, RELAXED_REL_TOL, integers_exact=False)
    if kind == "math":
        return _math_match(pred, gt)
    if kind in ("vqa", "text"):
        return vqa_normalize(pred) == vqa_normalize(gt)
    if kind == "anls":
        return _anls_match(pred, gt)
    raise AssertionError(f"unhandled match kind {kind!r}")


def is_correct(
    prediction: str | None,
    ground_truth: str | Sequence[str],
    *,
    choices: Sequence[str] | Mapping[str, str] | None = None,
    mode: str = "auto",
) -> bool:
    """Whether an extracted answer matches the ground truth.

    A case-insensitive, whitespace-normalised exact match always counts. Otherwise:

    - "exact": nothing more.
    - "choice": option letters in any common style ("A", "(A)", "A.", "A: text",
      "Option A", "the answer is (B)", "**C**") or the option text itself; the
      ground truth may be a letter or an option text. ``choices``: option texts in
      A, B, C order, or a dict letter -> text.
    - "number": one number each side, relative tolerance 1e-3 (integers written as
      integers must be equal: 2020 is not 2021); %, °, $, thousands commas and unit
      words are ignored; "1/2" equals "0.5"; "45%" also equals "0.45".
    - "relaxed": numbers within 5% (chart QA); otherwise only the exact match.
    - "math": math-verify equivalence (LaTeX, fractions, expressions), then numeric
      closeness of the evaluated values ("2\\pi" vs "6.2832"), then "number".
    - "vqa": equal after :func:`vqa_normalize`.
    - "anls": :func:`anls_score` >= 0.5.
    - "yesno": the yes/no word of the prediction equals the ground truth's.
    - "auto": "choice" when ``choices`` is given or the ground truth is one capital
      letter; "yesno" for yes/no; "number" when the ground truth parses as one
      number (then "math" if the prediction holds LaTeX); "math" when the ground
      truth holds LaTeX (backslash, ^, frac); otherwise "vqa".

    Args:
        prediction: the extracted answer (None counts as wrong).
        ground_truth: the answer, or a list of acceptable answers (any match counts).
        choices: option texts for multiple choice questions.
        mode: one of :data:`MATCH_MODES`.

    Returns:
        True when the prediction matches. Odd strings never raise.

    Raises:
        ValueError: unknown ``mode``, or ``choices`` neither a list nor a dict.
    """
    if mode not in MATCH_MODES:
        raise ValueError(f"unknown match mode {mode!r}; use one of {', '.join(MATCH_MODES)}")
    choice_map = _choices_map(choices)
    if prediction is None:
        return False
    if isinstance(ground_truth, (list, tuple)):
        answers = list(ground_truth)
    else:
        answers = [ground_truth]
    pred = str(prediction)
    return any(_match_one(pred, str(answer), choice_map, mode) for answer in answers if answer is not None)


def same_answer(first: str, second: str) -> bool:
    """Whether two extracted answers say the same thing ("B" and "(B) cat", "5" and "5.0").

    Symmetric and deliberately simple (same text, same strict option letter, or the same
    number value): it tells agreeing repeats of an answer from conflicting ones in
    :func:`data_pipeline.answers.check_response_format`, it is not a grader.
    """
    if _normalize_exact(first) == _normalize_exact(second):
        return True
    letter = _strict_letter(first)
    if letter is not None and letter == _strict_letter(second):
        return True
    number_a, number_b = parse_number(first), parse_number(second)
    return number_a is not None and number_b is not None and number_a.value == number_b.value
