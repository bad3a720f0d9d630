"""Preemption and time limits on SLURM: stop signals become "checkpoint at the end of this step, requeue".

SLURM ends a job with SIGTERM (scancel, time limit, preemption, `scontrol requeue`) and, when asked
with `--signal=USR2@SECONDS` (submitit: `signal_delay_s`), warns the tasks of its srun steps that
many seconds before the time limit (`B:USR2@...` would warn only the batch shell, not the ranks).
`PreemptionFlag` turns SIGTERM/SIGUSR1/SIGUSR2 into a flag instead of an exit; the training loop
asks `flag.agreed(...)` once per optimizer step (one all-reduce MAX, so a rank that missed the
signal still stops with the others), saves a checkpoint, and then calls `requeue_after_checkpoint`
on rank 0. The requeued job starts the same command in the same run directory and resumes from
`checkpoints/latest`.

What `requeue_after_checkpoint` does depends on the job's record in `scontrol show job`
(`requeue_action`; the cases were checked against slurmctld 22.05, where an ending job shows
JobState=COMPLETING whatever ended it):

    not under SLURM                          -> nothing (rerun the command to resume)
    Restarts above this run's SLURM_RESTART_COUNT, or PENDING
        (`scontrol requeue`, preemption with PreemptMode=REQUEUE) -> nothing: SLURM requeued it already
    RUNNING (a --signal warning, `scancel --signal`), or Reason=TimeLimit -> requeue
    ending for any other reason (`scancel`)  -> nothing: requeueing would bring a cancelled job back

"Requeue" is `scontrol requeue $SLURM_JOB_ID`, or under submitit its own handler, which dumps the
job, counts timeouts against `max_num_timeout`, runs `scontrol requeue` and exits the process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

# Job states in which SLURM itself has already put the job back in the queue.
_QUEUED_STATES = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"})


class PreemptionFlag:
    """Records the first stop signal this process receives; restores the previous handlers on `uninstall`.

    Install it before starting DataLoader workers: forked workers inherit the handler, so SLURM's
    SIGTERM to every process of the step does not kill them mid-step (with the default handler a
    worker dies and the next batch fails with "DataLoader worker killed").
    """

    def __init__(self, signals: Sequence[int] = STOP_SIGNALS):
        self.signals = tuple(signals)
        self.signum: int | None = None
        self.previous: dict[int, object] = {}
        self._pid = os.getpid()

    def install(self) -> PreemptionFlag:
        """Install the handlers (main thread only, as Python requires); returns self."""
        self._pid = os.getpid()
        for sig in self.signals:
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Put back the handlers that were installed before `install` (submitit's, or the defaults)."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def _handle(self, signum: int, frame) -> None:
        # Only set a flag: the checkpoint must be written between steps, not from inside a collective.
        if self.signum is None:
            self.signum = signum
            if os.getpid() == self._pid:  # forked DataLoader workers inherit the handler; they stay quiet
                # os.write, not print: a handler that interrupts a print to stderr must not re-enter its buffer
                os.write(2, f"[mpo] received {signal.Signals(signum).name}: checkpoint at the end of this step, "
                            "then stop\n".encode())

    @property
    def is_set(self) -> bool:
        return self.signum is not None

    def agreed(self, world_size: int, device: torch.device) -> bool:
        """Whether any rank received a stop signal. Collective: call it on every rank at the same point.

        One all-reduce (MAX) of a single number and one host sync per call, so call it once per
        optimizer step, not per micro-step.
        """
        if world_size == 1:
            return self.is_set
        flag = torch.tensor([1.0 if self.is_set else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)  # host sync: every rank must take the same branch


def under_submitit(environ: Mapping[str, str]) -> bool:
    """Whether this process is a submitit SLURM job (submitit exports SUBMITIT_EXECUTOR=slurm)."""
    return environ.get("SUBMITIT_EXECUTOR") == "slurm"


def submitit_signal(environ: Mapping[str, str]) -> int:
    """The signal submitit's requeue handler listens to (SUBMITIT_PREEMPT_SIGNAL, default USR2)."""
    name = "SIG" + environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    sig = getattr(signal, name, None)
    if not isinstance(sig, signal.Signals):
        raise ValueError(f"SUBMITIT_PREEMPT_SIGNAL names no signal ({name}); use USR1 or USR2")
    return sig


