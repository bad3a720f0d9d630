"""Training through SLURM on the one-node test cluster, with launch/slurm/train.sbatch as users submit it:
a 2-task ZeRO-2 job whose ranks come from SLURM's environment (srun, no torchrun), preemption signals
that save a checkpoint and requeue, `scontrol requeue` by SLURM, and `scancel`.

    bash .ci/install_slurm.sh && python -m pytest tests/integration/test_slurm_train.py -q
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "launch" / "slurm" / "train.sbatch"


@pytest.fixture
def job_env(monkeypatch, tmp_path_factory):
    """Client environment that jobs inherit: one tiny_cpu model/data cache for the whole session, CPU DeepSpeed."""
    cache = tmp_path_factory.getbasetemp() / "slurm_mpo_cache"  # same path for every test of the session
    for key, value in {"MPO_CACHE": str(cache), "PYTHON": sys.executable, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline",
                       "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(key, value)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)


def submit_training(cluster, out: Path, run_dir: Path, *overrides: str, num_tasks: int = 1) -> str:
    """`sbatch launch/slurm/train.sbatch +exp=tiny_cpu ...` on CPUs; returns the job id."""
    result = cluster.run([
        "sbatch", "--parsable", f"--output={out}", f"--ntasks-per-node={num_tasks}", "--gpus-per-node=0",
        "--cpus-per-task=1", "--time=10", str(TEMPLATE),
        "+exp=tiny_cpu", f"hydra.run.dir={run_dir}", "logger.progress=false", "logger.wandb=false", *overrides,
    ], cwd=ROOT)
    return result.stdout.strip().split(";")[0]


def wait_for_step(run_dir: Path, step: int, cluster, job_id: str, out: Path, timeout: float = 300.0) -> None:
    """Block until the run has logged `step` (generous timeout: the first job also builds the tiny assets)."""
    deadline = time.monotonic() + timeout
    while len(logged_steps(run_dir)) < step:
        state = cluster.state(job_id)
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
            raise AssertionError(f"job {job_id} is {state} before logging step {step}:\n{read(out)[-4000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} ({state}) logged no step {step} in {timeout:.0f} s:\n{read(out)[-4000:]}")
        time.sleep(0.1)


def final_state(cluster, job_id: str, out: Path, timeout: float = 300.0) -> str:
    try:
        return cluster.wait(job_id, timeout=timeout)
    except TimeoutError as err:
        raise TimeoutError(f"{err}\n--- job output ---\n{read(out)[-4000:]}") from None


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]


def read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def preempted_and_resumed_steps(log: str) -> tuple[list[int], list[int]]:
    saved = [int(s) for s in re.findall(r"preempted: saved checkpoint step_(\d+)", log)]
    resumed = [int(s) for s in re.findall(r"resumed from step_(\d+)", log)]
    return saved, resumed


def task_pid(cluster, job_id: str, global_rank: int) -> int:
    """PID of the srun task with this global rank in the job's first step (`scontrol listpids`)."""
    rows = [line.split() for line in cluster.run(["scontrol", "listpids", job_id]).stdout.splitlines()[1:]]
    pids = [int(r[0]) for r in rows if len(r) == 5 and r[2] != "batch" and r[4] == str(global_rank)]
    assert len(pids) == 1, rows
    return pids[0]


def test_two_task_zero2_job_signal_to_one_rank_checkpoints_requeues_and_resumes(slurm_cluster, job_env, tmp_path):
    out, run = tmp_path / "job.out", tmp_path / "run"
    max_steps = 16
    job_id = submit_training(slurm_cluster, out, run, "deepspeed=zero2", f"max_steps={max_steps}", "save_every=1000",
                             num_tasks=2)
    wait_for_step(run, 3, slurm_cluster, job_id, out)
    # Only rank 1 is told (as when one node gets the warning first); the per-step all-reduce stops rank 0 too.
    os.kill(task_pid(slurm_cluster, job_id, 1), signal.SIGUSR2)
    assert final_state(slurm_cluster, job_id, out) == "COMPLETED", read(out)[-4000:]

    log = read(out)
    saved, resumed = preempted_and_resumed_steps(log)
    assert log.count("received SIGUSR2") == 1, log[-4000:]  # rank 1 only
    assert f"job {job_id} requeued" in log  # rank 0 ran `scontrol requeue` itself
    assert len(saved) == 1 and resumed == saved and 3 <= saved[0] < max_steps, log[-4000:]
    assert re.search(rf"job {job_id} restart 1 on \S+: 2 ranks", log)
    assert slurm_cluster.job_records(job_id)[0]["Restarts"] == "1"
    # Every step logged exactly once: the rows after the checkpoint were redone, none lost.
    assert logged_steps(run) == list(range(1, max_steps + 1))
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{max_steps:08d}"
    # A 2-rank ZeRO-2 run: one optimizer shard per rank, rank 1's own rejects log, and the HF export.
    shards = sorted(p.name for p in (run / "checkpoints" / f"step_{max_steps:08d}").glob("*optim_states.pt"))
    assert shards == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert (run / "rejects.rank1.jsonl").exists()
    assert (run / "final" / "config.json").exists()


def test_scontrol_requeue_by_slurm_resumes_without_lost_steps(slurm_cluster, job_env, tmp_path):
    out, run = tmp_path / "job.out", tmp_path / "run"
    max_steps = 12
    job_id = submit_training(slurm_cluster, out, run, f"max_steps={max_steps}", "save_every=1000")
    wait_for_step(run, 3, slurm_cluster, job_id, out)
    slurm_cluster.requeue(job_id)  # SLURM sends SIGTERM and requeues the job itself
    assert final_state(slurm_cluster, job_id, out) == "COMPLETED", read(out)[-4000:]

    log = read(out)
    saved, resumed = preempted_and_resumed_steps(log)
    assert "received SIGTERM" in log and "SLURM requeued it already" in log, log[-4000:]
    assert len(saved) == 1 and resumed == saved and 3 <= saved[0] < max_steps, log[-4000:]
    assert slurm_cluster.job_records(job_id)[0]["Restarts"] == "1"
    assert logged_steps(run) == list(range(1, max_steps + 1))
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{max_steps:08d}"


def test_scancel_saves_a_checkpoint_and_does_not_requeue(slurm_cluster, job_env, tmp_path):
    out, run = tmp_path / "job.out", tmp_path / "run"
    job_id = submit_training(slurm_cluster, out, run, "max_steps=200", "save_every=1000")
    wait_for_step(run, 2, slurm_cluster, job_id, out)
    slurm_cluster.cancel(job_id)
    assert final_state(slurm_cluster, job_id, out, timeout=60) == "CANCELLED", read(out)[-4000:]

    log = read(out)
    saved, _ = preempted_and_resumed_steps(log)
    assert "received SIGTERM" in log and "not requeued" in log, log[-4000:]
    assert slurm_cluster.job_records(job_id)[0]["Restarts"] == "0"  # a requeue would have counted one
    assert len(saved) == 1 and saved[0] >= 2
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{saved[0]:08d}"
    assert logged_steps(run)[-1] == saved[0]  # stopped right after the step it saved
