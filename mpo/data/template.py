"""InternVL2.5 chat format: prompts with expanded image placeholders, labelled responses, truncation.

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{question}<|im_end|>\\n<|im_start|>assistant\\n{answer}<|im_end|>

Each `<image>` placeholder becomes `<img>` + `<IMG_CONTEXT>` × (tokens_per_tile · tiles) + `</img>`.
The prompt (everything up to and including the assistant header) and each response are tokenized
separately, so chosen and rejected share the exact same prompt ids. Labels cover the answer text and
its `<|im_end|>`, never the role header.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mpo.model.tokenizer import IM_END, IM_START, IMG_CONTEXT, IMG_END, IMG_START, INTERNVL25_SYSTEM_PROMPT

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
IGNORE_INDEX = -100


class TemplateError(ValueError):
    """A sample that cannot be rendered; `reason` is a short, countable category."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def place_image_placeholders(question: str, num_images: int, *, video_frames: int = 0) -> str:
    """Make the question carry exactly one `<image>` per image (or video frame).

    A question without placeholders gets them prepended: `<image>\\n` for one image,
    `Image-1: <image>\\nImage-2: <image>\\n...` for several, `Frame1: <image>\\n...` for a video
    (replacing a `<video>` placeholder where the question has one). A question whose placeholder
    count disagrees with its images is refused.
    """
    if video_frames:
        frames = "".join(f"Frame{i + 1}: {IMAGE_PLACEHOLDER}\n" for i in range(video_frames))
        if VIDEO_PLACEHOLDER in question:
            return question.replace(VIDEO_PLACEHOLDER + "\n", frames, 1).replace(VIDEO_PLACEHOLDER, frames, 1)
        return frames + question
    count = question.count(IMAGE_PLACEHOLDER)
    if count == num_images:
        return question
    if count == 0:
        if num_images == 1:
            return f"{IMAGE_PLACEHOLDER}\n{question}"
        return "".join(f"Image-{i + 1}: {IMAGE_PLACEHOLDER}\n" for i in range(num_images)) + question
    raise TemplateError(
        "placeholder_mismatch", f"question has {count} {IMAGE_PLACEHOLDER} placeholders but the record has {num_images} images"
    )


@dataclass
class EncodedPair:
    """Token ids of one preference pair. `prompt_ids` end with the assistant header."""

    prompt_ids: list[int]
    chosen_ids: list[int]  # answer + <|im_end|>, all labelled
    rejected_ids: list[int]
    num_image_tokens: int
    chosen_truncated: bool = False
    rejected_truncated: bool = False


class ChatTemplate:
    """Renders InternVL2.5 conversations to token ids with a given tokenizer.

    Args:
        tokenizer: a transformers tokenizer carrying InternVL's special tokens.
        tokens_per_tile: image tokens per tile (256 for 448 px tiles with pixel unshuffle 0.5).
        system_prompt: system message; None or "" leaves the system turn out.
    """

    def __init__(self, tokenizer, *, tokens_per_tile: int, system_prompt: str | None = INTERNVL25_SYSTEM_PROMPT):
        self.tokenizer = tokenizer
        self.tokens_per_tile = tokens_per_tile
        self.system_prompt = system_prompt
        ids = tokenizer.convert_tokens_to_ids([IM_END, IMG_START, IMG_END, IMG_CONTEXT])
        unk = getattr(tokenizer, "unk_token_id", None)
        for token, token_id in zip([IM_END, IMG_START, IMG_END, IMG_CONTEXT], ids):
            if token_id is None or (unk is not None and token_id == unk):
                raise ValueError(f"tokenizer lacks the special token {token}; is this an InternVL tokenizer?")
        self.im_end_id, self.img_start_id, self.img_end_id, self.img_context_id = ids
        if tokenizer.pad_token_id is None or tokenizer.pad_token_id in ids:
            raise ValueError("tokenizer needs a dedicated pad token distinct from the chat and image tokens")
        self.pad_id = tokenizer.pad_token_id

    def _text_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, question: str, tiles_per_image: list[int]) -> list[int]:
        """Prompt ids through `<|im_start|>assistant\\n`, one image block per `<image>` in `question`.

        `question` must already carry one placeholder per entry of `tiles_per_image`
        (see `place_image_placeholders`).
        """
        head = ""
        if self.system_prompt:
            head = f"{IM_START}system\n{self.system_prompt}{IM_END}\n"
        text = f"{head}{IM_START}user\n{question}{IM_END}\n{IM_START}assistant\n"
        pieces = text.split(IMAGE_PLACEHOLDER)
        if len(pieces) - 1 != len(tiles_per_image):
            raise TemplateError(
                "placeholder_mismatch",
                f"prompt has {len(pieces) - 1} {IMAGE_PLACEHOLDER} placeholders for {len(tiles_per_image)} images",
            )
        ids = self._text_ids(pieces[0])
        for tiles, piece in zip(tiles_per_image, pieces[1:]):
            ids.append(self.img_start_id)
            ids.extend([self.img_context_id] * (self.tokens_per_tile * tiles))
            ids.append(self.img_end_id)
            ids.extend(self._text_ids(piece))
        return ids

    def response_ids(self, response: str) -> list[int]:
        """Labelled ids of an assistant answer: its text followed by `<|im_end|>`."""
        return self._text_ids(response) + [self.im_end_id]

    def encode_pair(self, question: str, chosen: str, rejected: str, tiles_per_image: list[int], *,
                    max_length: int) -> EncodedPair:
        """Encode a preference pair; each of prompt+chosen and prompt+rejected fits `max_length`.

        Responses are trimmed from their end; image tokens are never cut. A prompt that leaves no
        room for at least one response token raises `TemplateError("prompt_too_long")`.
        """
        prompt = self.prompt_ids(question, tiles_per_image)
        room = max_length - len(prompt)
        if room < 1:
            raise TemplateError(
                "prompt_too_long", f"prompt is {len(prompt)} tokens (images included); max_length is {max_length}"
            )
        chosen_ids, rejected_ids = self.response_ids(chosen), self.response_ids(rejected)
        num_image_tokens = sum(tiles_per_image) * self.tokens_per_tile
        return EncodedPair(
            prompt_ids=prompt,
            chosen_ids=chosen_ids[:room],
            rejected_ids=rejected_ids[:room],
            num_image_tokens=num_image_tokens,
            chosen_truncated=len(chosen_ids) > room,
            rejected_truncated=len(rejected_ids) > room,
        )


def labels_for(prompt_ids: list[int], response_ids: list[int]) -> list[int]:
    """Labels aligned with prompt+response ids: IGNORE_INDEX on the prompt, the ids on the response."""
    return [IGNORE_INDEX] * len(prompt_ids) + list(response_ids)


_WS = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """Whitespace-folded text, used to detect identical chosen/rejected responses."""
    return _WS.sub(" ", text).strip()
