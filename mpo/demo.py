"""`mpo demo`: the whole MPO pipeline on the synthetic visual task, end to end, on a CPU.

    mpo demo                                  # ~8 min on 2 CPU cores (measured, docs/demo_notes.md)
    mpo demo --output-dir runs/demo --seed 1 --device cuda
    mpo demo --quick                          # every stage on a handful of questions (CI smoke run)
    mpo demo --set num_train=3000 --set sft_steps=3000 --sft-arg optim.lr=1e-3 --mpo-arg loss.beta=0.3

Stages, each run as the command a user would type (logged to DIR/commands.sh, output to DIR/logs/), in
this process unless --separate-processes (``mpo.demo_stages``: same outputs, less start-up time):

1. task   ``data_pipeline.synthetic.generate_task``: train / build / test questions with images
          (``kinds=grid``: coloured squares counted on an 8 x 8 grid, one cell per image token).
2. model  a random InternVL of shape ``demo`` (``mpo.model.tiny.write_tiny_checkpoint``).
3. sft    ``launch/train.py +exp=demo_sft``: the trainer with only the SFT term, on correct
          chain-of-thought answers ending in "Final answer: X".
4. pairs  ``python -m mpo.build_pairs``: K samples per build question from the SFT model, paired by
          correctness; a share of questions has its answer withheld and goes through Dropout-NTP.
5. mpo    ``launch/train.py +exp=demo_mpo``: MPO (0.8 DPO + 0.2 BCO + 1.0 SFT) from the SFT model.
6. awq    ``python -m mpo.export_awq``: 4-bit AWQ of the MPO model, calibrated on the pairs.
7. eval   ``python -m mpo.evaluate``: SFT, MPO and MPO-AWQ on the held-out test split (greedy, CoT), plus
          the SFT model's K sampled answers per question (``samples=K``: mean@K, maj@K, pass@K).
8. report ``report.md`` / ``report.json`` / PNG curves (``mpo.demo_report``); the table is printed. The
          report also gives what per-kind answer priors alone score, so a gain that is only a shift of the
          answer distribution shows as one, and the SFT model's maj@K − greedy: how much choosing among
          its own samples, what preference pairs of those samples teach, could gain.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from mpo.demo_report import EVAL_MODELS, write_report
from mpo.demo_settings import PRESETS, DemoSettings
from mpo.demo_stages import REPO_ROOT, StageError, Stages

TRAIN_SCRIPT = REPO_ROOT / "launch" / "train.py"
# Subfolders the demo writes; --overwrite removes exactly these (never anything else in DIR).
OUTPUTS = ("task", "model", "sft", "pairs", "mpo", "mpo_awq", "eval", "logs", "commands.sh", "report.md",
           "report.json", "sft_curves.png", "mpo_curves.png", "accuracy.png")

COMMANDS_HEADER = """#!/usr/bin/env bash
# What `mpo demo` ran, in order. Two inputs are written by the demo itself (mpo/demo.py):
# task/questions/build_demo.jsonl (the build split without its leading '<image>\\n') and
# task/eval_items/synthetic.jsonl (the test benchmark with each question's kind as its category).
set -e

