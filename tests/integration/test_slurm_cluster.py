"""Real jobs through the one-node test cluster: batch, multi-task srun, arrays, requeue, submitit.

    bash .ci/install_slurm.sh && python -m pytest tests/integration/test_slurm_cluster.py -q
"""

from __future__ import annotations

import sys
import time

import pytest
import slurm_cluster as slurm_cluster_module
from slurm_cluster import SlurmCluster, SlurmError, parse_scontrol_records, slurm_available

pytestmark = pytest.mark.slurm


def test_single_task_job_writes_file_and_completes(slurm_cluster, tmp_path):
    out = tmp_path / "out.txt"
    job_id = slurm_cluster.sbatch(f"#!/bin/bash\necho \"hello $SLURM_JOB_ID $SLURM_JOB_PARTITION\" > {out}\n")
    assert slurm_cluster.wait(job_id, timeout=60) == "COMPLETED"
    assert out.read_text() == f"hello {job_id} debug\n"
    (record,) = slurm_cluster.job_records(job_id)
    assert record["ExitCode"] == "0:0"
    assert record["Partition"] == "debug"


def test_failing_job_reports_failed_with_exit_code(slurm_cluster):
    job_id = slurm_cluster.sbatch("#!/bin/bash\nexit 3\n")
    assert slurm_cluster.wait(job_id, timeout=60) == "FAILED"
    assert slurm_cluster.job_records(job_id)[0]["ExitCode"] == "3:0"


def test_two_task_job_runs_both_ranks(slurm_cluster, tmp_path):
    # Each srun task writes its rank and the task count into its own file.
    script = (
        "#!/bin/bash\n"
        "#SBATCH --ntasks=2\n"
        f"srun bash -c 'echo \"$SLURM_PROCID $SLURM_NTASKS\" > {tmp_path}/rank-$SLURM_PROCID.txt'\n"
    )
    job_id = slurm_cluster.sbatch(script)
    assert slurm_cluster.wait(job_id, timeout=60) == "COMPLETED"
    ranks = sorted(p.read_text().split()[0] for p in tmp_path.glob("rank-*.txt"))
    assert ranks == ["0", "1"]
    assert {p.read_text().split()[1] for p in tmp_path.glob("rank-*.txt")} == {"2"}
    assert slurm_cluster.job_records(job_id)[0]["NumTasks"] == "2"


def test_array_job_runs_each_task(slurm_cluster, tmp_path):
    script = f"#!/bin/bash\necho \"$SLURM_ARRAY_JOB_ID $SLURM_ARRAY_TASK_ID\" > {tmp_path}/task-$SLURM_ARRAY_TASK_ID.txt\n"
    job_id = slurm_cluster.sbatch(script, "--array=0-1")
    assert slurm_cluster.wait(job_id, timeout=60) == "COMPLETED"
    assert slurm_cluster.states(job_id) == {f"{job_id}_0": "COMPLETED", f"{job_id}_1": "COMPLETED"}
    assert (tmp_path / "task-0.txt").read_text() == f"{job_id} 0\n"
    assert (tmp_path / "task-1.txt").read_text() == f"{job_id} 1\n"


def test_requeued_job_restarts_with_restart_count(slurm_cluster, tmp_path):
    starts = tmp_path / "starts.txt"
    # The first run sleeps long enough to be requeued mid-run; the second run finishes quickly.
    script = (
        "#!/bin/bash\n"
        f"echo \"start ${{SLURM_RESTART_COUNT:-0}}\" >> {starts}\n"
        "if [ \"${SLURM_RESTART_COUNT:-0}\" = 0 ]; then sleep 60; else sleep 1; fi\n"
    )
    job_id = slurm_cluster.sbatch(script)
    deadline = time.monotonic() + 60
    while not starts.exists():
        assert time.monotonic() < deadline, f"job {job_id} never started: {slurm_cluster.state(job_id)}"
        time.sleep(0.2)
    slurm_cluster.requeue(job_id)
    # The requeued job waits cred_expire_s (10 s) before it may start again.
    assert slurm_cluster.wait(job_id, timeout=90) == "COMPLETED"
    assert starts.read_text().splitlines() == ["start 0", "start 1"]
    assert slurm_cluster.job_records(job_id)[0]["Restarts"] == "1"


