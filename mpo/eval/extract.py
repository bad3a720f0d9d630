"""Rule-based answer extraction from free-text model predictions.

Everything here is a pure function of strings, so scorers stay deterministic and need no judge model:

- :func:`answer_span` keeps the text after the last ``Final answer:`` for chain-of-thought outputs;
- :func:`extract_option` finds a multiple-choice letter (VLMEvalKit-style rules, see REFERENCE §7);
- :func:`extract_yes_no` and :func:`extract_number` handle yes/no and numeric answers;
- :func:`normalize_answer`, :func:`anls` and :func:`numbers_match` are the matching primitives that
  the scorers share (the per-pair ANLS score and edit distance come from :mod:`data_pipeline.matching`).

Example::

    >>> extract_option("The answer is (B) 8/11.", {"A": "3/11", "B": "8/11"})
    'B'
"""

from __future__ import annotations

import math
import re

from data_pipeline.matching import anls_score

FINAL_ANSWER_TRIGGER = "final answer:"

# Characters VLMEvalKit turns into spaces before looking for a lone option letter.
_OPTION_PUNCTUATION = ".()[],:;!?*#{}\"'`"
# A lone option letter must sit among the last few tokens: an early "A" is usually an article.
_LAST_TOKENS_WINDOW = 5

# "answer is B", "Answer: (B)", "the correct option is B", "choice: [C]", "Option B".
_EXPLICIT_OPTION_RE = re.compile(
    r"(?i:answer|choice|option)\s*(?:(?i:is)|:)?\s*(?:(?i:option)\s*)?[\(\[]?([A-Z])\b"
)
# A prediction that starts with a label: "B. text", "B: text", "(B) text", "B) text".
_LEADING_LABEL_RE = re.compile(r"^[\(\[]?([A-Z])(?:[\)\]]|[.:])(?:\s|$)")
_BOXED_RE = re.compile(r"\\boxed\{")
_NUMBER_RE = re.compile(
    r"(?:(?<![\w).])[-+])?(?:\d+(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?"
)
_LATEX_FRAC_RE = re.compile(r"\\[dt]?frac\{\s*([^{}]*?)\s*\}\{\s*([^{}]*?)\s*\}")
_THOUSANDS_COMMA_RE = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_WORD_NUMBERS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
    "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14,
    "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20,
}
_ARTICLES = {"a", "an", "the"}


# Kept apart from data_pipeline.answers (tolerant trigger, quote/conflict/reasoning rules): benchmark
# scoring parses after the literal "Final answer:" the CoT prompt asks for and never rejects a response.
def answer_span(prediction: str, *, cot: bool = False) -> str:
    """Return the part of ``prediction`` that holds the answer.

    With ``cot=True`` this is the text after the last ``Final answer:`` (case-insensitive), the
    format the MPO chain-of-thought prompt asks for; when the trigger is absent the whole
    prediction is returned so the other rules can still try. Without ``cot`` the prediction is
    returned unchanged. Non-string input is a ``ValueError``.
    """
    if not isinstance(prediction, str):
        raise ValueError(f"prediction must be a str, got {type(prediction).__name__}")
    if cot:
        # match on the original text: lower() can change the length (e.g. "İ"), shifting positions
        matches = list(re.finditer(re.escape(FINAL_ANSWER_TRIGGER), prediction, flags=re.IGNORECASE))
        if matches:
            return prediction[matches[-1].end():]
    return prediction


def _normalize_for_options(text: str) -> str:
    """Lower-case and turn every non-alphanumeric run into one space (so "8/11" ≡ "8 11")."""
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split())


def _match_option_text(text: str, options: dict[str, str]) -> str | None:
    """Letter of the one option whose text appears in ``text`` as whole words, else None."""
    padded = f" {_normalize_for_options(text)} "
    normalized = {letter: _normalize_for_options(str(value)) for letter, value in options.items()}
    for letter, value in normalized.items():
        if value and padded.strip() == value:
            return letter
    hits = {letter: value for letter, value in normalized.items() if value and f" {value} " in padded}
    # "black cat" also contains "cat": keep only candidates not contained in another candidate.
    maximal = [
        letter for letter, value in hits.items()
        if not any(other != letter and f" {value} " in f" {hits[other]} " for other in hits)
    ]
    return maximal[0] if len(maximal) == 1 else None


# VLMEvalKit's option rules (REFERENCE §7: last-tokens window, article "A"), not MMPR's extract_choice_letter,
# so scores compare with published ones ("the answer is (b)" is None here, B there).
def extract_option(prediction: str, options: dict[str, str], *, cot: bool = False) -> str | None:
    """Extract the chosen option letter from a free-text prediction.

    Args:
        prediction: model output.
        options: letter → option text, e.g. ``{"A": "cat", "B": "dog"}``; letters are single
            upper-case characters.
        cot: parse only the text after the last ``Final answer:`` (see :func:`answer_span`).

    Rules, first hit wins: the whole answer is one letter (``"B"``, ``"(b)"``, ``"B."``); the last
    explicit statement (``"answer is B"``, ``"Answer: (B)"``, ``"option B"``); a leading label
    (``"B. dog"``); exactly one distinct option letter among the tokens (punctuation stripped) and
    it is among the last five (a lone "A" followed by a lower-case word reads as an article, so a
    unique option-text match overrules it); exactly one option whose text appears in the answer.
    Otherwise ``None`` (scored wrong).
    """
    if not options:
        raise ValueError("options is empty: pass the item's letter → text mapping, e.g. {'A': 'cat'}")
    bad_letters = [letter for letter in options if not (len(letter) == 1 and "A" <= letter <= "Z")]
    if bad_letters:
        raise ValueError(f"option keys must be single upper-case letters, got {bad_letters}")
    text = answer_span(prediction, cot=cot).strip()
    if not text:
        return None

    bare = text.strip(" \t\n.()[]{}:*#'\"`")
    if len(bare) == 1 and bare.upper() in options:
        return bare.upper()

    explicit = [m.group(1) for m in _EXPLICIT_OPTION_RE.finditer(text) if m.group(1) in options]
    if explicit:
        return explicit[-1]

    leading = _LEADING_LABEL_RE.match(text)
    if leading and leading.group(1) in options:
        return leading.group(1)

    cleaned = text
    for char in _OPTION_PUNCTUATION:
        cleaned = cleaned.replace(char, " ")
    tokens = cleaned.split()
    found = {token for token in tokens if token in options}
    if len(found) == 1:
        letter = found.pop()
        last_position = len(tokens) - 1 - tokens[::-1].index(letter)
        if last_position < len(tokens) - _LAST_TOKENS_WINDOW:
            return None
        # "A cat" reads as an article: let a unique option-text match overrule the letter.
        next_token = tokens[last_position + 1] if last_position + 1 < len(tokens) else ""
        if letter == "A" and next_token[:1].islower():
            return _match_option_text(text, options) or letter
        return letter
    if len(found) > 1:
        return None

    return _match_option_text(text, options)


