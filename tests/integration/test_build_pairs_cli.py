"""`python -m mpo.build_pairs` end to end on a tiny model: an MMPR directory the trainer loads, and resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SETTINGS = ["samples_per_question=2", "max_new_tokens=8", "max_dynamic_patch=1", "temperature=1.0",
            "dropout_ntp.share=0.5", "system_prompt=", "progress=false", "seed=3"]


def run_cli(args: list[str], cwd: Path, module: list[str] = ("-m", "mpo.build_pairs")) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("SLURM_ARRAY_TASK_ID", None)
    return subprocess.run([sys.executable, *module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A 224-px tiny checkpoint and a question set: synthetic questions, two without answers, one bad."""
    from data_pipeline.synthetic import generate_task
    from mpo.model.tiny import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("build_pairs_cli")
    model = write_tiny_checkpoint(root / "model", seed=0, image_size=224)
    task = generate_task(root / "synth", seed=0, num_train=0, num_pairs_questions=4, num_test=0, image_size=64)
    rows = [json.loads(line) for line in Path(task["questions"]["build"]).read_text().splitlines()]
    rows += [
        {"id": "open_0", "image": "images/build_00000.png", "question": "<image>\nDescribe the picture.",
         "source": "open"},
        {"id": "open_1", "question": "Name three shapes.", "source": "open"},
        {"id": "broken", "image": "images/nope.png", "question": "<image>\nWhat?", "answer": "1", "source": "open"},
    ]
    questions = root / "synth" / "questions" / "mixed.jsonl"
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cwd = root / "cwd"
    cwd.mkdir()
    return {"root": root, "model": model, "questions": questions, "image_root": root / "synth", "cwd": cwd,
            "num_questions": len(rows) - 1}  # valid ones


def base_args(inputs, out: Path) -> list[str]:
    return [f"model={inputs['model']}", f"questions={inputs['questions']}", f"image_root={inputs['image_root']}",
            f"output_dir={out}", *SETTINGS]


@pytest.fixture(scope="module")
def full_run(inputs):
    out = inputs["root"] / "full"
    proc = run_cli(base_args(inputs, out), inputs["cwd"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_end_to_end_writes_an_mmpr_dir_the_trainer_loads(inputs, full_run):
    from mpo.data.dataset import DataConfig, MMPRDataset, PreferenceSample
    from mpo.data.template import ChatTemplate
    from mpo.data.validate import validate
    from mpo.model.load import load_processor

    out, proc = full_run
    assert "merged" in proc.stdout and "samples/s" in proc.stdout
    assert list(inputs["cwd"].iterdir()) == []  # Hydra wrote nothing into the working directory
    meta = json.loads((out / "meta.json").read_text())
    ntp = [name for name in meta if name.endswith("_prefix_pair_sr0.5_wo_image")]
    assert "open_prefix_pair_sr0.5_wo_image" in ntp  # the answer-less questions always give Dropout-NTP pairs
    for name, entry in meta.items():
        assert entry["annotation"] == f"{name}.jsonl" and entry["repeat_time"] == 1
        assert entry["root"] == "../synth"
        assert entry["length"] == len((out / entry["annotation"]).read_text().splitlines()) > 0

    stats = json.loads((out / "stats.json").read_text())
    total = stats["total"]
    assert total["questions"] == inputs["num_questions"]  # the bad record is a reject, not a question
    assert total["rejects"] == {"missing_image": 1}
    gt = total["ground_truth"]
    assert gt["samples"] == 2 * gt["questions"] and gt["questions"] + total["dropout_ntp"]["questions"] == 6
    assert sum(total["pairs"].values()) == sum(e["length"] for e in meta.values())
    assert [json.loads(line)["id"] for line in (out / "rejects.jsonl").read_text().splitlines()] == ["broken"]

    processor = load_processor(inputs["model"])
    template = ChatTemplate(processor.tokenizer, tokens_per_tile=64, system_prompt=None)
    dataset = MMPRDataset(out, template, DataConfig(max_length=4096, max_dynamic_patch=1, tile_size=224))
    assert len(dataset) == sum(e["length"] for e in meta.values())
    items = [dataset[i] for i in range(len(dataset))]
    assert all(isinstance(item, PreferenceSample) for item in items), [i for i in items if not isinstance(i, PreferenceSample)]
    with_image = [item for item in items if item.pixel_values is not None]
    assert with_image and all(item.num_image_tokens == 64 for item in with_image)
    summary = validate(out, model_dir=str(inputs["model"]), rejects_path=inputs["root"] / "validate_rejects.jsonl")
    assert summary["rejected"] == 0 and summary["accepted"] == len(dataset)


def in_process(inputs, out: Path, **overrides):
    """build_pairs in this process with the same settings as SETTINGS (saves a process start)."""
    from data_pipeline.driver import build_pairs
    from mpo.build_pairs import BuildConfig, DropoutNTPSection

    return build_pairs(BuildConfig(
        model_dir=str(inputs["model"]), questions=str(inputs["questions"]), image_root=str(inputs["image_root"]),
        output_dir=str(out), samples_per_question=2, max_new_tokens=8, max_dynamic_patch=1, temperature=1.0,
        dropout_ntp=DropoutNTPSection(share=0.5), system_prompt="", progress=False, seed=3, device="cpu",
        **overrides))


def assert_same_files(out: Path, full: Path) -> None:
    for path in full.iterdir():
        if path.is_file() and path.name != "build_config.json":
            assert (out / path.name).read_bytes() == path.read_bytes(), path.name


def test_kill_and_resume_through_the_cli_matches_the_full_run(inputs, full_run):
    full, _ = full_run
    out = inputs["root"] / "resumed"
    first = in_process(inputs, out, stop_after_questions=2)  # the interrupted first run
    assert first.shard.stopped_early and first.merge is None and not (out / "meta.json").exists()
    shard = out / "shards" / "shard-00000-of-00001.jsonl"
    assert len(shard.read_text().splitlines()) == 2
    with shard.open("a") as fh:
        fh.write('{"id": "build_00003", "source": "synthe')  # the kill cut the next line short
    second = run_cli(["build-pairs", *base_args(inputs, out)], inputs["cwd"], module=("-m", "mpo.cli"))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "2 already done" in second.stdout
    ids = [json.loads(line)["id"] for line in shard.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == inputs["num_questions"]
    assert_same_files(out, full)


def test_one_question_per_call_gives_the_same_files(inputs, full_run):
    """The real engine: questions sampled together (the default) equal questions sampled one at a time."""
    full, _ = full_run
    out = inputs["root"] / "one_per_call"
    in_process(inputs, out, questions_per_call=1)
    assert_same_files(out, full)
    shard = "shards/shard-00000-of-00001.jsonl"
    assert (out / shard).read_bytes() == (full / shard).read_bytes()


def test_bad_settings_exit_with_a_message(inputs):
    out = inputs["root"] / "bad"
    proc = run_cli([*base_args(inputs, out), "samples_per_question=0", "dropout_ntp.ratio=2"], inputs["cwd"])
    assert proc.returncode == 2
    assert "samples_per_question=0 must be >= 1" in proc.stderr and "dropout_ntp.ratio=2" in proc.stderr
    assert "Traceback" not in proc.stderr