def test_wait_times_out_then_cancel(slurm_cluster):
    job_id = slurm_cluster.sbatch("#!/bin/bash\nsleep 120\n")
    assert slurm_cluster.wait(job_id, timeout=60, states={"RUNNING"}) == "RUNNING"
    with pytest.raises(TimeoutError, match=f"job {job_id} not in") as excinfo:
        slurm_cluster.wait(job_id, timeout=1)
    assert "--- slurmctld.log ---" in str(excinfo.value)  # daemon logs come with the error
    slurm_cluster.cancel(job_id)
    assert slurm_cluster.wait(job_id, timeout=60) == "CANCELLED"


def test_submitit_runs_a_python_function(slurm_cluster, tmp_path, monkeypatch):
    submitit = pytest.importorskip("submitit")
    # submitit runs sbatch with this process's environment, so SLURM_CONF must be in os.environ.
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf_path))

    def add_in_job(a: int, b: int) -> tuple[int, str, str]:
        import os
        import sys as job_sys

        return a + b, os.environ["SLURM_JOB_ID"], job_sys.executable

    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    executor.update_parameters(slurm_partition="debug", timeout_min=5)
    job = executor.submit(add_in_job, 2, 3)
    # Without accounting storage submitit's `sacct` polls fail (it logs a warning and falls back
    # to the result file; job.state stays UNKNOWN), so bound the wait with scontrol's view.
    assert slurm_cluster.wait(job.job_id, timeout=90) == "COMPLETED"
    total, job_env_id, job_python = job.result()
    assert total == 5
    assert job_env_id == job.job_id
    assert job_python == sys.executable


def test_sbatch_rejects_script_without_interpreter(slurm_cluster):
    with pytest.raises(ValueError, match="interpreter line"):
        slurm_cluster.sbatch("echo no shebang\n")


def test_unknown_job_raises(slurm_cluster):
    with pytest.raises(SlurmError, match="does not know job 999999"):
        slurm_cluster.state(999999)


def test_client_env_drops_inherited_slurm_variables(slurm_cluster):
    env = slurm_cluster.env({"PATH": "/bin", "SLURM_JOB_ID": "7", "SBATCH_PARTITION": "gpu", "HOME": "/h"})
    assert env["SLURM_CONF"] == str(slurm_cluster.conf_path)
    assert "SLURM_JOB_ID" not in env and "SBATCH_PARTITION" not in env
    assert env["HOME"] == "/h"
    assert env["PATH"].split(":")[0] == "/bin" and "/usr/sbin" in env["PATH"].split(":")


def test_parse_scontrol_records_keeps_values_with_spaces():
    text = ("JobId=5 ArrayJobId=4 ArrayTaskId=1 JobName=my job name JobState=RUNNING Reason=None\n"
            "\n"
            "JobId=6 JobName=x JobState=PENDING Command=/bin/run a b\n")
    assert parse_scontrol_records(text) == [
        {"JobId": "5", "ArrayJobId": "4", "ArrayTaskId": "1", "JobName": "my job name", "JobState": "RUNNING",
         "Reason": "None"},
        {"JobId": "6", "JobName": "x", "JobState": "PENDING", "Command": "/bin/run a b"},
    ]


def test_slurm_available_names_missing_binaries(monkeypatch, tmp_path):
    monkeypatch.setattr(slurm_cluster_module, "_SEARCH_PATH", str(tmp_path))  # an empty dir
    ok, reason = slurm_available()
    assert not ok
    assert "slurmctld" in reason and "sbatch" in reason and ".ci/install_slurm.sh" in reason


def test_paths_before_start_raise():
    with pytest.raises(SlurmError, match="not started"):
        SlurmCluster().conf_path


@pytest.mark.parametrize("kwargs, message", [
    ({"num_cpus": 0}, "num_cpus must be >= 1"),
    ({"cred_expire_s": 2}, "cred_expire_s must be >= 5"),
    ({"min_job_age_s": 0}, "min_job_age_s must be >= 2"),
    ({"start_timeout_s": 0}, "start_timeout_s must be > 0"),
])
def test_bad_cluster_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SlurmCluster(**kwargs)
