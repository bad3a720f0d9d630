"""Chat template: format, image blocks, labels, truncation, pad token."""

from __future__ import annotations

import pytest

from mpo.data.template import ChatTemplate, TemplateError, labels_for, place_image_placeholders
from mpo.model.tokenizer import train_tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tiny_tokenizer()


def test_prompt_matches_internvl25_format(tok):
    t = ChatTemplate(tok, tokens_per_tile=4, system_prompt="Be brief.")
    ids = t.prompt_ids("<image>\nWhat colour?", [2])
    text = tok.decode(ids)
    expected = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<img>" + "<IMG_CONTEXT>" * 8
                + "</img>\nWhat colour?<|im_end|>\n<|im_start|>assistant\n")
    assert text == expected
    assert ids.count(t.img_context_id) == 8


def test_default_system_prompt_and_no_system(tok):
    assert "InternVL" in tok.decode(ChatTemplate(tok, tokens_per_tile=1).prompt_ids("hi", []))
    assert tok.decode(ChatTemplate(tok, tokens_per_tile=1, system_prompt=None).prompt_ids("hi", [])).startswith("<|im_start|>user")


def test_matches_hf_chat_template(tok):
    """The training template renders what the checkpoint's jinja chat template renders (text-only)."""
    t = ChatTemplate(tok, tokens_per_tile=1)
    msgs = [{"role": "user", "content": "How many?"}]
    jinja = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert tok.decode(t.prompt_ids("How many?", [])) == jinja


def test_response_labels_cover_answer_and_im_end(tok):
    t = ChatTemplate(tok, tokens_per_tile=1, system_prompt=None)
    prompt = t.prompt_ids("q", [])
    resp = t.response_ids("Final answer: 3")
    assert resp[-1] == t.im_end_id
    assert tok.decode(resp) == "Final answer: 3<|im_end|>"
    labels = labels_for(prompt, resp)
    assert labels[: len(prompt)] == [-100] * len(prompt)
    assert labels[len(prompt):] == resp
    assert "assistant" not in tok.decode([x for x in labels if x != -100])


def test_placeholders():
    assert place_image_placeholders("q", 1) == "<image>\nq"
    assert place_image_placeholders("q", 2) == "Image-1: <image>\nImage-2: <image>\nq"
    assert place_image_placeholders("a <image> b <image>", 2) == "a <image> b <image>"
    assert place_image_placeholders("q", 0) == "q"
    assert place_image_placeholders("<video>\nq", 0, video_frames=2) == "Frame1: <image>\nFrame2: <image>\nq"
    with pytest.raises(TemplateError) as err:
        place_image_placeholders("<image> <image>", 1)
    assert err.value.reason == "placeholder_mismatch"


def test_truncation_trims_responses_never_images(tok):
    t = ChatTemplate(tok, tokens_per_tile=16, system_prompt=None)
    prompt_len = len(t.prompt_ids("<image>\nq", [1]))
    long = "one two three " * 40
    pair = t.encode_pair("<image>\nq", long, "short", [1], max_length=prompt_len + 5)
    assert len(pair.prompt_ids) == prompt_len and pair.prompt_ids.count(t.img_context_id) == 16
    assert len(pair.chosen_ids) == 5 and pair.chosen_truncated
    assert not pair.rejected_truncated and pair.rejected_ids[-1] == t.im_end_id
    with pytest.raises(TemplateError) as err:
        t.encode_pair("<image>\nq", "a", "b", [1], max_length=prompt_len)
    assert err.value.reason == "prompt_too_long"


def test_pad_token_dedicated(tok):
    t = ChatTemplate(tok, tokens_per_tile=1)
    assert t.pad_id == tok.pad_token_id
    # the pad id is never produced by encoding ordinary text or the chat markup
    ids = t.prompt_ids("<image>\n!!! 0 a", [1]) + t.response_ids("x! 0")
    assert t.pad_id not in ids
    assert tok.convert_tokens_to_ids("!") != t.pad_id
