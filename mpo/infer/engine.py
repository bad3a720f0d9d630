"""The generation engine used by the pair builder and evaluation: requests in, sampled answers out.

    engine = Engine.load("runs/tiny/final", device="cpu")
    outs = engine.generate([Request("<image>\\nHow many circles?", images=["a.png"])],
                           SamplingParams(max_new_tokens=64, temperature=0.7, num_samples=8, seed=0))
    outs[0][3].text, outs[0][3].token_ids, outs[0][3].logprobs

Prompts are rendered exactly as in training (`mpo.data.template.ChatTemplate`: InternVL2.5 chat format,
dynamic tiling, 256 image tokens per tile), so what the trainer learns is what the engine asks.

Two backends behind the same `Engine.generate` (`Engine.load(..., backend=...)`):

- "fast" (default, `mpo.infer.fast`): one prefill per prompt shared by its n samples, a preallocated
  KV cache, batched decode across prompts with finished rows refilled, CUDA graphs and fused
  kernels on GPU (W4A16 for AWQ checkpoints). On CPU its greedy tokens equal the "hf" backend's.
- "hf": `transformers` generate with its dynamic cache (the prompt repeated for the n samples): the
  reference twin the fast path is checked against.

Sampling (temperature, top-k, top-p) is seeded: the fast backend draws sample j of request i from
a random stream keyed by (seed, i, j), so results do not depend on batching; the hf backend seeds
torch's global generator once per call. A `Request.seed` replaces (seed, i) by (its seed, 0): the
request then gets the samples it would get alone in a call seeded with it, whichever requests it is
batched with (the hf backend reseeds before it). Log-probs are those of each chosen token under the
distribution it was drawn from (softmax of logits / T, top-k / top-p filtered and renormalised;
greedy: the model's own softmax), i.e. the model's log-probs at temperature 1 without filters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from mpo.data.images import load_image_tiles, tile_budget, tile_image, tiles_to_tensor
from mpo.data.template import ChatTemplate, place_image_placeholders
from mpo.infer.fast import FastGenerator, GenerationStats
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
    # Own sampling seed: this request's samples are then those it would get alone in a call with
    # SamplingParams.seed = seed, whichever requests share the call (the pair builder batches questions).
    seed: int | None = None


@dataclass
class Generation:
    text: str  # decoded new tokens, special tokens and the stop token removed
    token_ids: list[int]  # new tokens, stop token included when generation stopped on it
    logprobs: list[float]  # log-prob of each new token under the distribution it was drawn from (see above)
    finished: bool  # stopped on <|im_end|> (False: hit max_new_tokens)


@dataclass
class EncodedPrompt:
    input_ids: list[int]
    pixel_values: torch.Tensor | None
    seed: int | None = None  # Request.seed


BACKENDS = ("fast", "hf")


class Engine:
    """Generation over a native or AWQ InternVL checkpoint.

    Args:
        model, processor: a loaded InternVL model and its processor (see `Engine.load`).
        device: where the model lives.
        system_prompt: system turn of every prompt (None or "" leaves it out).
        backend: "fast" or "hf" (see the module docstring).
        max_batch_rows: fast backend: most samples decoded at once.
    """

    def __init__(self, model, processor, *, device: torch.device, system_prompt: str | None = INTERNVL25_SYSTEM_PROMPT,
                 backend: str = "fast", max_batch_rows: int = 64):
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}; choose one of {BACKENDS}")
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.device = device
        self.dtype = next(model.parameters()).dtype
        self.template = ChatTemplate(self.tokenizer, tokens_per_tile=model.config.image_seq_length,
                                     system_prompt=system_prompt)
        self.tile_size = model.config.vision_config.image_size[0]
        self.stop_id = self.template.im_end_id
        self.backend = backend
        self.generator = FastGenerator(model, stop_id=self.stop_id, max_batch_rows=max_batch_rows) \
            if backend == "fast" else None

    @property
    def stats(self) -> GenerationStats | None:
        """Fast backend counters (prefills, decode steps, graph captures); None for "hf"."""
        return None if self.generator is None else self.generator.stats

    @classmethod
    def load(cls, model_dir: str | Path, *, device: str = "auto", dtype: str | None = None,
             system_prompt: str | None = INTERNVL25_SYSTEM_PROMPT, backend: str = "fast",
             max_batch_rows: int = 64) -> "Engine":
        """Load a native or AWQ InternVL checkpoint. dtype defaults to bf16 on GPU, fp32 on CPU;
        backend is "fast" (default) or "hf" (the `transformers` generate twin); max_batch_rows: the
        fast backend's most samples decoded at once (KV cache memory grows with it)."""
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}; choose one of {BACKENDS}")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device=cuda but no CUDA device is visible")
        config = read_checkpoint_config(model_dir)
        quant = config.get("quantization_config")
        if quant is not None and quant.get("quant_method") != "awq":
            raise ValueError(f"{model_dir} is quantized ({quant.get('quant_method')}); "
                             "the engine loads 16/32-bit and AWQ (mpo.export_awq) checkpoints only")
        torch_dtype = resolve_dtype(dtype) if dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
        if quant is not None:
            from mpo.quant.awq_linear import load_awq_model  # decoder linears become W4A16 WQLinear

            model = load_awq_model(model_dir, device=device, dtype=torch_dtype)
        else:
            model = load_model(model_dir, dtype=torch_dtype, device=device)
        return cls(model, load_processor(model_dir), device=torch.device(device), system_prompt=system_prompt,
                   backend=backend, max_batch_rows=max_batch_rows)

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
        return EncodedPrompt(ids, torch.cat(pixels) if pixels else None, request.seed)

    @torch.no_grad()
    def generate(self, requests: list[Request], params: SamplingParams) -> list[list[Generation]]:
        """`params.num_samples` generations per request, in request order.

        The fast backend encodes every request first (pixel tiles are held until the call ends:
        ~2.4 MB per 448-px tile in fp32), so pass requests in chunks of a few hundred.
        """
        if self.generator is None:
            torch.manual_seed(params.seed)
            out = []
            for r in requests:
                if r.seed is not None:  # as if alone in a call seeded with it
                    torch.manual_seed(r.seed)
                out.append(self._generate_hf(self.encode(r), params))
            return out
        prompts = [self.encode(r) for r in requests]
        raw = self.generator.generate(prompts, params)
        return [[self._to_generation(g.token_ids, g.logprobs, g.finished) for g in samples] for samples in raw]

    def _to_generation(self, token_ids: list[int], logprobs: list[float], finished: bool) -> Generation:
        text_ids = token_ids[:-1] if finished else token_ids
        return Generation(self.tokenizer.decode(text_ids, skip_special_tokens=True), token_ids, logprobs, finished)

    def _generate_hf(self, prompt: EncodedPrompt, params: SamplingParams) -> list[Generation]:
        input_ids = torch.tensor([prompt.input_ids], device=self.device)
        kwargs = {}
        if prompt.pixel_values is not None:
            kwargs["pixel_values"] = prompt.pixel_values.to(self.device, self.dtype)
        greedy = params.temperature == 0
        # top_k=0 is passed as 0 (off), not None, which would fall back to generation_config's default.
        sample_kwargs = {} if greedy else dict(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)
        # Greedy samples are identical: generate one (transformers refuses num_return_sequences > 1
        # without sampling) and repeat it.
        out = self.model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs,
            max_new_tokens=params.max_new_tokens, do_sample=not greedy,
            num_return_sequences=1 if greedy else params.num_samples,
            eos_token_id=self.stop_id, pad_token_id=self.template.pad_id, output_scores=True,
            return_dict_in_generate=True, **sample_kwargs,
        )
        new = out.sequences[:, input_ids.shape[1]:]
        # log-probs of the chosen tokens under the (processed) scores the sampler used
        scores = torch.stack(out.scores, dim=1).float().log_softmax(-1)  # [n, new, V]
        chosen = scores.gather(2, new.unsqueeze(-1)).squeeze(-1)
        results = []
        for row, lp in zip(new.tolist(), chosen.tolist()):
            # Only rows that stopped are padded by generate (after their stop token); a row that ran
            # to max_new_tokens is all real tokens, even ones equal to the pad id.
            finished = self.stop_id in row
            if finished:
                cut = row.index(self.stop_id) + 1
                row, lp = row[:cut], lp[:cut]
            results.append(self._to_generation(row, lp, finished))
        if greedy:
            results = [Generation(results[0].text, list(results[0].token_ids), list(results[0].logprobs),
                                  results[0].finished) for _ in range(params.num_samples)]
        return results
