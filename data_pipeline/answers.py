"""Answer extraction and format checking for MMPR pair building.

A sampled chain-of-thought response is turned into a short answer with
:func:`extract_final_answer` (the text after the last ``Final answer:``, or the
last balanced ``\\boxed{...}``) and checked with :func:`format_ok` (REFERENCE.md §4
step 4). Comparing that answer with the ground truth (step 5) lives in
:mod:`data_pipeline.matching`; :func:`is_correct` and the other matching names are
re-exported here so ``data_pipeline.answers.is_correct`` keeps working.

    >>> extract_final_answer("The bar for 2019 is highest at 42 units.\\nFinal answer: **42**.")
    '42'
    >>> is_correct("42 units", "42")
    True

Everything here is pure Python, so the module is cheap to import in data-loader workers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Re-exported: data_pipeline.answers is the documented home of is_correct and its primitives.
from data_pipeline.matching import (
    ANLS_THRESHOLD,
    MATCH_MODES,
    NUMBER_REL_TOL,
    RELAXED_REL_TOL,
    ParsedNumber,
    anls_score,
    extract_choice_letter,
    is_correct,
    levenshtein,
    parse_number,
    same_answer,
    vqa_normalize,
)

__all__ = [
    "ANLS_THRESHOLD",
    "MATCH_MODES",
    "MIN_REASONING_WORDS",
    "NUMBER_REL_TOL",
    "RELAXED_REL_TOL",
    "FormatCheck",
    "ParsedNumber",
    "anls_score",
    "check_response_format",
    "extract_choice_letter",
    "extract_final_answer",
    "find_boxed",
    "format_ok",
    "is_correct",
    "levenshtein",
    "parse_number",
    "vqa_normalize",
]

MIN_REASONING_WORDS = 5
"""Fewest words (``\\w+`` runs) that must precede the answer for it to count as reasoned."""

# ---------------------------------------------------------------------------
# Extraction and format check
# ---------------------------------------------------------------------------

# "Final answer:", "**Final Answer:**", "Final Answer**:", "Final answer：" (full-width colon).
_TRIGGER_RE = re.compile(r"final\s+answer\s*(?:\*\*|__)?\s*[:：]", re.IGNORECASE)
_BOXED_START_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
# Echoes of the instruction ('use the format "Final answer: .."') carry no answer.
_PLACEHOLDER_RE = re.compile(r"[\s.\"'`…]*")
_QUOTES = ("\"", "'", "“", "‘", "`")
_MATH_DELIMS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


@dataclass(frozen=True)
class FormatCheck:
    """Outcome of :func:`check_response_format`.

    Attributes:
        ok: True when the response has one clear, reasoned answer.
        reason: "ok" or a short description of the failure.
        answer: the extracted answer (cleaned), or None when ``ok`` is False.
        source: "final_answer", "boxed", or "" when nothing was found.
    """

    ok: bool
    reason: str
    answer: str | None
    source: str


def _closing_braces(text: str) -> dict[int, int]:
    """Map each "{" that is closed to the index of its "}" (one pass, so long inputs stay linear)."""
    partners = {}
    stack = []
    for pos, char in enumerate(text):
        if char == "{":
            stack.append(pos)
        elif char == "}" and stack:
            partners[stack.pop()] = pos
    return partners


def _boxed_spans(text: str) -> list[tuple[int, int, int]]:
    """(start of "\\boxed", start of content, end of content) for each outermost balanced box."""
    if "\\boxed" not in text and "\\fbox" not in text:
        return []
    partners = _closing_braces(text)
    spans = []
    pos = 0
    while True:
        match = _BOXED_START_RE.search(text, pos)
        if match is None:
            return spans
        close = partners.get(match.end() - 1, -1)
        if close < 0:  # unbalanced: look for a later, complete box
            pos = match.end()
            continue
        spans.append((match.start(), match.end(), close))
        pos = close + 1  # boxes nested inside this one are part of its content


def find_boxed(text: str) -> list[str]:
    """Contents of every outermost balanced ``\\boxed{...}`` in ``text``, in order.

    Nested braces are kept: ``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``.
    An unclosed ``\\boxed{`` is ignored.
    """
    return [text[start:end] for _, start, end in _boxed_spans(text)]


def _unwrap_boxed(text: str) -> str:
    spans = _boxed_spans(text)
    if len(spans) == 1 and spans[0][0] == 0 and spans[0][2] == len(text) - 1:
        return text[spans[0][1] : spans[0][2]]
    return text


def _unwrap_math(text: str) -> str:
    for left, right in _MATH_DELIMS:
        if len(text) > len(left) + len(right) and text.startswith(left) and text.endswith(right):
            inner = text[len(left) : -len(right)]
            # "$5$ and $6$" is not wrapped by one pair of delimiters.
            if left not in inner and right not in inner:
                return inner
    return text


def _clean_answer(text: str) -> str:
    """Strip whitespace, markdown emphasis, a trailing period, quotes, $..$ and a wrapping \\boxed{}."""
    previous = None
    while text != previous:
        previous = text
        text = text.strip().strip("*").strip()
        text = text.rstrip(".。").rstrip()
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":
            text = text[1:-1]
        text = _unwrap_boxed(_unwrap_math(text))
    return text


def _is_placeholder(answer: str) -> bool:
    return _PLACEHOLDER_RE.fullmatch(answer) is not None


def _answer_after(text: str, end: int) -> str:
    """The cleaned answer following a trigger that ends at ``end``.

    The rest of the trigger's line; when that is empty ("Final answer:\\n$$x$$"),
    the next paragraph (lines up to a blank line) joined by spaces.
    """
    first_line, _, remainder = text[end:].partition("\n")
    answer = _clean_answer(first_line)
    if answer and not _is_placeholder(answer):
        return answer
    paragraph: list[str] = []
    for line in remainder.split("\n"):
        if line.strip():
            paragraph.append(line.strip())
        elif paragraph:
            break
    return _clean_answer(" ".join(paragraph))



def check_response_format(response: str, *, min_reasoning_words: int = MIN_REASONING_WORDS) -> FormatCheck:
    """Extract the answer of a chain-of-thought response and check its format.

    Rules (REFERENCE.md §4 step 4), in order:

    1. The answer follows the LAST "Final answer:" (case-insensitive, optional
       markdown bold, ASCII or full-width colon; a quoted trigger, as in an echo of
       the instruction, does not count). Without any such trigger the
       answer is the content of the LAST balanced ``\\boxed{...}``. Neither: fail.
    2. The answer, cleaned of whitespace, ``**``, a trailing period, ``$..$`` and a
       wrapping ``\\boxed{}``, must be non-empty: placeholders such as ".." fail.
    3. Several triggers (or, without triggers, several boxes) are fine when they
       agree; two that give different answers fail as conflicting.
    4. At least ``min_reasoning_words`` words must precede the first trigger (or the
       last box): an answer with no reasoning fails.

    Args:
        response: the sampled response text.
        min_reasoning_words: the reasoning threshold of rule 4.

    Returns:
        A :class:`FormatCheck`; never raises for string input.
    """
    if not isinstance(response, str) or not response.strip():
        return FormatCheck(False, "empty response", None, "")
    # A quoted trigger ('use the format "Final answer: .."') mentions the format rather than answering.
    triggers = [
        match
        for match in _TRIGGER_RE.finditer(response)
        if response[max(match.start() - 1, 0) : match.start()] not in _QUOTES
    ]
    if triggers:
        source = "final_answer"
        answers = [_answer_after(response, match.end()) for match in triggers]
        reasoning = response[: triggers[0].start()]
    else:
        spans = _boxed_spans(response)
        if not spans:
            return FormatCheck(False, "no answer: no 'Final answer:' and no balanced \\boxed{}", None, "")
        source = "boxed"
        answers = [_clean_answer(response[start:end]) for _, start, end in spans]
        reasoning = response[: spans[-1][0]]
    final = answers[-1]
    if not final or _is_placeholder(final):
        return FormatCheck(False, f"empty answer after the last {source} trigger", None, source)
    for other in answers[:-1]:
        if other and not _is_placeholder(other) and not same_answer(other, final):
            return FormatCheck(False, f"conflicting answers: {other!r} vs {final!r}", None, source)
    num_words = len(re.findall(r"\w+", reasoning))
    if num_words < min_reasoning_words:
        return FormatCheck(
            False, f"no reasoning before the answer ({num_words} < {min_reasoning_words} words)", None, source
        )
    return FormatCheck(True, "ok", final, source)


def format_ok(response: str, *, min_reasoning_words: int = MIN_REASONING_WORDS) -> tuple[bool, str]:
    """(passed, reason) of the format check; reason is "ok" on success. See :func:`check_response_format`."""
    check = check_response_format(response, min_reasoning_words=min_reasoning_words)
    return check.ok, check.reason


def extract_final_answer(response: str, *, min_reasoning_words: int = MIN_REASONING_WORDS) -> str | None:
    """The final answer of a response, or None when it fails the format check.

    ``"...so the total is 12.\\nFinal answer: **12**."`` gives ``"12"``;
    ``"... Answer: \\boxed{\\frac{1}{2}}"`` gives ``"\\frac{1}{2}"``.
    See :func:`check_response_format` for the rules.
    """
    return check_response_format(response, min_reasoning_words=min_reasoning_words).answer
