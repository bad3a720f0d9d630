"""Offline tokenizer and chat template for tiny InternVL checkpoints.

No tokenizer can be downloaded in tests or CI, so tiny checkpoints carry a byte-level BPE trained here,
deterministically, with the `tokenizers` library on a small bundled corpus. It carries the special
tokens of InternVL2.5 on Qwen2.5 (`<|im_start|>`, `<|im_end|>`, `<img>`, `</img>`, `<IMG_CONTEXT>`, ...)
and a pad token that never appears in a conversation, so it behaves like the real one for every stage.
"""

from __future__ import annotations

from importlib import resources

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"
VIDEO_TOKEN = "<video>"

# Order matters: it fixes the ids (the first ones after the byte alphabet + merges are the specials).
SPECIAL_TOKENS = [
    PAD_TOKEN,
    IM_START,
    IM_END,
    IMG_START,
    IMG_END,
    IMG_CONTEXT,
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
    VIDEO_TOKEN,
]

# InternVL2.5's default system prompt (the model card's Chinese text, kept verbatim in meaning).
INTERNVL25_SYSTEM_PROMPT = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)

# Jinja chat template in InternVL2.5's format. Images in structured content become one
# `<IMG_CONTEXT>` each, which InternVLProcessor expands to `<img>` + context tokens + `</img>`.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\n" + INTERNVL25_SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' %}{{- '<IMG_CONTEXT>\\n' }}"
    "{%- elif content['type'] == 'video' %}{{- '<video>\\n' }}"
    "{%- elif content['type'] == 'text' %}{{- content['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def bundled_corpus() -> list[str]:
    """Lines of the bundled training text for the offline tokenizer."""
    text = resources.files("mpo.model").joinpath("assets/tokenizer_corpus.txt").read_text("utf-8")
    return [line for line in text.splitlines() if line.strip()]


def train_tiny_tokenizer(vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on the bundled corpus and wrap it as a transformers tokenizer.

    Deterministic: the same `vocab_size` always gives the same vocabulary. Every byte is in the
    alphabet, so any text (Chinese system prompt included) encodes without unknown tokens.
    """
    if vocab_size < 300:
        raise ValueError(f"vocab_size={vocab_size} is too small: the byte alphabet alone needs 256 ids")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        special_tokens=[],
    )
    tok.train_from_iterator(bundled_corpus(), trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        eos_token=IM_END,
        bos_token=None,
        unk_token=None,
        model_max_length=32768,
        padding_side="right",
        extra_special_tokens={
            "start_image_token": IMG_START,
            "end_image_token": IMG_END,
            "context_image_token": IMG_CONTEXT,
            "video_token": VIDEO_TOKEN,
        },
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped
