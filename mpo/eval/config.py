"""What one evaluation run does: :class:`EvalConfig`, the schema behind configs/evaluate.yaml, validated
when built (every problem listed in one ValueError)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from mpo.eval.benchmarks import BENCHMARKS, CUSTOM_PREFIX, get_benchmark
from mpo.eval.naming import name_models

__all__ = ["COT_MAX_NEW_TOKENS", "DIRECT_MAX_NEW_TOKENS", "EvalConfig", "given", "resolve_system_prompt"]

COT_MAX_NEW_TOKENS = 1024  # room for step-by-step reasoning before "Final answer:"
DIRECT_MAX_NEW_TOKENS = 64  # a letter, a word or a short phrase
_DTYPES = ("bfloat16", "float16", "float32", "bf16", "fp16", "fp32")
_DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d+)?")


@dataclass
class EvalConfig:
    """One evaluation run (the schema behind configs/evaluate.yaml)."""

    model: Any = None  # checkpoint dir (bf16 or AWQ), a list of dirs, or {name: dir}
    benchmarks: list[str] = field(default_factory=lambda: list(BENCHMARKS))  # names or custom:PATH.jsonl
    data_root: str | None = None  # folder of VLMEvalKit TSVs; None = $LMUData, else ~/LMUData
    output_dir: str = "outputs/eval"
    predictions: Any = None  # score only: a jsonl (one benchmark), a dir of {benchmark}.jsonl, a list, or {name: path}
    cot: bool = False  # MPO chain-of-thought prompt; answers parsed after "Final answer:"
    max_new_tokens: int | None = None  # None = 1024 with cot, 64 without
    batch_size: int = 8  # requests per Engine.generate call (also how often predictions are flushed)
    max_batch_rows: int = 64  # most answers the engine decodes at once (KV cache memory grows with it)
    limit: int | None = None  # first N items of each benchmark (smoke runs)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str | None = None  # None = engine default (bf16 on GPU, fp32 on CPU)
    system_prompt: str = "default"  # "default" = InternVL2.5's; "" = no system turn; else the text
    max_tiles: int | None = None  # None = each benchmark's default (6; 12 MMMU; 24 OCRBench)
    progress: bool = True  # tqdm bar with questions/s
    samples: int = 0  # K >= 2: also sample K answers per question (custom benchmarks): mean@K, maj@K, pass@K
    sample_temperature: float = 0.7  # temperature of those samples
    sample_seed: int = 0  # seed of those samples (each question's own stream: batching and resume keep them)
    sample_models: list[str] | None = None  # names (as in the report) of the models that sample; None = all

    def __post_init__(self):
        problems = []
        has_model, has_predictions = given(self.model), given(self.predictions)
        if has_model and has_predictions:
            problems.append("set either model= (generate and score) or predictions= (score existing files), not both")
        elif isinstance(self.model, (list, tuple, dict)) and not self.model:
            problems.append("model is an empty list: give at least one checkpoint dir, e.g. model=DIR or "
                            "model=[DIR1,DIR2]")
        elif not has_model and not has_predictions:
            problems.append("nothing to evaluate: set model=DIR (or model=[DIR1,DIR2]) to generate predictions, "
                            "or predictions=FILE.jsonl to score existing ones")
        for key in ("model", "predictions"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, (str, list, tuple, dict)):
                problems.append(f"{key} must be a path, a list of paths or a {{name: path}} mapping, got {value!r}")
            elif isinstance(value, (list, tuple, dict)) and value and not all(
                    isinstance(v, str) and v for v in (value.values() if isinstance(value, dict) else value)):
                problems.append(f"{key} entries must be non-empty paths, got {value!r}")
        self.benchmarks = [str(b) for b in ([self.benchmarks] if isinstance(self.benchmarks, str)
                                            else self.benchmarks or [])]
        if not self.benchmarks:
            problems.append(f"benchmarks is empty: pick from {sorted(BENCHMARKS)} or custom:PATH.jsonl")
        for name in self.benchmarks:
            try:
                get_benchmark(str(name))
            except ValueError as error:
                problems.append(str(error))
        duplicates = sorted({b for b in self.benchmarks if self.benchmarks.count(b) > 1})
        if duplicates:
            problems.append(f"benchmarks lists {duplicates} more than once")
        for key in ("max_new_tokens", "limit", "max_tiles"):
            value = getattr(self, key)
            if value is not None and value < 1:
                problems.append(f"{key}={value} must be >= 1 (or null for the default)")
        if self.batch_size < 1:
            problems.append(f"batch_size={self.batch_size} must be >= 1")
        if self.max_batch_rows < 1:
            problems.append(f"max_batch_rows={self.max_batch_rows} must be >= 1")
        if not _DEVICE_RE.fullmatch(self.device):
            problems.append(f"device={self.device!r}: use auto, cpu, cuda or cuda:N")
        if self.dtype is not None and self.dtype not in _DTYPES:
            problems.append(f"dtype={self.dtype!r}: use one of {_DTYPES} (or null for the engine default)")
        problems += self._sampling_problems(has_model)
        if problems:
            raise ValueError("invalid evaluation config:\n  - " + "\n  - ".join(problems))

    def _sampling_problems(self, has_model: bool) -> list[str]:
        if self.samples == 0:
            return []
        problems = []
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 2:
            problems.append(f"samples={self.samples!r} must be 0 (off) or an integer >= 2 (majority voting needs K >= 2)")
        if not self.sample_temperature > 0:
            problems.append(f"sample_temperature={self.sample_temperature} must be > 0: greedy samples are all equal")
        if not has_model:
            problems.append("samples= needs model= (it samples new answers); scoring saved files cannot")
        elif self.sample_models is not None:
            try:
                names = set(name_models(self.model))
            except ValueError:
                return problems  # the model names themselves are wrong: reported above
            unknown = [name for name in self.sample_models if name not in names]
            if unknown or not self.sample_models:
                problems.append(f"sample_models={list(self.sample_models)} must name some of the models {sorted(names)}")
        not_custom = [name for name in self.benchmarks if not name.startswith(CUSTOM_PREFIX)]
        if not_custom:
            problems.append(f"samples= supports custom benchmarks (custom:PATH.jsonl) only, not {not_custom}: "
                            "their questions are scored one by one, so votes can be scored the same way")
        return problems

    @property
    def new_tokens(self) -> int:
        """max_new_tokens with its cot-dependent default applied."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        return COT_MAX_NEW_TOKENS if self.cot else DIRECT_MAX_NEW_TOKENS


def given(value) -> bool:
    """Whether a model= / predictions= setting was given (not None, "" or an empty collection)."""
    return value is not None and value != "" and not (isinstance(value, (list, tuple, dict)) and not value)


def resolve_system_prompt(setting: str) -> str | None:
    """"default" → InternVL2.5's system prompt; "" → None (no system turn); anything else as written."""
    if setting == "default":
        from mpo.model.tokenizer import INTERNVL25_SYSTEM_PROMPT

        return INTERNVL25_SYSTEM_PROMPT
    return setting or None
