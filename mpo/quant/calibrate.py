"""AWQ calibration data: conversations -> the hidden states that enter the first decoder layer.

Two sources of conversations (``CalibrationSample``: prompt ids, response ids, image tiles):

- ``mmpr_samples``: chosen responses of a preference dataset (MMPR directory) with their images,
  so the LLM is calibrated on the image tokens it will see at inference (``use_images=False``
  drops the images and their placeholders: text-only calibration on the same conversations).
- ``generated_samples``: text-only, the model's own sampled answers to a fixed set of prompts,
  for when no dataset is at hand.

``calibration_inputs`` runs each conversation through the VLM front end (vision tower, projector,
token embeddings; image features scattered over the ``<IMG_CONTEXT>`` positions), concatenates
the sequences into one token stream, cuts it into rows of ``block_size`` tokens (as AutoAWQ cuts
its text stream: a row may hold the end of one conversation and the start of the next, which
attend to each other; statistics are per token, so this only changes their context) and captures
what the first decoder layer receives: hidden states [rows, block_size, D] plus the keyword
arguments (rotary position embeddings, mask, positions) that every layer is called with. Only the
front end and the rotary embedding need to sit on ``device``; the decoder layers stay where they
are, so a large model can keep them on the CPU and stream them through the GPU one at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpo.data.dataset import DataConfig, MMPRDataset, Rejected
from mpo.data.mmpr import read_record
from mpo.data.template import IMAGE_PLACEHOLDER, ChatTemplate, place_image_placeholders
from mpo.train.policy import image_features

__all__ = [
    "DEFAULT_PROMPTS",
    "CalibrationSample",
    "CalibrationSet",
    "LayerInputs",
    "mmpr_samples",
    "generated_samples",
    "sample_embeddings",
    "pack_rows",
    "capture_layer_inputs",
    "calibration_inputs",
]

# Seeds for text-only calibration on the model's own answers: varied tasks so the activations
# cover reasoning, code, lists, dialogue and description, not one register.
DEFAULT_PROMPTS = (
    "Explain step by step how photosynthesis turns light into chemical energy.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Solve and explain: a train leaves at 9:40 and arrives at 13:15. How long is the trip?",
    "Describe a busy street market in detail: sounds, colours, people.",
    "Write a Python function that returns the n-th Fibonacci number and explain it.",
    "What are the main causes of inflation? Answer with a numbered list.",
    "Summarize the plot of a famous novel you know well.",
    "Compare cats and dogs as pets in a short table.",
    "Give three tips for reading a chart or a scientific figure correctly.",
    "Translate into French and explain the grammar: 'I would have come if I had known.'",
    "How does a bar chart differ from a line chart? When should each be used?",
    "Describe what you would expect to see in a photo of a kitchen.",
    "Prove that the sum of two even numbers is even.",
    "Write a polite email asking a colleague to review a document.",
    "What is the capital of Australia, and why is it not Sydney?",
    "List the steps to change a flat bicycle tyre.",
)


@dataclass
class CalibrationSample:
    """One conversation: prompt ids (image placeholders expanded), response ids, image tiles."""

    prompt_ids: list[int]
    response_ids: list[int]
    pixel_values: torch.Tensor | None = None  # [tiles, 3, H, W] or None (text only)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass
class CalibrationSet:
    """Calibration conversations plus held-out ones (never used for calibration)."""

    samples: list[CalibrationSample]
    held_out: list[CalibrationSample]
    source: str  # "mmpr" | "mmpr_text" | "generated"
    rejects: dict[str, int] = field(default_factory=dict)  # reason -> count


@dataclass
class LayerInputs:
    """What every decoder layer is called with: ``layer(hidden_BTD, **kwargs)``."""

    hidden_BTD: torch.Tensor  # [rows, block, D] in the model's dtype
    kwargs: dict[str, Any]  # position_embeddings, attention_mask, position_ids, ...


def _check_counts(num_samples: int, num_held_out: int, max_response_tokens: int) -> None:
    problems = []
    if num_samples < 1:
        problems.append(f"num_samples={num_samples} must be >= 1")
    if num_held_out < 0:
        problems.append(f"num_held_out={num_held_out} must be >= 0")
    if max_response_tokens < 1:
        problems.append(f"max_response_tokens={max_response_tokens} must be >= 1")
    if problems:
        raise ValueError("invalid calibration settings: " + "; ".join(problems))


def _text_only_sample(dataset: MMPRDataset, index: int, template: ChatTemplate) -> CalibrationSample:
    """The record's conversation with its image placeholders removed and no tiles."""
    record = read_record(dataset.sources, dataset.refs[index])
    question = record.question.replace(IMAGE_PLACEHOLDER + "\n", "").replace(IMAGE_PLACEHOLDER, "")
    prompt = template.prompt_ids(place_image_placeholders(question, 0), [])
    return CalibrationSample(prompt, template.response_ids(record.chosen))