# Not matching._yes_no (a leading "yes or" hedges there): "yes or maybe" is yes here, None there.
def extract_yes_no(prediction: str, *, cot: bool = False) -> str | None:
    """Return ``"yes"``, ``"no"`` or ``None`` for a yes/no prediction.

    Words are compared case-insensitively with punctuation removed ("Yes." and "no," count). A
    leading yes/no decides ("Yes, there is no dog" → yes); otherwise the answer must contain exactly
    one of the two words ("I think yes" → yes; "yes or no" → None).
    """
    words = re.findall(r"[a-z]+", answer_span(prediction, cot=cot).lower())
    if not words:
        return None
    if words[0] in ("yes", "no") and not {"yes", "no"} <= set(words[:3]):
        return words[0]
    has_yes, has_no = "yes" in words, "no" in words
    if has_yes != has_no:
        return "yes" if has_yes else "no"
    return None


# Not answers.find_boxed (outermost boxes, \fbox too): the eval reads the last balanced \boxed{ (inner one if nested).
def _last_boxed(text: str) -> str | None:
    """Content of the last balanced ``\\boxed{...}``, or None."""
    starts = [m.end() for m in _BOXED_RE.finditer(text)]
    for start in reversed(starts):
        depth = 1
        for position in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[position], 0)
            if depth == 0:
                return text[start:position]
    return None


def _parse_number_token(token: str) -> float | None:
    token = token.replace(" ", "")
    try:
        if "/" in token:
            numerator, denominator = token.split("/")
            return float(numerator) / float(denominator) if float(denominator) != 0 else None
        return float(token)
    except ValueError:
        return None


# Not matching.parse_number (exactly one plain number or None): a free-form benchmark answer scores its last number.
def extract_number(prediction: str, *, cot: bool = False) -> float | None:
    """Return the last number in the answer as a float, or None.

    Handles signs (also the Unicode minus), decimals, scientific notation, thousands separators
    ("1,234"), fractions ("3/4" → 0.75), units and percent signs (stripped: "5%" → 5.0), a last
    ``\\boxed{}``, and the words zero…twenty when the answer has no digits.
    """
    text = answer_span(prediction, cot=cot)
    boxed = _last_boxed(text)
    if boxed is not None:
        text = boxed
    text = _LATEX_FRAC_RE.sub(r"\1/\2", text)
    text = _THOUSANDS_COMMA_RE.sub("", text.replace("\u2212", "-"))
    matches = _NUMBER_RE.findall(text)
    if matches:
        return _parse_number_token(matches[-1])
    words = [word for word in re.findall(r"[a-z]+", text.lower()) if word in _WORD_NUMBERS]
    return float(_WORD_NUMBERS[words[-1]]) if words else None


# Not matching's number mode (percent-as-fraction, exact integers): the eval compares floats with math.isclose.
def numbers_match(predicted: float | None, gold: float, *, rel_tol: float = 1e-3) -> bool:
    """True when ``predicted`` equals ``gold`` within ``rel_tol`` (relative; 1e-9 absolute floor)."""
    if predicted is None or math.isnan(predicted):
        return False
    return math.isclose(predicted, gold, rel_tol=rel_tol, abs_tol=1e-9)


# Not matching.vqa_normalize ("two" -> "2", "don't" = "dont"): the eval's short-answer match keeps words as written.
def normalize_answer(text: str) -> str:
    """VQA-style normalisation: lower-case, drop punctuation (keeping decimal points) and articles."""
    text = _THOUSANDS_COMMA_RE.sub("", str(text).lower().strip())
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", text)
    text = re.sub(r"[^\w\s.]", " ", text)
    return " ".join(word for word in text.split() if word not in _ARTICLES)


def anls(prediction: str, golds: list[str], *, threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity of one prediction, in [0, 1].

    For each gold: s = 1 − edit_distance / max(len(pred), len(gold)) on lower-cased, whitespace-
    collapsed strings, and s counts only when ≥ ``threshold`` (DocVQA convention); the best gold
    wins. (InternVL's code divides by one length only, which REFERENCE §4 notes as a bug.)
    """
    if not golds:
        raise ValueError("anls needs at least one gold answer")
    best = 0.0
    for gold in golds:
        similarity = anls_score(prediction, str(gold))  # the per-pair score MMPR's "anls" mode uses
        if similarity >= threshold:
            best = max(best, similarity)
    return best
