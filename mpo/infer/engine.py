"""The generation engine used by the pair builder and evaluation: requests in, sampled answers out.

    engine = Engine.load("runs/tiny/final", device="cpu")
    outs = engine.generate([Request("<image>\\nHow many circles?", images=["a.png"])],
                           SamplingParams(max_new_tokens=64, temperature=0.7, num_samples=8, seed=0))
    outs[0][3].text, outs[0][3].token_ids, outs[0][3].logprobs

Prompts are rendered exactly as in training (`mpo.data.template.ChatTemplate`: InternVL2.5 chat format,
dynamic tiling, 256 image tokens per tile), so what the trainer learns is what the engine asks.
This module is the plain path: `transformers` generate with its KV cache, greedy or sampled (the
prompt is repeated for the n samples). Faster paths (a prefix shared by the n samples, a preallocated
KV cache, CUDA graphs, W4A16 kernels) plug in behind the same `Engine.generate` and are checked
against this one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from mpo.data.images import load_image_tiles, tile_budget, tile_image, tiles_to_tensor
from mpo.data.template import ChatTemplate, place_image_placeholders
from mpo.model.load import load_model, load_processor, read_checkpoint_config, resolve_dtype
from mpo.model.tokenizer import INTERNVL25_SYSTEM_PROMPT


@dataclass
class SamplingParams:
    """How to sample. temperature 0 = greedy (then num_samples copies are identical)."""

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    num_samples: int = 1
    seed: int = 0

    def __post_init__(self):
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.temperature < 0:
            problems.append(f"temperature={self.temperature} must be >= 0")
        if self.top_k < 0:
            problems.append(f"top_k={self.top_k} must be >= 0")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p} must be in (0, 1]")
        if self.num_samples < 1:
            problems.append(f"num_samples={self.num_samples} must be >= 1")
        if problems:
            raise ValueError("invalid sampling parameters: " + "; ".join(problems))


@dataclass
class Request:
    """One prompt: the user turn (with `<image>` placeholders or none), its images, and optionally
    the start of the assistant's answer (continued, not repeated, in the output)."""

    question: str
    images: list = field(default_factory=list)  # paths or PIL images
    assistant_prefix: str = ""
    max_dynamic_patch: int = 6


@dataclass
class Generation:
    text: str  # decoded new tokens, special tokens and the stop token removed
    token_ids: list[int]  # new tokens, stop token included when generation stopped on it
    logprobs: list[float]  # log-prob of each new token under the sampling distribution's model logits
    finished: bool  # stopped on <|im_end|> (False: hit max_new_tokens)


@dataclass
class EncodedPrompt:
    input_ids: list[int]
    pixel_values: torch.Tensor | None


class Engine:
    """Generation over a native InternVL checkpoint (plain `transformers` path)."""

    def __init__(self, model, processor, *, device: torch.device, system_prompt: str | None = INTERNVL25_SYSTEM_PROMPT):
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.device = device
        self.dtype = next(model.parameters()).dtype
        self.template = ChatTemplate(self.tokenizer, tokens_per_tile=model.config.image_seq_length,
                                     system_prompt=system_prompt)
        self.tile_size = model.config.vision_config.image_size[0]
        self.stop_id = self.template.im_end_id

    @classmethod
    def load(cls, model_dir: str | Path, *, device: str = "auto", dtype: str | None = None,
             system_prompt: str | None = INTERNVL25_SYSTEM_PROMPT) -> "Engine":
        """Load a native InternVL checkpoint. dtype defaults to bf16 on GPU, fp32 on CPU."""
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device=cuda but no CUDA device is visible")
        config = read_checkpoint_config(model_dir)
        if "quantization_config" in config:
            raise ValueError(f"{model_dir} is quantized ({config['quantization_config'].get('quant_method')}); "
                             "the plain engine path loads 16/32-bit checkpoints only")
        torch_dtype = resolve_dtype(dtype) if dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
        model = load_model(model_dir, dtype=torch_dtype, device=device)
        return cls(model, load_processor(model_dir), device=torch.device(device), system_prompt=system_prompt)

    def encode(self, request: Request) -> EncodedPrompt:
        """Token ids of the prompt (+ assistant prefix) and the tiles of its images."""
        tiles_per_image, pixels = [], []
        budget = tile_budget(request.max_dynamic_patch, len(request.images))
        for image in request.images:
            if isinstance(image, Image.Image):
                tiles = tile_image(image.convert("RGB"), max_num=budget, tile_size=self.tile_size)
                part, count = tiles_to_tensor(tiles), len(tiles)
            else:
                visual = load_image_tiles(Path(image), max_num=budget, tile_size=self.tile_size)
                part, count = visual.pixel_values, visual.tiles_per_part[0]
            pixels.append(part)
            tiles_per_image.append(count)
        question = place_image_placeholders(request.question, len(request.images))
        ids = self.template.prompt_ids(question, tiles_per_image)
        if request.assistant_prefix:
            ids += self.template._text_ids(request.assistant_prefix)
        return EncodedPrompt(ids, torch.cat(pixels) if pixels else None)

    @torch.no_grad()
    def generate(self, requests: list[Request], params: SamplingParams) -> list[list[Generation]]:
        """`params.num_samples` generations per request, in request order."""
        torch.manual_seed(params.seed)
        return [self._generate_one(self.encode(r), params) for r in requests]

    def _generate_one(self, prompt: EncodedPrompt, params: SamplingParams) -> list[Generation]:
        input_ids = torch.tensor([prompt.input_ids], device=self.device)
        kwargs = {}
        if prompt.pixel_values is not None:
            kwargs["pixel_values"] = prompt.pixel_values.to(self.device, self.dtype)
        greedy = params.temperature == 0
        sample_kwargs = {} if greedy else dict(temperature=params.temperature, top_k=params.top_k or None,
                                                top_p=params.top_p)
        out = self.model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs,
            max_new_tokens=params.max_new_tokens, do_sample=not greedy, num_return_sequences=params.num_samples,
            eos_token_id=self.stop_id, pad_token_id=self.template.pad_id, output_scores=True,
            return_dict_in_generate=True, **sample_kwargs,
        )
        new = out.sequences[:, input_ids.shape[1]:]
        # log-probs of the chosen tokens under the (processed) scores the sampler used
        scores = torch.stack(out.scores, dim=1).float().log_softmax(-1)  # [n, new, V]
        chosen = scores.gather(2, new.unsqueeze(-1)).squeeze(-1)
        results = []
        for row, lp in zip(new.tolist(), chosen.tolist()):
            if self.stop_id in row:
                cut = row.index(self.stop_id) + 1
                row, lp, finished = row[:cut], lp[:cut], True
            else:
                while row and row[-1] == self.template.pad_id:
                    row, lp = row[:-1], lp[:-1]
                finished = False
            text_ids = row[:-1] if finished else row
            results.append(Generation(self.tokenizer.decode(text_ids, skip_special_tokens=True), row, lp, finished))
        return results
