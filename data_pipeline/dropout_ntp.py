"""Dropout-NTP pairs for questions without ground truth (REFERENCE.md §4, last paragraph).

The chosen answer is generated with the image. Its first half (by words) is given back to the same
model as the start of the assistant turn, this time WITHOUT the image; what the model writes from
there, blind, is the rejected answer's tail:

    chosen   = "The chart shows three bars. The tallest is blue, at 42."
    prefix   = "The chart shows three bars."                 # 5 of its 11 words (ratio 0.5, rounded down)
    rejected = prefix + continuation_without_image

    result = build_dropout_ntp_pair(engine, prompt, images, chosen_params, continuation_params)

Only the continuation request is image-free; the stored pair keeps the prompt with its image, so
training compares a grounded answer with one that drifted once it lost sight of the image (the
driver therefore skips text-only questions: there both answers would be blind).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mpo.data.template import normalize_text
from mpo.infer.engine import Request, SamplingParams

__all__ = ["DropoutNTPResult", "MIN_WORDS", "build_dropout_ntp_pair", "remove_image_placeholders", "split_prefix"]

MIN_WORDS = 2
"""Fewest words a chosen answer needs: with one word the prefix is empty and there is nothing to drop."""

_WORD_RE = re.compile(r"\S+")
# "Image-2: <image>\n" / "Frame3: <image>\n" labels (written by place_image_placeholders) go with their
# placeholder; a bare "<image>" takes its trailing newline with it.
_PLACEHOLDER_RE = re.compile(r"(?:(?:Image-\d+|Frame\d+):\s*)?<image>[ \t]*\n?")


def split_prefix(text: str, ratio: float = 0.5) -> tuple[str, int, int]:
    """The first ``floor(ratio * num_words)`` words of ``text``, with the original spacing kept.

    Words are maximal runs of non-whitespace. The prefix ends right after its last word (no
    trailing whitespace), so the model's continuation brings its own leading space.

    Args:
        text: the chosen answer.
        ratio: fraction of words kept, in (0, 1).

    Returns:
        (prefix, words kept, total words). ``"a b c d e"`` with 0.5 gives ``("a b", 2, 5)``.

    Raises:
        ValueError: ``ratio`` outside (0, 1).
    """
    if not 0 < ratio < 1:
        raise ValueError(f"dropout_ntp.ratio={ratio} must be in (0, 1): it is the share of the chosen answer kept")
    words = list(_WORD_RE.finditer(text))
    keep = int(len(words) * ratio)
    if keep == 0:
        return "", 0, len(words)
    return text[: words[keep - 1].end()], keep, len(words)


def remove_image_placeholders(question: str) -> str:
    """The question with every ``<image>`` placeholder (and its "Image-N:" label) removed.

    ``"<image>\\nWhat is shown?"`` gives ``"What is shown?"``; text around the placeholders is kept.
    """
    return _PLACEHOLDER_RE.sub("", question).strip()


@dataclass
class DropoutNTPResult:
    """One Dropout-NTP attempt.

    Attributes:
        status: "pair", or why no pair was made: "too_short" (chosen answer under
            :data:`MIN_WORDS` words) or "identical" (the blind continuation reproduced the chosen).
        chosen / rejected / prefix: texts ("" when not made).
        chosen_meta / rejected_meta: per-response facts stored with the pair.
        num_generated: responses generated (1 or 2), for throughput.
        num_tokens: new tokens generated in total.
    """

    status: str
    chosen: str
    rejected: str
    prefix: str
    chosen_meta: dict
    rejected_meta: dict
    num_generated: int
    num_tokens: int


def build_dropout_ntp_pair(
    engine,
    prompt: str,
    images: list,
    chosen_params: SamplingParams,
    continuation_params: SamplingParams,
    *,
    ratio: float = 0.5,
    max_dynamic_patch: int = 6,
) -> DropoutNTPResult:
    """Generate a chosen answer with the images, then its blind continuation, and pair them.

    Args:
        engine: anything with ``generate(list[Request], SamplingParams) -> list[list[Generation]]``
            (normally :class:`mpo.infer.engine.Engine`).
        prompt: the user turn as stored in the pair (with its ``<image>`` placeholders, if any).
        images: image paths (or PIL images) for the chosen request.
        chosen_params / continuation_params: sampling of the two requests (``num_samples`` is
            forced to 1; their seeds should differ).
        ratio: fraction of the chosen answer's words kept as the prefix.
        max_dynamic_patch: tile budget of the chosen request.

    Returns:
        A :class:`DropoutNTPResult`; ``rejected.startswith(prefix)`` when ``status == "pair"``.
    """
    one = {"num_samples": 1}
    chosen_gen = engine.generate(
        [Request(prompt, images=list(images), max_dynamic_patch=max_dynamic_patch)],
        SamplingParams(**{**vars(chosen_params), **one}),
    )[0][0]
    chosen = chosen_gen.text.strip()
    chosen_meta = {"finished": chosen_gen.finished, "num_tokens": len(chosen_gen.token_ids), "with_image": True}
    prefix, kept, total = split_prefix(chosen, ratio)
    if total < MIN_WORDS or not prefix:
        return DropoutNTPResult("too_short", chosen, "", "", chosen_meta, {}, 1, len(chosen_gen.token_ids))
    blind_prompt = remove_image_placeholders(prompt)
    cont_gen = engine.generate(
        [Request(blind_prompt, images=[], assistant_prefix=prefix, max_dynamic_patch=max_dynamic_patch)],
        SamplingParams(**{**vars(continuation_params), **one}),
    )[0][0]
    rejected = prefix + cont_gen.text.rstrip()
    num_tokens = len(chosen_gen.token_ids) + len(cont_gen.token_ids)
    rejected_meta = {
        "finished": cont_gen.finished,
        "num_tokens": len(cont_gen.token_ids),
        "with_image": False,
        "prefix_words": kept,
        "chosen_words": total,
        "ratio": ratio,
    }
    if normalize_text(rejected) == normalize_text(chosen):
        return DropoutNTPResult("identical", chosen, rejected, prefix, chosen_meta, rejected_meta, 2, num_tokens)
    return DropoutNTPResult("pair", chosen, rejected, prefix, chosen_meta, rejected_meta, 2, num_tokens)
