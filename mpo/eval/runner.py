"""Evaluation runs: predictions per (model, benchmark) through the engine, saved as jsonl and resumable,
then scored and reported. `python -m mpo.evaluate` is a thin Hydra wrapper over :func:`run_evaluation`::

    from mpo.eval.runner import EvalConfig, run_evaluation
    results = run_evaluation(EvalConfig(model=["runs/base/final", "runs/mpo/final"], benchmarks=["mmstar"],
                                        data_root="~/LMUData", output_dir="outputs/eval"))

Layout under ``output_dir``:

- ``predictions/{model_name}/{benchmark}.jsonl``: one line per item, ``{"index", "prediction",
  "question" (the prompt as sent), "finished" (False: cut at max_new_tokens)}``, appended and flushed
  after every batch, so an interrupted run loses at most one batch and a rerun skips what is there.
- ``predictions/{model_name}/{benchmark}.settings.json``: what produced them (model path, cot,
  max_new_tokens, max_tiles, system prompt); resuming under other settings is refused, because mixing
  answers from two settings in one score would be silently wrong.
- with ``samples=K`` (custom benchmarks): ``predictions/{model_name}/{benchmark}.samples.jsonl`` holds
  K answers per question sampled at ``sample_temperature``, and each score gets ``self_consistency``
  (greedy, mean@K, maj@K and pass@K: :mod:`mpo.eval.consistency`).
- ``results.json``, ``report.md``, ``scores.png``: see :mod:`mpo.eval.report`.

``model_name`` is the checkpoint's directory name (made unique by prefixing the parent directory when two
agree); a custom benchmark ``custom:PATH.jsonl`` is named after the file's stem.
"""

from __future__ import annotations

import json
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from mpo.eval.benchmarks import BenchmarkSpec, Item, build_prompt, get_benchmark, load_benchmark
from mpo.eval.config import EvalConfig, given, resolve_system_prompt
from mpo.eval.consistency import self_consistency
from mpo.eval.naming import as_named_paths, benchmark_labels, name_models
from mpo.eval.prediction_files import (
    append_predictions,
    pending_items,
    read_predictions,
    read_samples,
    settings_path,
)
from mpo.eval.report import write_results
from mpo.eval.scorers import score

__all__ = ["EvalConfig", "benchmark_labels", "name_models", "pending_items", "read_predictions", "run_evaluation"]

Log = Callable[[str], None]


def _print_log(message: str) -> None:
    print(message, flush=True)


def _question_seed(seed: int, index) -> int:
    """A question's own sampling seed from the run's seed and its index (stable across runs)."""
    return zlib.crc32(f"{seed}:{index}".encode()) & 0x7FFFFFFF


def generate_predictions(engine, spec: BenchmarkSpec, items: list[Item], path: Path, *, cot: bool,
                         max_new_tokens: int, max_tiles: int, batch_size: int, progress: bool = True,
                         desc: str = "", sampling: tuple[int, float, int] | None = None) -> tuple[int, int]:
    """Greedy answers for ``items`` through ``engine.generate``, ``batch_size`` requests per call,
    appended to ``path`` after each batch. Returns (questions generated, answers cut at max_new_tokens).

    ``sampling=(k, temperature, seed)`` samples k answers per question instead, as
    ``{"index", "samples", "finished"}`` rows; each question draws from its own seed (``Request.seed``),
    so its samples do not depend on the batch it lands in or on a resume."""
    # Imported here so scoring-only runs and config errors do not pay for importing torch.
    from mpo.infer.engine import Request, SamplingParams

    if sampling is None:
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    else:
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=sampling[1], num_samples=sampling[0])
    num_truncated = 0
    with tqdm(total=len(items), desc=desc, unit=" questions", disable=not progress, file=sys.stderr) as bar:
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            prompts = [build_prompt(item, spec, cot=cot) for item in batch]
            # Images are decoded per batch, so memory holds one batch of images, not the benchmark.
            requests = [Request(prompt, images=item.load_images(), max_dynamic_patch=max_tiles,
                                seed=None if sampling is None else _question_seed(sampling[2], item.index))
                        for prompt, item in zip(prompts, batch)]
            outputs = engine.generate(requests, params)
            assert len(outputs) == len(batch), "engine returned a different number of answers than requests"
            if sampling is None:
                rows = [{"index": item.index, "prediction": out[0].text, "question": prompt,
                         "finished": out[0].finished} for item, prompt, out in zip(batch, prompts, outputs)]
            else:
                rows = [{"index": item.index, "samples": [o.text for o in out], "finished": [o.finished for o in out]}
                        for item, out in zip(batch, outputs)]
            append_predictions(path, rows)
            num_truncated += sum(not o.finished for out in outputs for o in out)
            bar.update(len(batch))
    return len(items), num_truncated