def mmpr_samples(data_dir: str | Path, template: ChatTemplate, *, num_samples: int, num_held_out: int = 0,
                 max_response_tokens: int = 512, max_dynamic_patch: int = 1, tile_size: int = 448,
                 use_images: bool = True, seed: int = 0) -> CalibrationSet:
    """Chosen conversations from an MMPR directory, drawn in a seeded random order.

    The first ``num_samples`` usable records calibrate, the next ``num_held_out`` are held out.
    Responses are cut to ``max_response_tokens`` tokens (their ``<|im_end|>`` included when it
    fits); prompts are kept whole. Records that fail to load (missing image, ...) are skipped
    and counted by reason. Fewer usable records than asked is fine; none is a ValueError.

    Args:
        data_dir: MMPR directory (meta.json + jsonl) or its meta.json.
        template: chat template of the model (tokenizer, tokens per tile, system prompt).
        num_samples, num_held_out: conversations to return in each part.
        max_response_tokens: response length cap, tokens.
        max_dynamic_patch: tile budget per image (meta.json may override per source).
        tile_size: tile side of the model's vision tower, pixels.
        use_images: False = text-only calibration on the same conversations.
        seed: order of the draw.
    """
    _check_counts(num_samples, num_held_out, max_response_tokens)
    config = DataConfig(max_length=1 << 30, max_dynamic_patch=max_dynamic_patch, tile_size=tile_size)
    dataset = MMPRDataset(data_dir, template, config, seed=seed)
    if len(dataset) == 0:
        raise ValueError(f"{data_dir}: no usable records (check it with python -m mpo.data.validate)")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    wanted = num_samples + num_held_out
    picked: list[CalibrationSample] = []
    rejects: dict[str, int] = {}
    for index in order:
        if len(picked) == wanted:
            break
        if use_images:
            item = dataset[index]
            if isinstance(item, Rejected):
                rejects[item.reason] = rejects.get(item.reason, 0) + 1
                continue
            sample = CalibrationSample(item.prompt_ids, item.chosen_ids, item.pixel_values)
        else:
            sample = _text_only_sample(dataset, index, template)
        sample.response_ids = sample.response_ids[:max_response_tokens]
        picked.append(sample)
    if not picked:
        raise ValueError(f"{data_dir}: every drawn record was rejected ({rejects}); check the data")
    split = min(num_samples, len(picked))
    return CalibrationSet(picked[:split], picked[split:], "mmpr" if use_images else "mmpr_text", rejects)


def generated_samples(model: nn.Module, processor, *, num_samples: int, num_held_out: int = 0,
                      max_new_tokens: int = 512, device: str | torch.device = "cpu",
                      system_prompt: str | None = None, samples_per_prompt: int = 16,
                      temperature: float = 1.0, seed: int = 0,
                      prompts: tuple[str, ...] = DEFAULT_PROMPTS) -> CalibrationSet:
    """Text-only conversations: the model's own sampled answers to ``prompts`` (cycled).

    The model is moved to ``device`` for generation and back to where it was afterwards. Each
    prompt is sampled ``samples_per_prompt`` times (one batched ``generate``). The last
    ``num_held_out`` conversations (from later prompts) are held out. Generation uses the engine's
    "hf" backend: the fast one repacks the q/k/v and gate/up weights, and this model is about to
    be quantized in place.
    """
    from mpo.infer.engine import Engine, Request, SamplingParams

    _check_counts(num_samples, num_held_out, max_new_tokens)
    if samples_per_prompt < 1 or not prompts:
        raise ValueError("generated calibration needs samples_per_prompt >= 1 and at least one prompt")
    wanted = num_samples + num_held_out
    num_prompts = -(-wanted // samples_per_prompt)
    requests = [Request(prompts[i % len(prompts)]) for i in range(num_prompts)]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                            num_samples=samples_per_prompt, seed=seed)
    home = next(model.parameters()).device
    model.to(device)
    try:
        engine = Engine(model, processor, device=torch.device(device), system_prompt=system_prompt, backend="hf")
        outputs = engine.generate(requests, params)
        samples = [
            CalibrationSample(engine.encode(request).input_ids, list(generation.token_ids))
            for request, generations in zip(requests, outputs) for generation in generations
        ][:wanted]
    finally:
        model.to(home)
    return CalibrationSet(samples[:num_samples], samples[num_samples:], "generated")


