"""Build MMPR preference pairs from questions with the model itself (REFERENCE.md §3-4).

    python -m mpo.build_pairs model=CKPT questions=synth/questions/build.jsonl image_root=synth output_dir=pairs
    python -m mpo.build_pairs ... samples_per_question=8 dropout_ntp.share=0.2 +match_modes.chartqa=relaxed
    # SLURM array (one shard per task, merged once all are done):
    sbatch --array=0-7 --wrap "python -m mpo.build_pairs model=CKPT questions=Q output_dir=OUT stage=sample"
    python -m mpo.build_pairs output_dir=OUT stage=merge
    # one process per GPU: torchrun --nproc_per_node 8 -m mpo.build_pairs ... stage=sample

Questions with a ground-truth answer get K chain-of-thought samples, paired by correctness and
format; questions without one get Dropout-NTP pairs. Each shard appends its finished questions to
``OUT/shards/`` (a rerun resumes), and the merge writes ``OUT/meta.json`` + one jsonl per source
and kind, ``stats.json``, ``hard_questions.jsonl`` and ``rejects.jsonl``: a directory the trainer
reads as ``data.path=OUT``. The config schema is :class:`BuildConfig` (``configs/build_pairs.yaml``).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from data_pipeline.answers import MATCH_MODES
from data_pipeline.prompts import PROMPT_STYLES

STAGES = ("all", "sample", "merge")
_DTYPES = ("auto", "bfloat16", "float16", "float32", "bf16", "fp16", "fp32")


@dataclass
class DropoutNTPSection:
    ratio: float = 0.5  # share of the chosen answer's words given as the blind prefix
    share: float = 0.0  # share of ground-truth questions (seeded by id) sent through Dropout-NTP instead
    prompt: str = "auto"  # auto (CoT prompt for withheld answers, the plain question otherwise) | plain | cot


@dataclass
class ShardSection:
    index: int | None = None  # None: from SLURM_ARRAY_TASK_* and/or torchrun RANK, else 0
    count: int | None = None


@dataclass
class BuildConfig:
    """Settings of one pair-building run; every problem is reported at once as a ValueError."""

    # native InternVL checkpoint directory (not needed for stage=merge); on the command line `model=DIR`
    model_dir: str | None = None
    questions: str | None = None  # jsonl / parquet / saved datasets dir (not needed for stage=merge)
    output_dir: str = ""  # the MMPR directory to write
    image_root: str | None = None  # image paths are relative to it; default: the directory holding `questions`
    samples_per_question: int = 32  # K responses per ground-truth question
    pairs_per_question: int = 15  # N pairs kept per question and kind
    temperature: float = 1.0
    top_k: int = 50  # 0 = off
    top_p: float = 1.0
    max_new_tokens: int = 1024
    max_dynamic_patch: int = 6  # tile budget per question (split across its images)
    questions_per_call: int = 16  # ground-truth questions sampled together (same samples as one at a time)
    max_batch_rows: int = 64  # most samples the engine decodes at once (KV cache memory grows with it)
    prompt_style: str = "final_answer"  # final_answer | boxed
    match_modes: dict[str, str] = field(default_factory=dict)  # source -> matching mode (records may override)
    source_max_dynamic_patch: dict[str, int] = field(default_factory=dict)  # source -> tile budget
    source_pairs_per_question: dict[str, int] = field(default_factory=dict)  # source -> N (e.g. 3 for huge sources)
    dropout_ntp: DropoutNTPSection = field(default_factory=DropoutNTPSection)
    seed: int = 0  # per-question seeds derive from (seed, question id)
    device: str = "auto"  # auto (cuda:LOCAL_RANK when a GPU is visible, else cpu) | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bfloat16 | float16 | float32
    system_prompt: str = "default"  # default (InternVL2.5's) | "" (none) | the text
    shard: ShardSection = field(default_factory=ShardSection)
    stage: str = "all"  # all (sample, then merge when there is one shard) | sample | merge
    strict: bool = False  # fail on the first bad input record instead of counting it
    progress: bool = True  # progress bar with samples/s on stderr
    stop_after_questions: int = -1  # stop after this many new questions, as if killed (trial runs, tests)

    def __post_init__(self):
        d = self.dropout_ntp
        checks = [
            (bool(self.output_dir), "output_dir is required"),
            (self.stage in STAGES, f"stage={self.stage!r}: use one of {', '.join(STAGES)}"),
            (self.stage == "merge" or bool(self.model_dir and self.questions),
             "model= and questions= are required to sample"),
            (self.samples_per_question >= 1, f"samples_per_question={self.samples_per_question} must be >= 1"),
            (self.pairs_per_question >= 1, f"pairs_per_question={self.pairs_per_question} must be >= 1"),
            (self.temperature >= 0, f"temperature={self.temperature} must be >= 0"),
            (self.top_k >= 0, f"top_k={self.top_k} must be >= 0 (0 = off)"),
            (0 < self.top_p <= 1, f"top_p={self.top_p} must be in (0, 1]"),
            (self.max_new_tokens >= 1, f"max_new_tokens={self.max_new_tokens} must be >= 1"),
            (self.max_dynamic_patch >= 1, f"max_dynamic_patch={self.max_dynamic_patch} must be >= 1"),
            (self.questions_per_call >= 1, f"questions_per_call={self.questions_per_call} must be >= 1"),
            (self.max_batch_rows >= 1, f"max_batch_rows={self.max_batch_rows} must be >= 1"),
            (all(v >= 1 for v in self.source_max_dynamic_patch.values()),
             "source_max_dynamic_patch values must be >= 1"),
            (all(v >= 1 for v in self.source_pairs_per_question.values()),
             "source_pairs_per_question values must be >= 1"),
            (self.prompt_style in PROMPT_STYLES,
             f"prompt_style={self.prompt_style!r}: use one of {', '.join(PROMPT_STYLES)}"),
            (all(m in MATCH_MODES for m in self.match_modes.values()),
             f"match_modes={dict(self.match_modes)}: each mode must be one of {', '.join(MATCH_MODES)}"),
            (0 < d.ratio < 1, f"dropout_ntp.ratio={d.ratio} must be in (0, 1)"),
            (0 <= d.share <= 1, f"dropout_ntp.share={d.share} must be in [0, 1]"),
            (d.prompt in ("auto", "plain", "cot"), f"dropout_ntp.prompt={d.prompt!r}: use auto, plain or cot"),
            (self.dtype in _DTYPES, f"dtype={self.dtype!r}: use one of {', '.join(_DTYPES)}"),
        ]
        problems = [msg for ok, msg in checks if not ok]
        if problems:
            raise ValueError("invalid build_pairs config:\n  - " + "\n  - ".join(problems))


ConfigStore.instance().store(name="build_pairs_schema", node=BuildConfig)


def to_build_config(cfg: DictConfig) -> BuildConfig:
    """The validated dataclass of a composed config."""
    obj = OmegaConf.to_object(cfg)
    if not isinstance(obj, BuildConfig):  # composed without the schema
        obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(BuildConfig), cfg))
    return obj


def _report(result, cfg: BuildConfig) -> None:
    shard = result.shard
    if shard is not None:
        print(f"shard {shard.index}/{shard.count}: {shard.num_done} questions sampled this run, "
              f"{shard.num_resumed} already done, of {shard.num_assigned}; {shard.num_samples} samples in "
              f"{shard.seconds:.1f} s ({shard.samples_per_second:.2f} samples/s) -> {shard.path}")
        if shard.stopped_early:
            print(f"stopped after {shard.num_done} questions (stop_after_questions); rerun to resume")
        elif result.merge is None and cfg.stage == "all":
            print(f"when every shard is done, merge: python -m mpo.build_pairs output_dir={cfg.output_dir} stage=merge")
    if result.merge is not None:
        total = result.merge.stats["total"]
        for name, count in result.merge.files.items():
            print(f"  {name}: {count} pairs")
        rate = total["ground_truth"]["positive_rate"]
        print(f"merged {total['questions']} questions, {total['samples']} samples "
              f"(positive rate {'n/a' if rate is None else f'{rate:.3f}'}), {sum(total['pairs'].values())} pairs, "
              f"{sum(total['rejects'].values())} rejects, {total['hard_questions']} hard questions -> "
              f"{result.out_dir / 'meta.json'}")
        if not result.merge.files:
            print("warning: no pair was produced; see stats.json (a model that never answers in the expected "
                  "format gives no pairs)", file=sys.stderr)


@hydra.main(config_path=str(Path(__file__).resolve().parents[1] / "configs"), config_name="build_pairs",
            version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        build = to_build_config(cfg)
        from data_pipeline.driver import build_pairs  # after validation: a typo fails before torch is imported

        _report(build_pairs(build), build)
    except ValueError as err:  # user errors (config, data, merge state): a message, not a traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def _model_alias(arg: str) -> str:
    """``model=DIR`` -> ``model_dir=DIR``.

    The repo's configs directory has a ``model/`` config group (training), so Hydra would read a
    top-level ``model=`` override as a group choice and refuse it; the field is ``model_dir`` and
    the documented spelling ``model=DIR`` is translated here.
    """
    match = re.fullmatch(r"(\+{0,2})model=(.*)", arg, flags=re.DOTALL)
    return f"model_dir={match.group(2)}" if match else arg


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m mpo.build_pairs`` and ``mpo build-pairs`` (Hydra overrides as arguments)."""
    args = sys.argv[1:] if argv is None else argv
    sys.argv = [sys.argv[0], *(_model_alias(a) for a in args)]
    _hydra_main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