"""


_HYDRA_PLAIN = re.compile(r"[A-Za-z0-9_/.+\-]+")


def _hydra_str(value: str | Path) -> str:
    """A Hydra override value, quoted when it holds characters Hydra would parse (':', '=', ',', spaces)."""
    text = str(value)
    if _HYDRA_PLAIN.fullmatch(text):
        return text
    if "'" in text:
        raise ValueError(f"path {text!r} contains a single quote, which Hydra overrides cannot carry; "
                         "choose an output directory without one")
    return f"'{text}'"


def _trainer(exp: str, run_dir: Path, model: Path, data: Path, seed: int, device: str, steps: int | None,
             overrides: tuple[str, ...]) -> list[str]:
    argv = [sys.executable, str(TRAIN_SCRIPT), f"+exp={exp}", f"hydra.run.dir={_hydra_str(run_dir)}",
            f"model.path={_hydra_str(model)}", f"data.path={_hydra_str(data)}", f"seed={seed}", f"device={device}"]
    return argv + ([f"max_steps={steps}"] if steps is not None else []) + list(overrides)


def _demo_questions(task_dir: Path) -> Path:
    """The build split without its leading ``<image>\\n``, written next to the original.

    The pair builder wraps a question in the CoT template and keeps a placeholder where the question
    has it (after "Question:"), while SFT and evaluation put the image before the instruction. With
    no placeholder the image goes first everywhere, so the pairs' prompts are the prompts the model
    was trained and is evaluated on.
    """
    src = task_dir / "questions" / "build.jsonl"
    dst = task_dir / "questions" / "build_demo.jsonl"
    with src.open(encoding="utf-8") as fin, dst.open("w", encoding="utf-8") as fout:
        for line in fin:
            record = json.loads(line)
            record["question"] = record["question"].removeprefix("<image>\n")
            fout.write(json.dumps(record, ensure_ascii=False) + "\n")
    return dst


def _benchmark_with_kinds(task_dir: Path) -> Path:
    """The test benchmark with each row's question kind as its category (accuracy per kind).

    Written to ``task/eval_items/synthetic.jsonl``: a sibling of ``task/test/``, so the rows' image
    paths (``../images/...``) resolve the same and the benchmark keeps the name ``synthetic``.
    """
    questions = [json.loads(line) for line in (task_dir / "questions" / "test.jsonl").open(encoding="utf-8")]
    rows = [json.loads(line) for line in (task_dir / "test" / "synthetic.jsonl").open(encoding="utf-8")]
    assert len(rows) == len(questions), "synthetic test files disagree"
    out = task_dir / "eval_items" / "synthetic.jsonl"
    out.parent.mkdir(exist_ok=True)
    with out.open("w", encoding="utf-8") as handle:
        for row, question in zip(rows, questions):
            handle.write(json.dumps({**row, "category": question["kind"]}, ensure_ascii=False) + "\n")
    return out


def prepare_output_dir(out_dir: Path, overwrite: bool) -> None:
    """Create ``out_dir``; refuse one holding an earlier demo unless ``overwrite`` (then clear only ours)."""
    existing = [name for name in OUTPUTS if (out_dir / name).exists()]
    if existing and not overwrite:
        raise ValueError(f"{out_dir} already holds demo outputs ({', '.join(existing)}); pass --overwrite to "
                         "replace them or choose another --output-dir")
    for name in existing:
        path = out_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def run_demo(out_dir: str | Path, *, seed: int = 0, device: str = "cpu", settings: DemoSettings = PRESETS["full"],
             overwrite: bool = False, separate_processes: bool = False, log: Callable[[str], None] = print) -> dict:
    """Run every stage into ``out_dir`` and return the report dict (also written as report.json).

    Args:
        seed: seeds the task, the starting weights, training, sampling and calibration.
        device: "cpu" or "cuda" (every stage runs there).
        settings: sizes of the run (``PRESETS["full"]`` or ``["quick"]``, or your own).
        separate_processes: run each stage's command as its own Python process (default: in this
            process, same outputs, without each stage's start-up time; ``mpo.demo_stages``).
    Raises:
        ValueError: bad arguments or an output directory that holds an earlier run.
        StageError: a stage's command failed (its log is named in the message).
    """
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r}: use cpu or cuda")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("device=cuda but no CUDA device is visible; use --device cpu")
    if not TRAIN_SCRIPT.is_file():
        raise ValueError(f"{TRAIN_SCRIPT} not found; run the demo from a source checkout (pip install -e .)")
    out = Path(out_dir).resolve()
    prepare_output_dir(out, overwrite)
    stages = Stages(out, device, log, separate_processes=separate_processes)
    start = time.perf_counter()
    task, model, pairs = out / "task", out / "model", out / "pairs"

    from data_pipeline.synthetic import generate_task
    from mpo.model.tiny import write_tiny_checkpoint

    log(f"[demo] task: {settings.num_train} train / {settings.num_build} build / {settings.num_test} test questions")
    stages.timed("task", lambda: generate_task(task, seed=seed, num_train=settings.num_train,
                                               num_pairs_questions=settings.num_build, num_test=settings.num_test,
                                               image_size=settings.image_size, fixed_options=settings.fixed_options,
                                               scene_description=settings.scene_description,
                                               kinds=settings.kinds),
                 ["python", "-m", "data_pipeline.synthetic", str(task), "--seed", str(seed), "--num-train",
                  str(settings.num_train), "--num-build", str(settings.num_build), "--num-test", str(settings.num_test),
                  "--image-size", str(settings.image_size)] + (["--fixed-options"] if settings.fixed_options else [])
                 + ([] if settings.scene_description else ["--no-scene-description"])
                 + ["--kinds", settings.kinds])
    log(f"[demo] model: random InternVL of shape {settings.shape!r}")
    stages.timed("model", lambda: write_tiny_checkpoint(model, seed=seed, shape=settings.shape,
                                                        image_size=settings.image_size),
                 ["python", "-m", "mpo.model.tiny", str(model), "--seed", str(seed), "--shape", settings.shape,
                  "--image-size", str(settings.image_size)])

    stages.run("sft", _trainer("demo_sft", out / "sft", model, task / "sft", seed, device, settings.sft_steps,
                               settings.sft_overrides))

    # The synthetic data has no system turn (configs/data/synthetic.yaml), so sampling, calibration and
    # evaluation leave it out too ("system_prompt=" is an empty string): same prompts as in training.
    stages.run("pairs", [
        sys.executable, "-m", "mpo.build_pairs", f"model={_hydra_str(out / 'sft' / 'final')}",
        f"questions={_hydra_str(_demo_questions(task))}", f"image_root={_hydra_str(task)}",
        f"output_dir={_hydra_str(pairs)}", f"samples_per_question={settings.samples_per_question}",
        f"pairs_per_question={settings.pairs_per_question}", f"temperature={settings.temperature}", "top_k=0",
        f"max_new_tokens={settings.max_new_tokens}", "max_dynamic_patch=1",
        f"dropout_ntp.share={settings.dropout_ntp_share}", f"seed={seed}", f"device={device}",
        "system_prompt=", "progress=false", f"max_batch_rows={settings.decode_rows}",
        f"questions_per_call={max(1, settings.decode_rows // settings.samples_per_question)}",
    ])
    num_pairs = _count_pairs(pairs)
    if num_pairs == 0:
        raise StageError(f"the SFT model produced no preference pair (see {pairs / 'stats.json'}): it never "
                         "answered in the 'Final answer: X' format; train it longer (sft_steps)")

    stages.run("mpo", _trainer("demo_mpo", out / "mpo", out / "sft" / "final", pairs, seed, device,
                               settings.mpo_steps, settings.mpo_overrides))

    stages.run("awq", [
        sys.executable, "-m", "mpo.export_awq", f"model={_hydra_str(out / 'mpo' / 'final')}",
        f"data={_hydra_str(pairs)}", f"output_dir={_hydra_str(out / 'mpo_awq')}", f"device={device}",
        f"dtype={'float32' if device == 'cpu' else 'bfloat16'}", f"seed={seed}", "progress=false",
        f"calibration.num_samples={min(settings.awq_calibration_samples, num_pairs)}",
        "calibration.system_prompt=",
    ])

    models = {"sft": out / "sft" / "final", "mpo": out / "mpo" / "final", "mpo_awq": out / "mpo_awq"}
    assert tuple(models) == EVAL_MODELS
    model_map = "{" + ",".join(f"{name}:{_hydra_str(path)}" for name, path in models.items()) + "}"
    # Room for every sample of a call at once: on a GPU this tiny model's decode steps cost about the same
    # for 256 or 1024 rows, so fewer, wider waves are faster (greedy calls use eval_batch_size rows anyway).
    eval_rows = max(settings.decode_rows, settings.eval_batch_size * settings.consistency_samples)
    stages.run("eval", [
        sys.executable, "-m", "mpo.evaluate", f"model={model_map}",
        f"benchmarks=[{_hydra_str('custom:' + str(_benchmark_with_kinds(task)))}]",
        f"output_dir={_hydra_str(out / 'eval')}", "cot=true", f"max_new_tokens={settings.max_new_tokens}",
        f"batch_size={settings.eval_batch_size}", f"max_batch_rows={eval_rows}", "max_tiles=1",
        "system_prompt=", f"device={device}", "progress=false",
        # The SFT model's maj@K against its greedy answer: how much sharpening its own samples could give.
        *([f"samples={settings.consistency_samples}", f"sample_temperature={settings.temperature}",
           f"sample_seed={seed}", "sample_models=[sft]"] if settings.consistency_samples else []),
    ])

    stages.close()
    stages.timings["total"] = round(time.perf_counter() - start, 2)
    (out / "commands.sh").write_text(COMMANDS_HEADER + "\n\n".join(stages.commands) + "\n", encoding="utf-8")
    report = write_report(out, seed=seed, device=device, settings=settings, timings=stages.timings)
    return report


def _count_pairs(pairs_dir: Path) -> int:
    """Records over every file listed in the pair builder's meta.json (0 when it wrote none)."""
    meta_path = pairs_dir / "meta.json"
    if not meta_path.is_file():
        return 0
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    return sum(int(entry.get("length", 0)) for entry in meta.values())