@torch.no_grad()
def sample_embeddings(model: nn.Module, sample: CalibrationSample, device: str | torch.device) -> torch.Tensor:
    """Input embeddings [T, D] of prompt + response, image features in place of image tokens.

    Needs the token embedding (and, for samples with tiles, the vision tower and projector) on
    ``device``; returns the embedding's dtype.
    """
    ids = torch.tensor(sample.prompt_ids + sample.response_ids, device=device)
    embeds_TD = model.model.get_input_embeddings()(ids)
    if sample.pixel_values is not None:
        feats = image_features(model, sample.pixel_values.to(device, embeds_TD.dtype)).to(embeds_TD.dtype)
        mask_T = ids == model.config.image_token_id
        if int(mask_T.sum()) != feats.shape[0]:
            raise ValueError(f"sample has {int(mask_T.sum())} image tokens but its tiles give "
                             f"{feats.shape[0]} features; was it encoded with this model's template?")
        embeds_TD = embeds_TD.masked_scatter(mask_T[:, None], feats)
    return embeds_TD


def pack_rows(embeds: list[torch.Tensor], block_size: int, max_total_tokens: int | None = None) -> torch.Tensor:
    """Concatenate sequences [T_i, D] and cut the stream into rows [R, L, D].

    L = min(block_size, tokens); the stream is first capped at ``max_total_tokens``; the tail
    that does not fill a row is dropped (at least one row is always kept).
    """
    if not embeds:
        raise ValueError("no calibration sequences to pack")
    if block_size < 1 or (max_total_tokens is not None and max_total_tokens < 1):
        raise ValueError(f"block_size={block_size} and max_total_tokens={max_total_tokens} must be >= 1")
    stream_ND = torch.cat(embeds, dim=0)
    if max_total_tokens is not None:
        stream_ND = stream_ND[:max_total_tokens]
    length = min(block_size, stream_ND.shape[0])
    rows = stream_ND.shape[0] // length
    return stream_ND[: rows * length].reshape(rows, length, stream_ND.shape[-1])


class _StopForward(Exception):
    """Raised by the capture hook so that no decoder layer actually runs."""


def capture_layer_inputs(model: nn.Module, hidden_BTD: torch.Tensor) -> LayerInputs:
    """Call the LLM on ``inputs_embeds=hidden_BTD`` and keep what its first decoder layer receives.

    The model builds the rotary position embeddings and the attention mask; a pre-hook records
    the first layer's arguments and stops the forward before any layer runs (so the layers may
    live on another device). Only the rotary embedding must be on ``hidden_BTD``'s device.
    """
    language_model = model.model.language_model
    layer_types = set(getattr(language_model.config, "layer_types", None) or ["full_attention"])
    if len(layer_types) > 1:
        raise ValueError(f"layers of different attention types {sorted(layer_types)} need different masks; "
                         "AWQ export supports models whose layers all use one type")
    captured: dict[str, Any] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured["args"], captured["kwargs"] = args, dict(kwargs)
        raise _StopForward

    handle = language_model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            language_model(inputs_embeds=hidden_BTD, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if "kwargs" not in captured:
        raise ValueError(f"{type(language_model).__name__} never called its first decoder layer")
    kwargs = captured["kwargs"]
    hidden = captured["args"][0] if captured["args"] else kwargs.pop("hidden_states")
    # No KV cache: each layer is replayed many times during the search.
    kwargs.pop("past_key_values", None)
    kwargs.pop("past_key_value", None)
    kwargs["use_cache"] = False
    return LayerInputs(hidden, kwargs)


def calibration_inputs(model: nn.Module, samples: list[CalibrationSample], *, block_size: int = 2048,
                       max_total_tokens: int | None = None,
                       device: str | torch.device = "cpu") -> tuple[LayerInputs, dict[str, int]]:
    """First-decoder-layer inputs for ``samples``, computed on ``device``.

    The front end (vision tower, projector, token embedding) and the rotary embedding are moved
    to ``device`` for the call; the vision tower and projector are moved back afterwards (the
    rotary embedding stays: every layer replay uses its outputs, which are captured already).

    Returns:
        ``(LayerInputs, stats)`` with stats ``{"num_samples", "num_tokens" (stream before
        packing), "num_rows", "block_size" (row length used), "num_image_tokens"}``.
    """
    if not samples:
        raise ValueError("no calibration samples")
    inner = model.model
    front = [inner.vision_tower, inner.multi_modal_projector, inner.get_input_embeddings(),
             inner.language_model.rotary_emb]
    homes = [next(m.parameters(), next(m.buffers(), None)).device for m in front]
    for module in front:
        module.to(device)
    try:
        embeds = [sample_embeddings(model, s, device) for s in samples]
        rows_BTD = pack_rows(embeds, block_size, max_total_tokens)
        del embeds
        inputs = capture_layer_inputs(model, rows_BTD)
    finally:
        for module, home in zip(front[:3], homes[:3]):
            module.to(home)
    image_token_id = model.config.image_token_id
    stats = {
        "num_samples": len(samples),
        "num_tokens": sum(s.num_tokens for s in samples),
        "num_rows": int(rows_BTD.shape[0]),
        "block_size": int(rows_BTD.shape[1]),
        "num_image_tokens": sum((s.prompt_ids + s.response_ids).count(image_token_id) for s in samples),
    }
    return inputs, stats
