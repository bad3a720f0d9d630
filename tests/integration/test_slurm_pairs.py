"""The pair builder as a SLURM array job (launch/slurm/build_pairs.sbatch): two array tasks sample a shard each,
a dependent job merges them, and the merged MMPR directory equals a single-process run's.

    bash .ci/install_slurm.sh && python -m pytest tests/integration/test_slurm_pairs.py -q
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "launch" / "slurm" / "build_pairs.sbatch"
SETTINGS = ["samples_per_question=2", "max_new_tokens=8", "max_dynamic_patch=1", "temperature=1.0",
            "dropout_ntp.share=0.5", "system_prompt=", "progress=false", "seed=3", "device=cpu"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A 224-px tiny checkpoint and six synthetic questions plus one without an answer (Dropout-NTP)."""
    from data_pipeline.synthetic import generate_task
    from mpo.model.tiny import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("slurm_pairs")
    model = write_tiny_checkpoint(root / "model", seed=0, image_size=224)
    task = generate_task(root / "synth", seed=0, num_train=0, num_pairs_questions=6, num_test=0, image_size=64)
    rows = [json.loads(line) for line in Path(task["questions"]["build"]).read_text().splitlines()]
    rows.append({"id": "open_0", "image": "images/build_00000.png", "question": "<image>\nDescribe the picture.",
                 "source": "open"})
    questions = root / "synth" / "questions" / "mixed.jsonl"
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root, "model": model, "questions": questions, "image_root": root / "synth", "num_questions": len(rows)}


def sbatch(cluster, *args: str) -> str:
    return cluster.run(["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10", *args],
                       cwd=ROOT).stdout.strip().split(";")[0]


def test_array_job_over_two_shards_merges_to_the_single_process_result(slurm_cluster, inputs, monkeypatch, tmp_path):
    pytest.importorskip("mpo.build_pairs")
    from data_pipeline.driver import build_pairs
    from mpo.build_pairs import BuildConfig, DropoutNTPSection

    for key, value in {"PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                       "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(key, value)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    out, single = tmp_path / "pairs", tmp_path / "single"
    common = [f"model={inputs['model']}", f"questions={inputs['questions']}", f"image_root={inputs['image_root']}",
              f"output_dir={out}", *SETTINGS]
    # The documented two-step flow: sample with an array, merge once every task has succeeded.
    array_id = sbatch(slurm_cluster, "--array=0-1", f"--output={tmp_path}/sample-%a.out", str(TEMPLATE), *common,
                      "stage=sample")
    merge_id = sbatch(slurm_cluster, f"--dependency=afterok:{array_id}", f"--output={tmp_path}/merge.out", str(TEMPLATE),
                      f"output_dir={out}", "stage=merge")

    # Meanwhile the reference: one process, no sharding (same settings as SETTINGS).
    cfg = BuildConfig(model_dir=str(inputs["model"]), questions=str(inputs["questions"]),
                      image_root=str(inputs["image_root"]), output_dir=str(single), samples_per_question=2,
                      max_new_tokens=8, max_dynamic_patch=1, temperature=1.0, dropout_ntp=DropoutNTPSection(share=0.5),
                      system_prompt="", progress=False, seed=3, device="cpu")
    reference = build_pairs(cfg, env={})
    assert reference.merge is not None and reference.merge.files

    logs = lambda: "\n".join(p.read_text() for p in sorted(tmp_path.glob("*.out")))  # noqa: E731
    assert slurm_cluster.wait(array_id, timeout=240) == "COMPLETED", logs()[-4000:]
    assert slurm_cluster.states(array_id) == {f"{array_id}_0": "COMPLETED", f"{array_id}_1": "COMPLETED"}
    assert slurm_cluster.wait(merge_id, timeout=120) == "COMPLETED", logs()[-4000:]

    shards = {p.name: len(p.read_text().splitlines()) for p in (out / "shards").glob("*.jsonl")}
    assert sorted(shards) == ["shard-00000-of-00002.jsonl", "shard-00001-of-00002.jsonl"]
    assert all(n > 0 for n in shards.values()) and sum(shards.values()) == inputs["num_questions"]  # both did work
    compared = [p.name for p in single.iterdir() if p.is_file() and p.name != "build_config.json"]
    assert "meta.json" in compared and "stats.json" in compared
    for name in compared:
        assert (out / name).read_bytes() == (single / name).read_bytes(), name
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == sorted(p.name for p in single.iterdir() if p.is_file())
