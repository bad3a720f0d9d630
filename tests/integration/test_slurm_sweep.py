"""A Hydra multirun of tiny_cpu sent to SLURM by hydra-submitit-launcher (`hydra/launcher=slurm`), on the
one-node test cluster; one of the two jobs gets submitit's preemption signal mid-training.

    bash .ci/install_slurm.sh && python -m pytest tests/integration/test_slurm_sweep.py -q
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[2]
MAX_STEPS = 12


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]


def job_dir(sweep: Path, num: int) -> Path | None:
    found = sorted(p for p in sweep.glob(f"{num}_*") if p.is_dir())
    return found[0] if found else None


def job_logs(sweep: Path, suffix: str) -> str:
    """stdout + stderr of the sweep job whose submitit folder ends with `suffix` ("_0": job 0)."""
    folders = [p for p in (sweep / ".submitit").glob(f"*{suffix}")] if (sweep / ".submitit").is_dir() else []
    return "".join(f.read_text(errors="replace") for d in folders for f in sorted(d.glob("*_log.*")))


def test_two_job_sweep_through_submitit_with_a_preempted_job(slurm_cluster, monkeypatch, tmp_path_factory, tmp_path):
    submitit = pytest.importorskip("submitit")
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cache = tmp_path_factory.getbasetemp() / "slurm_mpo_cache"  # shared with the other SLURM training tests
    for key, value in {"MPO_CACHE": str(cache), "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
                       "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(key, value)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), "-m", "+exp=tiny_cpu", "loss.beta=0.05,0.1",
           "hydra/launcher=slurm", f"hydra.sweep.dir={sweep}", "hydra.launcher.gpus_per_node=null",
           "hydra.launcher.tasks_per_node=1", "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=10",
           f"max_steps={MAX_STEPS}", "save_every=1000", "logger.progress=false", "logger.wandb=false"]
    # The client submits the array and waits for both results; submitit runs sbatch with this environment.
    client_log = tmp_path / "client.log"  # a file, not a pipe: nobody reads a pipe while we poll
    with client_log.open("w") as fh:
        client = subprocess.Popen(cmd, cwd=ROOT, env=slurm_cluster.env(), stdout=fh, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300  # generous: the first job of a session also builds the tiny assets
        while job_dir(sweep, 0) is None or len(logged_steps(job_dir(sweep, 0))) < 3:
            assert client.poll() is None, client_log.read_text()[-4000:]
            assert time.monotonic() < deadline, f"job 0 logged no third step:\n{job_logs(sweep, '_0')[-4000:]}"
            time.sleep(0.1)
        (array_task,) = [p.name for p in (sweep / ".submitit").iterdir() if p.name.endswith("_0")]
        # What SLURM sends signal_delay_s before the time limit (--signal=USR2@N): submitit's preemption signal.
        slurm_cluster.run(["scancel", f"--signal={submitit.JobEnvironment.USR_SIG}", array_task])
        try:
            client.wait(timeout=400)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the sweep did not finish:\n{job_logs(sweep, '_0')[-3000:]}\n"
                                 f"{job_logs(sweep, '_1')[-3000:]}") from None
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    assert client.returncode == 0, client_log.read_text()[-4000:]

    for num, beta in ((0, 0.05), (1, 0.1)):
        run = job_dir(sweep, num)
        assert f"loss.beta={beta}" in run.name  # a run directory per job, named by its parameters
        assert f"- loss.beta={beta}" in (run / ".hydra" / "overrides.yaml").read_text()
        assert json.loads((run / "train_config.json").read_text())["loss"]["beta"] == beta
        assert logged_steps(run) == list(range(1, MAX_STEPS + 1))
        assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{MAX_STEPS:08d}"
        assert (run / "final" / "config.json").exists()
    assert "- loss.beta=0.05,0.1" in (sweep / "multirun.yaml").read_text()  # the sweep's own record

    log = job_logs(sweep, "_0")
    saved = re.findall(r"preempted: saved checkpoint step_(\d+)", log)
    resumed = re.findall(r"resumed from step_(\d+)", log)
    assert len(saved) == 1 and resumed == saved and 3 <= int(saved[0]) < MAX_STEPS, log[-4000:]
    assert "requeue through submitit" in log and f"Requeued job {array_task}" in log
    other = job_logs(sweep, "_1")
    assert "resumed from" not in other and "preempted" not in other