def requeue_action(environ: Mapping[str, str], job: Mapping[str, str] | None) -> str:
    """What to do after the preemption checkpoint; a pure decision (see the module docstring).

    Args:
        environ: the process environment (SLURM_JOB_ID, SLURM_RESTART_COUNT, SUBMITIT_EXECUTOR).
        job: this job's `scontrol show job` record as key -> value (`parse_job_record`), or None
            when it could not be read (then the requeue is attempted).

    Returns:
        "none" (not under SLURM), "already_requeued", "cancelled", "submitit" or "scontrol".
    """
    if not environ.get("SLURM_JOB_ID"):
        return "none"
    if job is not None:
        this_run = int(environ.get("SLURM_RESTART_COUNT") or 0)  # unset on the first run
        if int(job.get("Restarts") or 0) > this_run or job.get("JobState") in _QUEUED_STATES:
            return "already_requeued"
        if job.get("JobState") != "RUNNING" and job.get("Reason") != "TimeLimit":
            return "cancelled"
    return "submitit" if under_submitit(environ) else "scontrol"


def parse_job_record(scontrol_output: str) -> dict[str, str]:
    """Key -> value of `scontrol --oneliner show job ID` output (values with spaces keep only their first word)."""
    record = {}
    for token in scontrol_output.split():
        key, sep, value = token.partition("=")
        if sep and key not in record:
            record[key] = value
    return record


def _scontrol(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=60)


def requeue_after_checkpoint(flag: PreemptionFlag, *, environ: Mapping[str, str] | None = None,
                             scontrol: Callable[[list[str]], subprocess.CompletedProcess] = _scontrol) -> str:
    """Requeue this SLURM job after the preemption checkpoint is on disk. Call on rank 0 only, last.

    Under submitit this calls submitit's own signal handler, which exits the process (SystemExit)
    once the job is requeued, or raises `submitit.core.utils.UncompletedJobError` after
    `max_num_timeout` timeouts. Otherwise returns what was done: "requeued", or the reason nothing
    was ("none", "cancelled", "already_requeued", "failed: <scontrol's message>").
    """
    environ = os.environ if environ is None else environ
    job_id = environ.get("SLURM_JOB_ID")
    job = None
    if job_id:
        shown = scontrol(["--oneliner", "show", "job", job_id])
        job = parse_job_record(shown.stdout) if shown.returncode == 0 else None
    state = f"{job.get('JobState')}, Reason={job.get('Reason')}" if job else "state unknown"
    action = requeue_action(environ, job)
    if action == "none":
        return action
    if action == "submitit":
        handler = flag.previous.get(submitit_signal(environ))
        if callable(handler):
            print(f"[mpo] job {job_id} ({state}): requeue through submitit", file=sys.stderr, flush=True)
            handler(submitit_signal(environ), None)  # requeues and exits, or raises when out of timeouts
            return "requeued"
        action = "scontrol"  # submitit's handler is not installed (e.g. a plain function call)
    if action == "already_requeued":
        print(f"[mpo] job {job_id} ({state}): SLURM requeued it already; it resumes from the checkpoint",
              file=sys.stderr, flush=True)
        return action
    if action == "cancelled":
        print(f"[mpo] job {job_id} ({state}) is ending before its time limit (scancel): not requeued",
              file=sys.stderr, flush=True)
        return action
    result = scontrol(["requeue", job_id])
    if result.returncode != 0:
        message = (result.stderr or result.stdout).strip()
        print(f"[mpo] scontrol requeue {job_id} ({state}) failed: {message}", file=sys.stderr, flush=True)
        return f"failed: {message}"
    print(f"[mpo] job {job_id} requeued; it resumes from the checkpoint", file=sys.stderr, flush=True)
    return "requeued"