def _load_engine(path: Path, cfg: EvalConfig):
    from mpo.infer.engine import Engine

    return Engine.load(path, device=cfg.device, dtype=cfg.dtype, system_prompt=resolve_system_prompt(cfg.system_prompt),
                       max_batch_rows=cfg.max_batch_rows)


def _check_model_dirs(models: dict[str, Path]) -> None:
    for name, path in models.items():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model {name!r}: {path} is not a checkpoint directory (no config.json); "
                                    "pass the folder holding config.json and the weights")


def _sampling(cfg: EvalConfig, model_name: str) -> tuple[int, float, int] | None:
    """(K, temperature, seed) when ``model_name`` samples answers (``samples=K``), else None."""
    if cfg.samples and (cfg.sample_models is None or model_name in cfg.sample_models):
        return cfg.samples, cfg.sample_temperature, cfg.sample_seed
    return None


def _answer_files(cfg: EvalConfig, model_name: str) -> list[tuple[str, Callable, tuple[int, float, int] | None]]:
    """(file suffix, reader, sampling) of each answer file ``model_name`` gets per benchmark."""
    sampling = _sampling(cfg, model_name)
    return [("", read_predictions, None)] + ([(".samples", read_samples, sampling)] if sampling else [])


def _generate_all(cfg: EvalConfig, tasks: dict[str, tuple[BenchmarkSpec, list[Item]]], out: Path,
                  engine_factory, log: Log) -> tuple[dict[str, dict[str, dict]], dict[str, dict[str, dict]]]:
    """Generate what is missing; return (greedy rows, sampled rows) as {model: {label: {index: row}}}
    (the sampled ones empty unless ``cfg.samples``)."""
    models = name_models(cfg.model)
    _check_model_dirs(models)
    system_prompt = resolve_system_prompt(cfg.system_prompt)
    # Resume state and settings of every model are checked before the first model loads.
    todo: dict[str, list[tuple[str, str, tuple[int, float, int] | None, list[Item]]]] = {}
    for model_name, model_path in models.items():
        todo[model_name] = []
        for label, (spec, items) in tasks.items():
            settings = {"model": str(model_path.resolve()), "benchmark": spec.name, "cot": cfg.cot,
                        "max_new_tokens": cfg.new_tokens, "max_tiles": cfg.max_tiles or spec.max_tiles,
                        "system_prompt": system_prompt}
            for suffix, reader, sampling in _answer_files(cfg, model_name):
                extra = {} if sampling is None else dict(zip(("samples", "temperature", "seed"), sampling))
                pending = pending_items(out / "predictions" / model_name / f"{label}{suffix}.jsonl", items,
                                        {**settings, **extra}, reader)
                todo[model_name].append((label, suffix, sampling, pending))
                done = len(items) - len(pending)
                log(f"{model_name} / {label}: {len(items)} questions, already had " + (
                    f"{done} predictions, generating {len(pending)}" if sampling is None else
                    f"{sampling[0]} samples of {done}, sampling {len(pending)}"))
    predictions: dict[str, dict[str, dict]] = {}
    samples: dict[str, dict[str, dict]] = {}
    for model_name, model_path in models.items():
        model_dir = out / "predictions" / model_name
        if any(pending for *_, pending in todo[model_name]):  # a fully predicted model is not even loaded
            engine = engine_factory(model_path, cfg)
            for label, suffix, sampling, items in todo[model_name]:
                if not items:
                    continue
                spec = tasks[label][0]
                started = time.perf_counter()
                count, truncated = generate_predictions(
                    engine, spec, items, model_dir / f"{label}{suffix}.jsonl", cot=cfg.cot,
                    max_new_tokens=cfg.new_tokens, max_tiles=cfg.max_tiles or spec.max_tiles,
                    batch_size=cfg.batch_size, progress=cfg.progress, desc=f"{model_name}/{label}{suffix}",
                    sampling=sampling)
                seconds = time.perf_counter() - started
                # Cut answers usually mean a CoT budget too small for the reasoning: they score as wrong.
                cut = f"; {truncated} hit max_new_tokens={cfg.new_tokens}" if truncated else ""
                what = f" ({sampling[0]} samples each)" if sampling else ""
                log(f"{model_name} / {label}: generated {count}{what} in {seconds:.1f} s "
                    f"({count / max(seconds, 1e-9):.2f} questions/s){cut}")
            del engine
            from mpo.model.load import free_memory  # torch is loaded by now: the engine needed it

            free_memory()
        predictions[model_name] = {label: read_predictions(model_dir / f"{label}.jsonl") for label in tasks}
        if _sampling(cfg, model_name):
            samples[model_name] = {label: read_samples(model_dir / f"{label}.samples.jsonl") for label in tasks}
    return predictions, samples


