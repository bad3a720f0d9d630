"""SLURM process-group variables (engine.slurm_dist_env) and preemption handling (mpo/train/preempt.py),
without a cluster: signals are sent to this process, scontrol is a fake."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
import torch

from mpo.train import preempt
from mpo.train.engine import slurm_dist_env

# What srun exports to task 1 of a 2-task step on one node (trimmed from a real 22.05 job).
SRUN_TASK1 = {"SLURM_JOB_ID": "45678", "SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_NTASKS": "2",
              "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "vm"}


def no_scontrol(nodelist: str) -> list[str]:
    raise AssertionError(f"scontrol must not be called for {nodelist}")


# ------------------------------------------------------------------------------------- slurm_dist_env
def test_srun_task_gets_rank_world_local_rank_and_job_port():
    env = slurm_dist_env(SRUN_TASK1, no_scontrol)
    # port: 20000 + 45678 % 20000 = 20000 + 5678
    assert env == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "25678"}


def test_multi_node_master_is_first_host_of_nodelist():
    calls = []

    def expand(nodelist):
        calls.append(nodelist)
        return ["gpu-a07", "gpu-a08", "gpu-b01"]

    environ = dict(SRUN_TASK1, SLURM_PROCID="13", SLURM_LOCALID="5", SLURM_NTASKS="24", SLURM_STEP_NUM_TASKS="24",
                   SLURM_JOB_NUM_NODES="3", SLURM_JOB_NODELIST="gpu-a[07-08],gpu-b01", SLURM_JOB_ID="7")
    env = slurm_dist_env(environ, expand)
    assert calls == ["gpu-a[07-08],gpu-b01"]
    assert env == {"RANK": "13", "WORLD_SIZE": "24", "LOCAL_RANK": "5", "MASTER_ADDR": "gpu-a07", "MASTER_PORT": "20007"}


def test_step_task_count_wins_over_allocation_count():
    # `srun --ntasks=2` inside an 8-task allocation: the process group has the step's 2 ranks.
    environ = dict(SRUN_TASK1, SLURM_NTASKS="8", SLURM_STEP_NUM_TASKS="2")
    assert slurm_dist_env(environ, no_scontrol)["WORLD_SIZE"] == "2"
    del environ["SLURM_STEP_NUM_TASKS"]
    assert slurm_dist_env(environ, no_scontrol)["WORLD_SIZE"] == "8"


def test_explicit_master_addr_and_port_are_kept():
    env = slurm_dist_env(dict(SRUN_TASK1, MASTER_ADDR="10.0.0.5", MASTER_PORT="29500", SLURM_JOB_NUM_NODES="2"),
                         no_scontrol)
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("10.0.0.5", "29500")


@pytest.mark.parametrize("change", [
    {"RANK": "0"},  # torchrun (or the user) already set the process group
    {"SLURM_STEP_ID": None},  # the batch script's own shell: SLURM_PROCID=0 but no srun step
    {"SLURM_PROCID": None},  # not a SLURM task at all
    {"SLURM_NTASKS": None, "SLURM_STEP_NUM_TASKS": None},
    {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1"},  # one task: the free-port fallback
])
def test_not_an_srun_task_derives_nothing(change):
    environ = {k: v for k, v in {**SRUN_TASK1, **change}.items() if v is not None}
    assert slurm_dist_env(environ, no_scontrol) == {}
    assert slurm_dist_env({}, no_scontrol) == {}


def test_bad_slurm_values_raise_with_the_fix():
    with pytest.raises(ValueError, match="SLURM_PROCID=2 is outside the step's 2 tasks"):
        slurm_dist_env(dict(SRUN_TASK1, SLURM_PROCID="2"), no_scontrol)
    with pytest.raises(ValueError, match="set MASTER_PORT"):
        slurm_dist_env(dict(SRUN_TASK1, SLURM_JOB_ID="12_3"), no_scontrol)
    with pytest.raises(ValueError, match="set MASTER_ADDR"):
        slurm_dist_env({k: v for k, v in SRUN_TASK1.items() if k != "SLURM_JOB_NODELIST"} | {"SLURM_JOB_NUM_NODES": "2"},
                       no_scontrol)


# ------------------------------------------------------------------------------------- PreemptionFlag
def test_flag_records_first_signal_and_restores_handlers():
    def previous(signum, frame):
        raise AssertionError("the previous handler must not run while the flag is installed")

    old = signal.signal(signal.SIGUSR1, previous)
    try:
        flag = preempt.PreemptionFlag().install()
        assert not flag.is_set and flag.agreed(1, torch.device("cpu")) is False
        os.kill(os.getpid(), signal.SIGUSR1)  # delivered to the main thread before kill returns to Python code
        os.kill(os.getpid(), signal.SIGTERM)  # the process survives: only the flag is set
        assert flag.signum == signal.SIGUSR1 and flag.is_set
        assert flag.agreed(1, torch.device("cpu")) is True
        assert flag.previous[signal.SIGUSR1] is previous
        flag.uninstall()
        assert signal.getsignal(signal.SIGUSR1) is previous
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_submitit_signal_default_and_bad_name():
    assert preempt.submitit_signal({}) == signal.SIGUSR2
    assert preempt.submitit_signal({"SUBMITIT_PREEMPT_SIGNAL": "USR1"}) == signal.SIGUSR1
    with pytest.raises(ValueError, match="SUBMITIT_PREEMPT_SIGNAL names no signal"):
        preempt.submitit_signal({"SUBMITIT_PREEMPT_SIGNAL": "NOPE"})


# ------------------------------------------------------------------------------------- requeue decision
# Records as `scontrol -o show job` shows them during SIGTERM handling (observed on slurmctld 22.05).
RUNNING = {"JobState": "RUNNING", "Reason": "None", "Restarts": "0"}
SCANCELLED = {"JobState": "COMPLETING", "Reason": "None", "Restarts": "0"}
TIMED_OUT = {"JobState": "COMPLETING", "Reason": "TimeLimit", "Restarts": "0"}
SLURM_REQUEUED = {"JobState": "COMPLETING", "Reason": "None", "Restarts": "1"}


@pytest.mark.parametrize("environ, job, action", [
    ({}, RUNNING, "none"),
    ({"SLURM_JOB_ID": "5"}, RUNNING, "scontrol"),
    ({"SLURM_JOB_ID": "5"}, TIMED_OUT, "scontrol"),
    ({"SLURM_JOB_ID": "5"}, SCANCELLED, "cancelled"),
    ({"SLURM_JOB_ID": "5"}, SLURM_REQUEUED, "already_requeued"),
    ({"SLURM_JOB_ID": "5"}, {"JobState": "PENDING", "Restarts": "0"}, "already_requeued"),
    # second run of a requeued job (SLURM_RESTART_COUNT=1): Restarts=1 is this run, not a new requeue
    ({"SLURM_JOB_ID": "5", "SLURM_RESTART_COUNT": "1"}, {**RUNNING, "Restarts": "1"}, "scontrol"),
    ({"SLURM_JOB_ID": "5", "SLURM_RESTART_COUNT": "1"}, {**SLURM_REQUEUED, "Restarts": "2"}, "already_requeued"),
    ({"SLURM_JOB_ID": "5"}, None, "scontrol"),  # record unreadable: try
    ({"SLURM_JOB_ID": "5", "SUBMITIT_EXECUTOR": "slurm"}, RUNNING, "submitit"),
    ({"SLURM_JOB_ID": "5", "SUBMITIT_EXECUTOR": "slurm"}, SCANCELLED, "cancelled"),
])
def test_requeue_action(environ, job, action):
    assert preempt.requeue_action(environ, job) == action


def test_parse_job_record_of_a_real_line():
    line = ("JobId=11 JobName=train job UserId=root(0) JobState=COMPLETING Reason=None Dependency=(null) "
            "Requeue=1 Restarts=1 BatchFlag=1 TimeLimit=UNLIMITED Command=/tmp/x.sh a=b\n")
    record = preempt.parse_job_record(line)
    assert record["JobState"] == "COMPLETING" and record["Restarts"] == "1" and record["Reason"] == "None"
    assert record["JobName"] == "train" and record["Command"] == "/tmp/x.sh"
    assert preempt.parse_job_record("") == {}


class FakeScontrol:
    """Answers `show job` with a record and `requeue` with a return code; records the calls."""

    def __init__(self, record: str, requeue_rc: int = 0, requeue_err: str = ""):
        self.record, self.requeue_rc, self.requeue_err, self.calls = record, requeue_rc, requeue_err, []

    def __call__(self, args):
        self.calls.append(args)
        if args[-3:-1] == ["show", "job"]:
            return subprocess.CompletedProcess(args, 0, self.record, "")
        return subprocess.CompletedProcess(args, self.requeue_rc, "", self.requeue_err)


def test_requeue_runs_scontrol_requeue_for_a_running_job(capsys):
    fake = FakeScontrol("JobId=9 JobState=RUNNING Reason=None Restarts=0")
    outcome = preempt.requeue_after_checkpoint(preempt.PreemptionFlag(), environ={"SLURM_JOB_ID": "9"}, scontrol=fake)
    assert outcome == "requeued"
    assert fake.calls == [["--oneliner", "show", "job", "9"], ["requeue", "9"]]
    assert "job 9 requeued" in capsys.readouterr().err


def test_requeue_skips_cancelled_and_already_requeued_jobs():
    for record, outcome in (("JobState=COMPLETING Reason=None Restarts=0", "cancelled"),
                            ("JobState=COMPLETING Reason=None Restarts=1", "already_requeued")):
        fake = FakeScontrol(record)
        assert preempt.requeue_after_checkpoint(preempt.PreemptionFlag(), environ={"SLURM_JOB_ID": "9"},
                                                scontrol=fake) == outcome
        assert [c[0] for c in fake.calls] == ["--oneliner"]  # no requeue command


def test_requeue_failure_is_reported_not_raised():
    fake = FakeScontrol("JobState=RUNNING Restarts=0", requeue_rc=1, requeue_err="Requested operation is presently disabled\n")
    outcome = preempt.requeue_after_checkpoint(preempt.PreemptionFlag(), environ={"SLURM_JOB_ID": "9"}, scontrol=fake)
    assert outcome == "failed: Requested operation is presently disabled"


def test_not_under_slurm_does_nothing():
    fake = FakeScontrol("")
    assert preempt.requeue_after_checkpoint(preempt.PreemptionFlag(), environ={}, scontrol=fake) == "none"
    assert fake.calls == []


def test_under_submitit_its_handler_requeues():
    received = []
    flag = preempt.PreemptionFlag()
    flag.previous = {signal.SIGUSR2: lambda signum, frame: received.append(signum), signal.SIGTERM: signal.SIG_DFL}
    environ = {"SLURM_JOB_ID": "9", "SUBMITIT_EXECUTOR": "slurm"}
    fake = FakeScontrol("JobState=RUNNING Restarts=0")
    assert preempt.requeue_after_checkpoint(flag, environ=environ, scontrol=fake) == "requeued"
    assert received == [signal.SIGUSR2]
    assert [c[0] for c in fake.calls] == ["--oneliner"]  # submitit runs its own scontrol requeue
    # Without submitit's handler (not started by submitit's runner) the plain requeue is used.
    flag.previous = {signal.SIGUSR2: signal.SIG_DFL}
    fake = FakeScontrol("JobState=RUNNING Restarts=0")
    assert preempt.requeue_after_checkpoint(flag, environ=environ, scontrol=fake) == "requeued"
    assert fake.calls[-1] == ["requeue", "9"]