def main(argv: list[str] | None = None) -> int:
    """Command line entry of `mpo demo` / `python -m mpo.demo`."""
    parser = argparse.ArgumentParser(prog="mpo demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="runs/demo", help="where everything is written (default runs/demo)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every stage (default 0)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="where every stage runs (default: cuda when available, else cpu)")
    parser.add_argument("--quick", action="store_true",
                        help="a reduced run (a few questions and steps) that checks every stage works; "
                             "its accuracies mean nothing")
    parser.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier demo in DIR")
    parser.add_argument("--separate-processes", action="store_true",
                        help="run each stage as its own Python process, exactly as commands.sh does (default: "
                             "in this process, same results, without each stage's start-up time)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change a demo setting (mpo.demo_settings.DemoSettings), e.g. --set num_train=2000 "
                             "--set sft_steps=3000; repeatable")
    parser.add_argument("--sft-arg", action="append", default=[], metavar="OVERRIDE",
                        help="extra Hydra override for the SFT trainer run, e.g. --sft-arg optim.lr=1e-3; repeatable")
    parser.add_argument("--mpo-arg", action="append", default=[], metavar="OVERRIDE",
                        help="extra Hydra override for the MPO trainer run, e.g. --mpo-arg loss.beta=0.3; repeatable")
    args = parser.parse_args(argv)
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = PRESETS["quick" if args.quick else "full"]
    try:
        settings = settings.with_values(args.set)
        settings = replace(settings, sft_overrides=settings.sft_overrides + tuple(args.sft_arg),
                           mpo_overrides=settings.mpo_overrides + tuple(args.mpo_arg))
        report = run_demo(args.output_dir, seed=args.seed, device=device, settings=settings, overwrite=args.overwrite,
                          separate_processes=args.separate_processes)
    except ValueError as err:
        parser.error(str(err))
    except StageError as err:
        print(f"mpo demo: {err}", file=sys.stderr)
        return 1
    print()
    print(report["table"])
    print(f"\nreport: {Path(args.output_dir) / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
