"""Chain-of-thought prompts for MMPR response sampling (REFERENCE.md §4 steps 1-2).

Source questions often end with a short-answer instruction ("Answer with the
option's letter from the given choices directly.") that would fight the
chain-of-thought instruction, so it is stripped before the question is wrapped:

    >>> strip_short_answer_instructions("<image>\\nIs the cat black? Please answer yes or no.")
    '<image>\\nIs the cat black?'
    >>> build_cot_prompt("<image>\\nIs the cat black? Please answer yes or no.").endswith(
    ...     "Question:\\n\\n<image>\\nIs the cat black?")
    True
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = [
    "COT_BOXED_TEMPLATE",
    "COT_FINAL_ANSWER_TEMPLATE",
    "PROMPT_STYLES",
    "build_cot_prompt",
    "strip_short_answer_instructions",
]

COT_FINAL_ANSWER_TEMPLATE = (
    "Your task is to answer the question below. Give step by step reasoning before you answer, "
    "and when you're ready to answer, please use the format \"Final answer: ..\"\n\n"
    "Question:\n\n{question}"
)
"""MMPR's chain-of-thought prompt; answers are read after "Final answer:". ``{question}`` is filled by
plain replacement (not ``str.format``), so braces elsewhere need no escaping."""

COT_BOXED_TEMPLATE = (
    "Your task is to answer the question below. Give step by step reasoning before you answer, "
    "and when you're ready to answer, write your final answer on the last line in the format "
    "\"Answer: \\boxed{...}\"\n\n"
    "Question:\n\n{question}"
)
"""The later variant: the final line is ``Answer: \\boxed{...}``; answers are read from the last box."""

PROMPT_STYLES = {"final_answer": COT_FINAL_ANSWER_TEMPLATE, "boxed": COT_BOXED_TEMPLATE}

# Trailing short-answer instructions of VQA / MCQ sources and their common variants.
# Each pattern matches one whole instruction sentence; matching is case-insensitive and
# tolerates curly apostrophes and a missing final period.
_INSTRUCTION_PATTERNS = (
    r"answer with the option[’']?s? letter(?: from the given choices)?(?: directly)?",
    r"answer with the (?:correct )?(?:option|choice) letter(?: from the given choices)?(?: directly)?",
    r"answer with the letter(?: of the correct option)?(?: directly)?",
    r"(?:please )?answer (?:with |using )?(?:a )?(?:yes or no|yes/no|['\"]?yes['\"]? or ['\"]?no['\"]?)",
    r"(?:please )?answer the question (?:with|using|in) (?:a )?(?:single|one) (?:word|number|term)"
    r"(?: or (?:a )?(?:short )?phrase)?",
    r"(?:please )?answer (?:using|with|in) (?:a )?(?:single|one) (?:word|number|term)"
    r"(?: or (?:a )?(?:short )?phrase)?",
    r"(?:please )?answer the question (?:using|with|in) a (?:short|brief) phrase",
    r"(?:please )?answer the question (?:using|with) a single integer number",
)
_TRAILING_INSTRUCTION_RE = re.compile(
    # The instruction must start a sentence or line, so "Why do people answer yes or no" survives.
    r"(?:^|(?<=[\n.?!:;)\]。？！]))\s*(?:" + "|".join(_INSTRUCTION_PATTERNS) + r")\s*[.!]?\s*$",
    re.IGNORECASE,
)


def strip_short_answer_instructions(question: str) -> str:
    """Remove short-answer instructions from the end of a question.

    Handles "Answer with the option's letter from the given choices directly.",
    "Please answer Yes or No.", "Answer the question using a single word or phrase."
    and close variants (any case, curly apostrophe, missing period, "single word",
    "single number", trailing whitespace), when they start a line or follow a
    sentence end. Several stacked instructions are all removed. Text elsewhere,
    including an ``<image>`` placeholder, is untouched; the result is
    right-stripped and may be empty when the question was only an instruction.

    Args:
        question: the source question text.

    Returns:
        The question without trailing short-answer instructions.
    """
    if not isinstance(question, str):
        raise ValueError(f"question must be a string, got {type(question).__name__}")
    stripped = question.rstrip()
    while True:
        match = _TRAILING_INSTRUCTION_RE.search(stripped)
        if match is None:
            return stripped
        stripped = stripped[: match.start()].rstrip()


def _render_options(options: Sequence[str]) -> str:
    if isinstance(options, str) or not isinstance(options, Sequence):
        raise ValueError(f"options must be a list of option texts, got {type(options).__name__}")
    if not 1 <= len(options) <= 26:
        raise ValueError(f"options must hold 1 to 26 texts (letters A-Z), got {len(options)}")
    lines = []
    for i, text in enumerate(options):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"option {chr(ord('A') + i)} must be a non-empty string, got {text!r}")
        lines.append(f"{chr(ord('A') + i)}. {text.strip()}")
    return "\n".join(lines)


def build_cot_prompt(
    question: str, *, style: str = "final_answer", options: Sequence[str] | None = None
) -> str:
    """The MMPR chain-of-thought prompt for one question.

    Steps: strip trailing short-answer instructions; append the options, if any,
    as "A. text" lines after the question; substitute into the template of
    ``style`` ("final_answer": :data:`COT_FINAL_ANSWER_TEMPLATE`, "boxed":
    :data:`COT_BOXED_TEMPLATE`). An ``<image>`` placeholder stays where it is in
    the question (none is added: the data loader prepends one when missing).

    Args:
        question: the source question.
        style: "final_answer" or "boxed".
        options: option texts in A, B, C order, or None.

    Returns:
        The prompt text.

    Raises:
        ValueError: unknown style, bad options, or a question that is empty once
            the instructions are stripped.
    """
    if style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {style!r}; use one of {', '.join(PROMPT_STYLES)}")
    body = strip_short_answer_instructions(question)
    if not body.strip():
        raise ValueError(f"question is empty once short-answer instructions are stripped: {question!r}")
    if options is not None:
        body = f"{body}\n{_render_options(options)}"
    return PROMPT_STYLES[style].replace("{question}", body)
