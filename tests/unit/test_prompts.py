"""Short-answer instruction stripping and chain-of-thought prompts (data_pipeline/prompts.py)."""

from __future__ import annotations

import pytest

from data_pipeline.prompts import (
    COT_BOXED_TEMPLATE,
    COT_FINAL_ANSWER_TEMPLATE,
    build_cot_prompt,
    strip_short_answer_instructions,
)

COT_HEAD = (
    "Your task is to answer the question below. Give step by step reasoning before you answer, "
    "and when you're ready to answer, please use the format \"Final answer: ..\"\n\nQuestion:\n\n"
)

STRIP_TABLE = [
    ("What is shown?\nAnswer with the option's letter from the given choices directly.", "What is shown?"),
    ("What is shown?\nanswer with the option’s letter from the given choices directly", "What is shown?"),
    ("What is shown? Answer with the option letter from the given choices directly.", "What is shown?"),
    ("Is it red? Please answer Yes or No.", "Is it red?"),
    ("Is it red? Please answer yes or no.  \n", "Is it red?"),
    ("Is it red?\nAnswer yes or no", "Is it red?"),
    ("Is it red? Please answer with yes or no.", "Is it red?"),
    ("What color is it?\nAnswer the question using a single word or phrase.", "What color is it?"),
    ("What color is it? ANSWER THE QUESTION USING A SINGLE WORD OR PHRASE", "What color is it?"),
    ("What color is it? Answer the question with a single word.", "What color is it?"),
    ("How many? Answer the question using a single number.", "How many?"),
    ("How many? Answer using a single word or phrase.", "How many?"),
    ("How many?\nAnswer the question using a single integer number.", "How many?"),
    (  # stacked instructions are all removed
        "Is it red? Answer the question using a single word or phrase. Please answer yes or no.",
        "Is it red?",
    ),
    ("<image>\nIs it red? Please answer yes or no.", "<image>\nIs it red?"),
    # left alone: no instruction, instruction not at the end, or not a whole sentence
    ("What is the answer with the option's letter?", "What is the answer with the option's letter?"),
    ("Please answer yes or no. Is it red?", "Please answer yes or no. Is it red?"),
    ("Why do people answer yes or no", "Why do people answer yes or no"),
    ("Describe the image.", "Describe the image."),
    ("Please answer yes or no.", ""),
]


@pytest.mark.parametrize("question, expected", STRIP_TABLE)
def test_strip_short_answer_instructions(question, expected):
    assert strip_short_answer_instructions(question) == expected


def test_final_answer_prompt_is_reference_text():
    prompt = build_cot_prompt("What is 2+2? Answer the question using a single word or phrase.")
    assert prompt == COT_HEAD + "What is 2+2?"
    assert COT_FINAL_ANSWER_TEMPLATE == COT_HEAD + "{question}"


def test_boxed_prompt():
    prompt = build_cot_prompt("What is 2+2?", style="boxed")
    assert prompt.endswith("Question:\n\nWhat is 2+2?")
    assert 'format "Answer: \\boxed{...}"' in prompt
    assert "last line" in prompt
    assert prompt == COT_BOXED_TEMPLATE.replace("{question}", "What is 2+2?")


def test_options_rendered_after_question_and_image_kept_in_place():
    question = (
        "Image-1: <image>\nWhich fruit is it?\n"
        "Answer with the option's letter from the given choices directly."
    )
    prompt = build_cot_prompt(question, options=["apple", " pear "])
    assert prompt == COT_HEAD + "Image-1: <image>\nWhich fruit is it?\nA. apple\nB. pear"


def test_braces_in_question_survive():
    assert build_cot_prompt("Solve {x | x > {question}}").endswith("Solve {x | x > {question}}")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"style": "short"}, "unknown prompt style"),
        ({"options": "A. cat"}, "options must be a list"),
        ({"options": []}, "1 to 26"),
        ({"options": [str(i) for i in range(27)]}, "1 to 26"),
        ({"options": ["cat", " "]}, "option B must be a non-empty string"),
    ],
)
def test_build_cot_prompt_bad_inputs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_cot_prompt("Which one?", **kwargs)


def test_empty_questions_raise():
    with pytest.raises(ValueError, match="question is empty"):
        build_cot_prompt("Please answer yes or no.")
    with pytest.raises(ValueError, match="question must be a string"):
        strip_short_answer_instructions(None)  # type: ignore[arg-type]