def _prediction_sources(cfg: EvalConfig, labels: list[str]) -> dict[str, dict[str, Path]]:
    """predictions= entries → {name: {label: jsonl}}. A file serves the single benchmark; a directory
    holds ``{label}.jsonl`` per benchmark (e.g. a previous run's predictions/{model_name})."""
    # A file named after its benchmark (predictions/MODEL/mmstar.jsonl) is named after its folder.
    entries = as_named_paths(
        cfg.predictions, lambda p: (p.parent if p.stem in labels else p.with_suffix("")) if p.is_file() else p)
    sources: dict[str, dict[str, Path]] = {}
    for name, path in entries.items():
        if path.is_dir():
            files = {label: path / f"{label}.jsonl" for label in labels}
            missing = [str(f) for f in files.values() if not f.is_file()]
            if missing:
                raise FileNotFoundError(f"predictions folder {path} lacks {', '.join(missing)}; a folder must hold "
                                        "{benchmark}.jsonl for every benchmark evaluated")
            sources[name] = files
        elif path.is_file():
            if len(labels) != 1:
                raise ValueError(f"predictions={path} is one file but {len(labels)} benchmarks are selected; "
                                 "name exactly one, e.g. benchmarks=[mmstar], or pass a folder of {benchmark}.jsonl")
            sources[name] = {labels[0]: path}
        else:
            raise FileNotFoundError(f"predictions file {path} does not exist")
    return sources


def _read_sources(cfg: EvalConfig, tasks: dict[str, tuple[BenchmarkSpec, list[Item]]],
                  log: Log) -> dict[str, dict[str, dict]]:
    predictions: dict[str, dict[str, dict]] = {}
    for name, files in _prediction_sources(cfg, list(tasks)).items():
        predictions[name] = {}
        for label, path in files.items():
            rows = read_predictions(path)
            items = tasks[label][1]
            if rows and not any(str(item.index) in rows for item in items):
                raise ValueError(f"none of the {len(rows)} predictions in {path} matches an index of {label}; "
                                 "is it the right file for this benchmark?")
            sidecar = settings_path(path)
            if sidecar.is_file():
                saved = json.loads(sidecar.read_text(encoding="utf-8")).get("cot")
                if saved is not None and saved != cfg.cot:
                    log(f"warning: {path} was generated with cot={saved} but is scored with cot={cfg.cot}")
            predictions[name][label] = rows
            log(f"{name} / {label}: read {len(rows)} predictions from {path}")
    return predictions


def run_evaluation(cfg: EvalConfig, *, engine_factory: Callable | None = None,
                   log: Log = _print_log) -> dict[str, dict[str, dict]]:
    """Generate missing predictions (model mode) or read them (predictions mode), score every
    benchmark, and write results.json, report.md and scores.png under ``cfg.output_dir``.

    Args:
        cfg: the run's settings (see :class:`EvalConfig`).
        engine_factory: ``(checkpoint_dir, cfg) -> engine`` with ``generate(requests, params)``;
            default ``Engine.load`` (tests pass a fake).
        log: receives one progress line per model and benchmark.
    Returns:
        {model_name: {benchmark_label: score dict}} (scores 0–100, see :func:`mpo.eval.scorers.score`).
    Raises:
        FileNotFoundError: a benchmark file, checkpoint or predictions file is missing.
        ValueError: anything else the user must fix (message says what).
    """
    out = Path(cfg.output_dir).expanduser()
    # Every benchmark is read before any model loads: a missing file fails in seconds, not hours in.
    tasks: dict[str, tuple[BenchmarkSpec, list[Item]]] = {}
    for label, name in benchmark_labels(list(cfg.benchmarks)).items():
        items = load_benchmark(name, cfg.data_root)
        tasks[label] = (get_benchmark(name), items[:cfg.limit] if cfg.limit else items)
    samples: dict[str, dict[str, dict]] = {}
    if given(cfg.model):
        predictions, samples = _generate_all(cfg, tasks, out, engine_factory or _load_engine, log)
    else:
        predictions = _read_sources(cfg, tasks, log)
    results = {
        model: {label: score(tasks[label][0].name, tasks[label][1],
                             {key: row["prediction"] for key, row in rows.items()}, cot=cfg.cot)
                for label, rows in by_label.items()}
        for model, by_label in predictions.items()
    }
    for model, by_label in samples.items():
        for label, rows in by_label.items():
            results[model][label]["self_consistency"] = dict(self_consistency(
                tasks[label][1], {key: row["prediction"] for key, row in predictions[model][label].items()},
                {key: row["samples"] for key, row in rows.items()}, cot=cfg.cot),
                temperature=cfg.sample_temperature)
    paths = write_results(out, results)
    for model, by_label in results.items():
        log(f"{model}: " + ", ".join(f"{label} {scores['overall']:.1f}" for label, scores in by_label.items()))
    log(f"wrote {paths['json']}, {paths['markdown']} and {paths['plot']}")
    return results
