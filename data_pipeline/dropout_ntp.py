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
from dataclasses import dataclass, replace

from mpo.data.template import normalize_text
from mpo.infer.engine import Request, SamplingParams

__all__ = ["DropoutNTPJob", "DropoutNTPResult", "MIN_WORDS", "build_dropout_ntp_pair", "build_dropout_ntp_pairs",
           "remove_image_placeholders", "split_prefix"]

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


@dataclass
class DropoutNTPJob:
    """One question's Dropout-NTP inputs (see :func:`build_dropout_ntp_pair` for the fields)."""

    prompt: str
    images: list
    chosen_params: SamplingParams
    continuation_params: SamplingParams
    max_dynamic_patch: int = 6


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
    job = DropoutNTPJob(prompt, list(images), chosen_params, continuation_params, max_dynamic_patch)
    return build_dropout_ntp_pairs(engine, [job], ratio=ratio)[0]


def _one_call(engine, requests: list[Request], params: list[SamplingParams]) -> list:
    """The single generation of each request, each drawn with its params' seed. Requests whose params
    differ only in the seed share one call (``Request.seed``: the same draws as a call of their own)."""
    single = [replace(p, num_samples=1) for p in params]
    shared = replace(single[0], seed=0)
    if len(requests) == 1 or any(replace(p, seed=0) != shared for p in single):
        return [engine.generate([r], p)[0][0] for r, p in zip(requests, single)]
    seeded = [replace(r, seed=p.seed) for r, p in zip(requests, single)]
    return [samples[0] for samples in engine.generate(seeded, shared)]


def build_dropout_ntp_pairs(engine, jobs: list[DropoutNTPJob], *, ratio: float = 0.5) -> list[DropoutNTPResult]:
    """:func:`build_dropout_ntp_pair` for several questions, in two generate calls in all.

    Every chosen answer comes from one call and every blind continuation from a second one; each
    request draws with its own params' seed, so each result equals that of
    :func:`build_dropout_ntp_pair` on its job alone (tested). Results are in job order.
    """
    split_prefix("", ratio)  # validates ratio before any generation
    if not jobs:
        return []
    chosen_gens = _one_call(engine, [Request(j.prompt, images=list(j.images), max_dynamic_patch=j.max_dynamic_patch)
                                     for j in jobs], [j.chosen_params for j in jobs])
    results: list[DropoutNTPResult | None] = [None] * len(jobs)
    blind: list[tuple[int, str, str, int, int, dict]] = []  # (job, chosen, prefix, words kept, words, chosen meta)
    for i, (job, gen) in enumerate(zip(jobs, chosen_gens)):
        chosen = gen.text.strip()
        chosen_meta = {"finished": gen.finished, "num_tokens": len(gen.token_ids), "with_image": True}
        prefix, kept, total = split_prefix(chosen, ratio)
        if total < MIN_WORDS or not prefix:
            results[i] = DropoutNTPResult("too_short", chosen, "", "", chosen_meta, {}, 1, len(gen.token_ids))
        else:
            blind.append((i, chosen, prefix, kept, total, chosen_meta))
    continuations = _one_call(
        engine, [Request(remove_image_placeholders(jobs[i].prompt), images=[], assistant_prefix=prefix,
                         max_dynamic_patch=jobs[i].max_dynamic_patch) for i, _, prefix, *_ in blind],
        [jobs[i].continuation_params for i, *_ in blind]) if blind else []
    for (i, chosen, prefix, kept, total, chosen_meta), cont in zip(blind, continuations):
        rejected = prefix + cont.text.rstrip()
        rejected_meta = {
            "finished": cont.finished,
            "num_tokens": len(cont.token_ids),
            "with_image": False,
            "prefix_words": kept,
            "chosen_words": total,
            "ratio": ratio,
        }
        num_tokens = chosen_meta["num_tokens"] + len(cont.token_ids)
        status = "identical" if normalize_text(rejected) == normalize_text(chosen) else "pair"
        results[i] = DropoutNTPResult(status, chosen, rejected, prefix, chosen_meta, rejected_meta, 2, num_tokens)
    return results
