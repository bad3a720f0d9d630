"""The pair builder's sampling loop: sharded, resumable, ``questions_per_call`` questions per engine call.

    from mpo.build_pairs import BuildConfig
    cfg = BuildConfig(model_dir="ckpt", questions="synth/questions/build.jsonl", image_root="synth",
                      output_dir="out", samples_per_question=32)
    build_pairs(cfg)            # sample this shard, then merge when it is the only one

Every question is owned by one shard (stable hash of its id), sampled with its own seed derived from
(seed, id) whichever questions share its engine call, and written as one line to its shard file as
soon as its call is done. Results therefore depend neither on sharding, order nor batching, a killed
run resumes where it stopped, and the merge of two shards equals a one-shard run. Ground-truth
questions go through chain-of-thought sampling and correctness/format pairing (REFERENCE.md §4);
questions without an answer (and a seeded share of those with one, ``dropout_ntp.share``) go
through Dropout-NTP.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from data_pipeline.build_settings import (
    CONFIG_FILE,
    check_or_store_settings,
    load_settings,
    run_settings,
    settings_fingerprint,
)
from data_pipeline.dropout_ntp import DropoutNTPJob, build_dropout_ntp_pairs
from data_pipeline.pairs import classify_responses, make_format_pairs, make_pairs, question_outcome
from data_pipeline.prompts import build_cot_prompt
from data_pipeline.sources import Question, QuestionSet, read_questions
from data_pipeline.writer import MergeSummary, ShardWriter, finished_ids, merge_shards, shard_path
from mpo.data.images import MediaError, resolve_media_path
from mpo.infer.engine import Request, SamplingParams

if TYPE_CHECKING:  # the schema lives with the CLI; this module only reads its fields
    from mpo.build_pairs import BuildConfig

__all__ = [
    "BuildResult", "ShardSummary", "build_pairs", "question_seed", "resolve_shard", "sample_shard",
    "settings_fingerprint", "shard_of", "uses_dropout_ntp",
]

# ---------------------------------------------------------------- seeds and shards

def _stable_hash(text: str) -> int:
    """64-bit hash that is the same in every process (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def shard_of(question_id: str, count: int) -> int:
    """The shard that owns a question: stable hash of its id modulo ``count``."""
    return _stable_hash(question_id) % count


def question_seed(seed: int, question_id: str, purpose: str = "sample") -> int:
    """Sampling seed of one question (31 bits), from the run seed and the id only, never the order."""
    return _stable_hash(f"{seed}:{purpose}:{question_id}") % 2**31


def uses_dropout_ntp(question: Question, seed: int, share: float) -> bool:
    """True for questions without ground truth, and for the seeded ``share`` of those with one."""
    if question.answer is None:
        return True
    return _stable_hash(f"{seed}:dropout_ntp:{question.id}") / 2**64 < share


def resolve_shard(index: int | None, count: int | None, env: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """(index, count) of this process's shard.

    Explicit values win. Otherwise SLURM array tasks (SLURM_ARRAY_TASK_ID minus
    SLURM_ARRAY_TASK_MIN, over SLURM_ARRAY_TASK_STEP, of SLURM_ARRAY_TASK_COUNT) and torchrun
    ranks (RANK of WORLD_SIZE) each split the work; under both, every rank of every array task
    gets its own shard (index = task * WORLD_SIZE + RANK). Neither: (0, 1).
    """
    if (index is None) != (count is None):
        raise ValueError("set both shard.index and shard.count, or neither (they default from SLURM / torchrun)")
    if index is None:
        index, count = 0, 1
        if "SLURM_ARRAY_TASK_COUNT" in env and "SLURM_ARRAY_TASK_ID" in env:
            step = int(env.get("SLURM_ARRAY_TASK_STEP", "1")) or 1
            index = (int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0"))) // step
            count = int(env["SLURM_ARRAY_TASK_COUNT"])
        if "WORLD_SIZE" in env and "RANK" in env:
            world = int(env["WORLD_SIZE"])
            index, count = index * world + int(env["RANK"]), count * world
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard.index={index} must be in [0, shard.count={count})")
    return index, count


# ---------------------------------------------------------------- one question

def _image_field(question: Question) -> dict:
    if not question.images:
        return {}
    return {"image": question.images[0] if len(question.images) == 1 else list(question.images)}


def _plain_prompt(question: Question) -> str:
    body = question.question.strip()
    if question.options:
        body += "\n" + "\n".join(f"{chr(ord('A') + i)}. {text.strip()}" for i, text in enumerate(question.options))
    return body


class _Sampler:
    """Turns questions into their shard lines (pairs, counts, hard-question record)."""

    def __init__(self, cfg: BuildConfig, engine, image_root: Path, fingerprint: str):
        self.cfg, self.engine, self.image_root, self.fingerprint = cfg, engine, image_root, fingerprint

    def params(self, question: Question, num_samples: int, purpose: str = "sample") -> SamplingParams:
        c = self.cfg
        return SamplingParams(max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_k=c.top_k,
                              top_p=c.top_p, num_samples=num_samples, seed=question_seed(c.seed, question.id, purpose))

    def __call__(self, question: Question) -> dict:
        return self.lines([question])[0]

    def lines(self, questions: list[Question]) -> list[dict]:
        """Shard lines of ``questions``, in order. Their ground-truth samples come from one generate
        call, their Dropout-NTP answers from two (each question seeded by its id, so its samples are
        those of a call of its own, up to the rounding noted in ``mpo.infer.fast``)."""
        lines, batch, blind = [], [], []
        for question in questions:
            line = {"id": question.id, "source": question.source, "line": question.line, "cfg": self.fingerprint,
                    "num_samples": 0, "num_tokens": 0, "counts": {}, "pairs": {}, "hard": None, "reject": None}
            mdp = self.cfg.source_max_dynamic_patch.get(question.source, self.cfg.max_dynamic_patch)
            try:
                images = [str(resolve_media_path(self.image_root, rel)) for rel in question.images]
                if uses_dropout_ntp(question, self.cfg.seed, self.cfg.dropout_ntp.share):
                    blind.append((line, question, images, mdp))
                else:
                    batch.append((line, question, images, mdp))
            except MediaError as err:  # an unreadable image is the record's fault: count it, go on
                _reject(line, err)
            lines.append(line)
        for run, items in ((self._sample_together, batch), (self._dropout_ntp_together, blind)):
            try:
                run(items)
            except MediaError as err:
                if len(items) == 1:
                    _reject(items[0][0], err)
                    continue
                for item in items:  # one unreadable image fails the whole call: alone, it rejects its own line only
                    try:
                        run([item])
                    except MediaError as alone_err:
                        _reject(item[0], alone_err)
        return lines

    def _sample_together(self, batch: list[tuple[dict, Question, list[str], int]]) -> None:
        """Sample the ground-truth questions of ``batch`` in one call and fill their lines (nothing
        is filled when an image cannot be read: MediaError)."""
        if not batch:
            return
        c = self.cfg
        prompts = [build_cot_prompt(q.question, style=c.prompt_style, options=q.options) for _, q, _, _ in batch]
        requests = [Request(prompt, images=images, max_dynamic_patch=mdp, seed=question_seed(c.seed, q.id))
                    for prompt, (_, q, images, mdp) in zip(prompts, batch)]
        # Each request carries its own seed: the params' seed (the first question's) is not used.
        gens = self.engine.generate(requests, self.params(batch[0][1], c.samples_per_question))
        for prompt, samples, (line, q, _, _) in zip(prompts, gens, batch):
            line.update(self._ground_truth(q, prompt, samples))

    def _ground_truth(self, q: Question, prompt: str, gens: list) -> dict:
        c = self.cfg
        mode = q.match_mode or c.match_modes.get(q.source, "auto")
        answer = list(q.answer) if isinstance(q.answer, tuple) else q.answer
        classified = classify_responses([g.text.strip() for g in gens], answer, choices=q.options, mode=mode)
        outcome = question_outcome(classified)
        max_pairs = c.source_pairs_per_question.get(q.source, c.pairs_per_question)
        seed = question_seed(c.seed, q.id, "pairs")
        scored = {r.index: (r, correct) for correct, rs in ((True, classified.positives), (False, classified.negatives),
                                                          (None, classified.format_failures)) for r in rs}

        def meta(index: int) -> dict:
            response, correct = scored[index]
            return {"index": index, "answer": response.answer, "correct": correct, "format": response.reason,
                    "finished": gens[index].finished, "num_tokens": len(gens[index].token_ids)}

        def record(pair) -> dict:
            return {"id": q.id, **_image_field(q), "question": prompt, "chosen": pair.chosen, "rejected": pair.rejected,
                    "answer_gt": answer, "chosen_meta": meta(pair.chosen_index),
                    "rejected_meta": meta(pair.rejected_index)}

        hard = None
        if outcome == "all_wrong":
            hard = {"id": q.id, "source": q.source, **_image_field(q), "question": q.question, "prompt": prompt,
                    "answer": answer, "options": list(q.options) if q.options else None, "match_mode": mode,
                    "num_samples": len(gens), "answers": [r.answer for r in classified.negatives]}
        return {
            "branch": "ground_truth", "status": outcome, "num_samples": len(gens),
            "num_tokens": sum(len(g.token_ids) for g in gens),
            "counts": {"positive": len(classified.positives), "negative": len(classified.negatives),
                       "format_failure": len(classified.format_failures)},
            "pairs": {"correctness": [record(p) for p in make_pairs(classified, max_pairs=max_pairs, seed=seed)],
                      "format": [record(p) for p in make_format_pairs(classified, max_pairs=max_pairs, seed=seed)]},
            "hard": hard,
        }

    def _dropout_ntp_together(self, batch: list[tuple[dict, Question, list[str], int]]) -> None:
        """Dropout-NTP pairs of ``batch``'s questions (two generate calls in all) into their lines
        (nothing is filled when an image cannot be read: MediaError)."""
        c = self.cfg
        jobs, todo = [], []
        for line, q, images, mdp in batch:
            if not images:  # without an image both answers would be blind: the pair would teach nothing
                line.update({"branch": "dropout_ntp", "status": "no_image", "pairs": {"dropout_ntp": []}})
                continue
            style = c.dropout_ntp.prompt
            use_cot = style == "cot" or (style == "auto" and q.answer is not None)  # a withheld answer: CoT question
            prompt = build_cot_prompt(q.question, style=c.prompt_style, options=q.options) if use_cot \
                else _plain_prompt(q)
            jobs.append(DropoutNTPJob(prompt, images, self.params(q, 1), self.params(q, 1, "continuation"), mdp))
            todo.append((line, q, prompt))
        results = build_dropout_ntp_pairs(self.engine, jobs, ratio=c.dropout_ntp.ratio)
        for (line, q, prompt), result in zip(todo, results):
            records = []
            if result.status == "pair":
                records.append({"id": q.id, **_image_field(q), "question": prompt, "chosen": result.chosen,
                                "rejected": result.rejected, "chosen_meta": result.chosen_meta,
                                "rejected_meta": result.rejected_meta})
            line.update({"branch": "dropout_ntp", "status": result.status, "num_samples": result.num_generated,
                         "num_tokens": result.num_tokens, "pairs": {"dropout_ntp": records}})


def _reject(line: dict, err: MediaError) -> None:
    line.update(branch="rejected", status=err.reason, reject={"reason": err.reason, "message": str(err)})


# ---------------------------------------------------------------- the loop

@dataclass
class ShardSummary:
    """One shard's sampling run. ``num_resumed`` questions were already done by an earlier run."""

    index: int
    count: int
    path: Path
    num_assigned: int
    num_resumed: int
    num_done: int
    num_samples: int
    seconds: float
    stopped_early: bool

    @property
    def samples_per_second(self) -> float:
        return self.num_samples / self.seconds if self.seconds > 0 else 0.0


@dataclass
class BuildResult:
    """What :func:`build_pairs` did: the shard it sampled (None for stage=merge) and the merge (None if not run)."""

    out_dir: Path
    shard: ShardSummary | None
    merge: MergeSummary | None


def sample_shard(cfg: BuildConfig, questions: QuestionSet, engine_factory: Callable[[], object], *, index: int,
                 count: int, fingerprint: str) -> ShardSummary:
    """Sample every unfinished question of shard ``index`` of ``count``, appending one line each.

    Args:
        cfg: the run's settings.
        questions: all questions (this shard keeps those with ``shard_of(id, count) == index``).
        engine_factory: returns the engine; called only when something is left to sample.
        index / count: this shard.
        fingerprint: settings fingerprint written on every line.

    Returns:
        A :class:`ShardSummary` (samples = responses generated by this run).
    """
    out_dir = Path(cfg.output_dir)
    mine = [q for q in questions.questions if shard_of(q.id, count) == index]
    with ShardWriter(shard_path(out_dir, index, count)) as writer:
        done = finished_ids(out_dir, index, count)  # after taking the lock: this shard's partial tail is gone
        todo = [q for q in mine if q.id not in done]
        limit = len(todo) if cfg.stop_after_questions < 0 else min(cfg.stop_after_questions, len(todo))
        num_samples, seconds = 0, 0.0
        if limit:
            from tqdm import tqdm

            sampler = _Sampler(cfg, engine_factory(), questions.image_root, fingerprint)
            start = time.perf_counter()  # samples/s leaves model loading out
            expected = sum((2 if q.images else 0) if uses_dropout_ntp(q, cfg.seed, cfg.dropout_ntp.share)
                           else cfg.samples_per_question for q in todo[:limit])
            with tqdm(total=expected, unit="sample", desc=f"shard {index}/{count}", disable=not cfg.progress,
                      file=sys.stderr, dynamic_ncols=True) as bar:
                step = cfg.questions_per_call
                for start_at in range(0, limit, step):
                    for line in sampler.lines(todo[start_at:min(start_at + step, limit)]):
                        writer.write(line)
                        num_samples += line["num_samples"]
                        bar.update(line["num_samples"])
            seconds = time.perf_counter() - start
        return ShardSummary(index, count, writer.path, len(mine), len(mine) - len(todo), limit, num_samples,
                            seconds, limit < len(todo))


def _shard_count_on_disk(out_dir: Path) -> int | None:
    """The shard count the shard files were written with (the largest, if runs used several)."""
    counts = {int(m.group(1)) for p in out_dir.glob("shards/shard-*-of-*.jsonl")
              if (m := re.fullmatch(r"shard-\d{5}-of-(\d{5})\.jsonl", p.name))}
    return max(counts) if counts else None


def _merge_only(cfg: BuildConfig, out_dir: Path, env: Mapping[str, str]) -> MergeSummary:
    stored = load_settings(out_dir)
    if stored is None:
        raise ValueError(f"{out_dir} has no {CONFIG_FILE}: nothing was sampled there; run stage=sample first")
    if cfg.model_dir and cfg.questions:  # given: they must match what was sampled
        questions = read_questions(cfg.questions, image_root=cfg.image_root, strict=cfg.strict)
        check_or_store_settings(out_dir, run_settings(cfg, questions))
    else:
        questions = read_questions(stored["questions"], image_root=stored["image_root"], strict=cfg.strict)
    count = cfg.shard.count or _shard_count_on_disk(out_dir) or resolve_shard(None, None, env)[1]
    return merge_shards(out_dir, questions, fingerprint=settings_fingerprint(stored),
                        ratio=stored["dropout_ntp"]["ratio"], shard_of=shard_of, shard_count=count)


def _default_engine_factory(cfg: BuildConfig, env: Mapping[str, str]) -> Callable[[], object]:
    def load():
        import torch

        from mpo.infer.engine import Engine
        from mpo.model.tokenizer import INTERNVL25_SYSTEM_PROMPT

        device = cfg.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and "LOCAL_RANK" in env and torch.cuda.is_available():  # one GPU per torchrun rank
            device = f"cuda:{env['LOCAL_RANK']}"
        dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
        system = INTERNVL25_SYSTEM_PROMPT if cfg.system_prompt == "default" else (cfg.system_prompt or None)
        return Engine.load(cfg.model_dir, device=device, dtype=dtype, system_prompt=system,
                           max_batch_rows=cfg.max_batch_rows)

    return load


def build_pairs(cfg: BuildConfig, *, engine=None, env: Mapping[str, str] = os.environ) -> BuildResult:
    """Run one stage of the pair builder.

    ``stage=all``: sample this process's shard, then merge when it is the only shard (and the run
    was not stopped early). ``stage=sample``: sample only. ``stage=merge``: merge every shard of
    ``output_dir`` (settings are read from its build_config.json when model/questions are not given).

    Args:
        cfg: the run's settings (:class:`mpo.build_pairs.BuildConfig`).
        engine: a ready engine (tests pass fakes); default: ``Engine.load(cfg.model_dir, ...)`` on first need.
        env: environment to read SLURM / torchrun shard variables from.

    Raises:
        ValueError: bad settings, settings that differ from those ``output_dir`` was built with,
            or (merge) questions without results; :class:`~mpo.data.rejects.DataError` with ``strict``.
    """
    out_dir = Path(cfg.output_dir)
    if cfg.stage == "merge":
        return BuildResult(out_dir, None, _merge_only(cfg, out_dir, env))
    if not Path(cfg.model_dir).is_dir():
        raise ValueError(f"model={cfg.model_dir} is not a directory: give a native InternVL checkpoint directory")
    index, count = resolve_shard(cfg.shard.index, cfg.shard.count, env)
    questions = read_questions(cfg.questions, image_root=cfg.image_root, strict=cfg.strict)
    settings = run_settings(cfg, questions)
    check_or_store_settings(out_dir, settings)
    fingerprint = settings_fingerprint(settings)
    factory = (lambda: engine) if engine is not None else _default_engine_factory(cfg, env)
    shard = sample_shard(cfg, questions, factory, index=index, count=count, fingerprint=fingerprint)
    merged = None
    if cfg.stage == "all" and count == 1 and not shard.stopped_early:
        merged = merge_shards(out_dir, questions, fingerprint=fingerprint, ratio=cfg.dropout_ntp.ratio,
                              shard_of=shard_of, shard_count=count)
    return BuildResult(out_dir, shard, merged)
