"""A real one-node SLURM cluster (munged + slurmctld + slurmd) in a temp dir, for tests.

The cluster runs the Debian `slurm-wlm` daemons (install them with `bash .ci/install_slurm.sh`) as
plain child processes: no systemd, no /etc/slurm, no cgroups, so it works in a container. Jobs run on
this machine as the calling user (root), with the environment of the submitting client.

    from slurm_cluster import SlurmCluster          # tests/ is on sys.path under pytest

    with SlurmCluster() as cluster:
        job_id = cluster.sbatch("#!/bin/bash\\necho hi > /tmp/out.txt\\n")
        assert cluster.wait(job_id, timeout=60) == "COMPLETED"

Accounting storage (slurmdbd) is not configured, so `sacct` does not work; job states come from
`scontrol show job`, which keeps finished jobs for `min_job_age_s` seconds (MinJobAge).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

# Debian installs the daemons in /usr/sbin, which a non-login shell may not have on PATH.
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
_DAEMONS = ("munged", "slurmctld", "slurmd")
_CLIENTS = ("munge", "sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")

TERMINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
    "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT",
})
"""Job states after which a job never runs again (REQUEUED/PENDING jobs are not terminal)."""

# Variables a client inherits when it runs inside a SLURM job (or a login shell of a real cluster)
# that would make sbatch/srun target that allocation or cluster instead of ours.
_CLIENT_ENV_PREFIXES = ("SLURM_", "SBATCH_", "SALLOC_", "SRUN_", "SQUEUE_", "SINFO_", "SCONTROL_")


class SlurmError(RuntimeError):
    """A SLURM daemon or client command failed; the message carries its output and the daemon logs."""


def _which(name: str) -> str | None:
    return shutil.which(name, path=_SEARCH_PATH)


def slurm_available() -> tuple[bool, str]:
    """Whether this machine can run a `SlurmCluster`.

    Returns:
        `(True, "")` when munged, slurmctld, slurmd and the client commands are installed and we
        run as root (slurmd launches jobs with setuid, so it must be root); otherwise `(False,
        reason)` with a reason suitable for `pytest.skip`.
    """
    missing = [name for name in (*_DAEMONS, *_CLIENTS) if _which(name) is None]
    if missing:
        return False, (f"SLURM/munge binaries not found: {', '.join(missing)} "
                       "(install them with `bash .ci/install_slurm.sh`)")
    if os.geteuid() != 0:
        return False, "a test SLURM cluster needs root (slurmd launches jobs as their owner)"
    return True, ""


def _free_port() -> int:
    # Bind to port 0 so the kernel picks an unused port; another process may take it before the
    # daemon binds it, which is rare enough for tests (the start then fails with a clear log).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _total_memory_mb() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    raise SlurmError("MemTotal missing from /proc/meminfo")


def _tail(path: Path, num_lines: int) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no file)"
    return "\n".join(lines[-num_lines:]) or "(empty)"


def parse_scontrol_records(text: str) -> list[dict[str, str]]:
    """Parse `scontrol show <entity> -o` output (one record per line, `Key=Value` pairs).

    A whitespace-separated token that is not `Key=Value` continues the previous value, so values
    with spaces (job names, commands) stay whole. Returns one dict per non-empty line.
    """
    records = []
    for line in text.splitlines():
        record: dict[str, str] = {}
        last_key = None
        for token in line.split():
            match = re.match(r"^([A-Za-z][A-Za-z0-9_:/]*)=(.*)$", token)
            if match:
                last_key = match.group(1)
                record[last_key] = match.group(2)
            elif last_key is not None:
                record[last_key] += " " + token
        if record:
            records.append(record)
    return records


def _record_id(record: Mapping[str, str]) -> str:
    """`123` for a plain job, `123_4` for array task 4, `123_[5-9]` for still-pending array tasks."""
    task = record.get("ArrayTaskId")
    if task and task != "(null)":
        return f"{record['ArrayJobId']}_{task}"
    return record["JobId"]


class SlurmCluster:
    """A one-node SLURM cluster whose daemons, config, state and logs live in a temp dir.

    Use as a context manager (or call `start()`/`stop()`). The node is `hostname -s` with
    `num_cpus` CPUs; partition `debug` is the default, has no time limit and lets up to 4 jobs
    share a core, so several small jobs run at once on a 2-core machine.

    Args:
        root: directory for the config, state, logs and job scripts; a fresh temp dir (deleted
            on stop) when None. A caller-supplied root is kept.
        num_cpus: CPUs declared for the node; default the real count, at least 2 so 2-task jobs
            fit (slurmd is told to trust the config over the hardware).
        start_timeout_s: seconds to wait for the node to become idle.
        cred_expire_s: job credential lifetime (AuthInfo cred_expire). SLURM also holds a requeued
            job this long before it may start again; the default 120 s would make requeue tests
            slow, and too small a value makes step launches fail on a loaded machine.
        min_job_age_s: seconds finished jobs stay visible to `scontrol show job` (MinJobAge).
        cluster_name: ClusterName in slurm.conf.
    """

    partition = "debug"

    def __init__(self, root: str | os.PathLike | None = None, *, num_cpus: int | None = None,
                 start_timeout_s: float = 60.0, cred_expire_s: int = 10, min_job_age_s: int = 3600,
                 cluster_name: str = "mpotest") -> None:
        if num_cpus is not None and num_cpus < 1:
            raise ValueError(f"num_cpus must be >= 1, got {num_cpus}")
        if cred_expire_s < 5:
            raise ValueError(f"cred_expire_s must be >= 5 (SLURM rejects smaller), got {cred_expire_s}")
        if min_job_age_s < 2:
            raise ValueError(f"min_job_age_s must be >= 2 so finished jobs stay visible, got {min_job_age_s}")
        if start_timeout_s <= 0:
            raise ValueError(f"start_timeout_s must be > 0, got {start_timeout_s}")
        self._given_root = Path(root) if root is not None else None
        self.num_cpus = num_cpus if num_cpus is not None else max(2, os.cpu_count() or 1)
        self.start_timeout_s = start_timeout_s
        self.cred_expire_s = cred_expire_s
        self.min_job_age_s = min_job_age_s
        self.cluster_name = cluster_name
        self.node_name = socket.gethostname().split(".")[0]
        self.root: Path | None = None
        self._munge_dir: Path | None = None
        self._procs: dict[str, subprocess.Popen] = {}
        self._num_scripts = 0

    # ----------------------------------------------------------------------------------- lifecycle
    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def conf_path(self) -> Path:
        """Path of the generated slurm.conf (what `SLURM_CONF` points at)."""
        if self.root is None:
            raise SlurmError("the cluster is not started; call start() or use it as a context manager")
        return self.root / "etc" / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        """Path of this cluster's munged socket (clients find it through slurm.conf's AuthInfo)."""
        if self._munge_dir is None:
            raise SlurmError("the cluster is not started; call start() or use it as a context manager")
        return self._munge_dir / "munge.socket"

    def start(self) -> SlurmCluster:
        """Write the config, start munged, slurmctld and slurmd, and wait until the node is idle.

        Raises:
            SlurmError: a daemon exits or the node is not idle within `start_timeout_s`; the
                message carries the tail of the daemons' logs.
        """
        ok, reason = slurm_available()
        if not ok:
            raise SlurmError(reason)
        if self._procs:
            raise SlurmError("the cluster is already started")
        if self._given_root is not None:
            self._given_root.mkdir(parents=True, exist_ok=True)
            self.root = self._given_root.resolve()
        else:
            self.root = Path(tempfile.mkdtemp(prefix="mpo-slurm-"))
        for sub in ("etc", "state", "spool", "log", "run", "scripts"):
            (self.root / sub).mkdir(exist_ok=True)
        # munged insists that every directory above its socket is searchable by all users, which
        # pytest's 0700 temp dirs are not, so the socket gets its own short dir under /tmp.
        self._munge_dir = Path(tempfile.mkdtemp(prefix="mpo-munge-", dir="/tmp"))
        self._munge_dir.chmod(0o755)
        try:
            self._start_munged()
            self._write_config()
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-f", str(self.conf_path)])
            self._spawn("slurmd", [_which("slurmd"), "-D", "-f", str(self.conf_path)])
            self._wait_node_idle()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Cancel all jobs, stop the daemons and delete the temp files this cluster created."""
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            self._cancel_all_jobs()
        # slurmd before slurmctld so the controller does not mark the node down mid-shutdown.
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self._procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if self._munge_dir is not None:
            shutil.rmtree(self._munge_dir, ignore_errors=True)
            self._munge_dir = None
        if self.root is not None and self._given_root is None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def _start_munged(self) -> None:
        key = self._munge_dir / "munge.key"
        # munge accepts any key of 32..1024 bytes; the file must be private to its owner.
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(os.urandom(128))
        self._spawn("munged", [
            _which("munged"), "--foreground", f"--socket={self.munge_socket}", f"--key-file={key}",
            f"--pid-file={self._munge_dir / 'munged.pid'}", f"--log-file={self.root / 'log' / 'munged.log'}",
            f"--seed-file={self._munge_dir / 'munged.seed'}",
        ])
        self._poll_until(lambda: self.munge_socket.exists(), timeout_s=15, what="munged to create its socket")

    def _write_config(self) -> None:
        (self.root / "etc" / "slurm.conf").write_text(render_slurm_conf(
            cluster_name=self.cluster_name, node_name=self.node_name, num_cpus=self.num_cpus,
            real_memory_mb=max(256, int(_total_memory_mb() * 0.9)), root=self.root,
            munge_socket=self.munge_socket, ctld_port=_free_port(), slurmd_port=_free_port(),
            cred_expire_s=self.cred_expire_s, min_job_age_s=self.min_job_age_s,
        ))
        # An empty plugstack keeps any SPANK plugins of a host-wide /etc/slurm out of our jobs.
        (self.root / "etc" / "plugstack.conf").write_text("")

    def _spawn(self, name: str, argv: Sequence[str]) -> None:
        out = open(self.root / "log" / f"{name}.stdout", "ab")
        try:
            self._procs[name] = subprocess.Popen(
                list(argv), cwd=self.root, env=self.env(), stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            out.close()  # the child holds its own descriptor

    def _poll_until(self, predicate, *, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise SlurmError(f"{name} exited with code {proc.returncode} while waiting for "
                                     f"{what}\n{self.log_tail()}")
            if predicate():
                return
            if time.monotonic() > deadline:
                raise SlurmError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{self.log_tail()}")
            time.sleep(0.25)

    def _wait_node_idle(self) -> None:
        def node_idle() -> bool:
            result = self.run(["sinfo", "--noheader", "--Node", f"--nodes={self.node_name}",
                               "--format=%T"], check=False, timeout=15)
            return result.returncode == 0 and result.stdout.strip() == "idle"

        self._poll_until(node_idle, timeout_s=self.start_timeout_s,
                         what=f"node {self.node_name} to become idle in `sinfo`")

    def _cancel_all_jobs(self) -> None:
        # Batch scripts run under slurmstepd, which outlives slurmd; cancel them so no test job
        # keeps running after the cluster is gone.
        listing = self.run(["squeue", "--noheader", "--format=%A"], check=False, timeout=15)
        job_ids = listing.stdout.split() if listing.returncode == 0 else []
        if not job_ids:
            return
        self.run(["scancel", *job_ids], check=False, timeout=15)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            states = self.run(["squeue", "--noheader", "--format=%T"], check=False, timeout=15)
            if states.returncode != 0 or not states.stdout.split():
                return
            time.sleep(0.25)

    def log_tail(self, num_lines: int = 30) -> str:
        """The last `num_lines` lines of each daemon's log, for error messages."""
        if self.root is None:
            return "(cluster not started)"
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "munged.log", "slurmctld.stdout", "slurmd.stdout",
                     "munged.stdout"):
            parts.append(f"--- {name} ---\n{_tail(self.root / 'log' / name, num_lines)}")
        return "\n".join(parts)

    # ------------------------------------------------------------------------------------ clients
    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for client commands (sbatch, srun, submitit, ...) that target this cluster.

        A copy of `base` (default `os.environ`) without inherited SLURM_*/SBATCH_*/... variables,
        with `SLURM_CONF` set and /usr/sbin on PATH. Jobs submitted with it inherit it (sbatch's
        default `--export=ALL`), so they see the same PATH, virtualenv and PYTHONPATH.
        """
        env = {k: v for k, v in (os.environ if base is None else base).items()
               if not k.startswith(_CLIENT_ENV_PREFIXES)}
        if self.root is not None:
            env["SLURM_CONF"] = str(self.conf_path)
        path_dirs = env.get("PATH", "").split(os.pathsep)
        env["PATH"] = os.pathsep.join([d for d in path_dirs if d] + [d for d in ("/usr/sbin", "/sbin")
                                                                     if d not in path_dirs])
        return env

    def run(self, argv: Sequence[str], *, check: bool = True, timeout: float = 60.0,
            cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
        """Run a client command (e.g. `["squeue"]`) against this cluster; text output captured.

        Raises:
            SlurmError: `check` is true and the command exits non-zero.
        """
        result = subprocess.run(list(argv), env=self.env(), cwd=cwd, capture_output=True, text=True,
                                timeout=timeout)
        if check and result.returncode != 0:
            raise SlurmError(f"`{' '.join(argv)}` exited with code {result.returncode}\n"
                             f"stdout: {result.stdout}\nstderr: {result.stderr}")
        return result

    def sbatch(self, script_text: str, *args: str, cwd: str | os.PathLike | None = None) -> str:
        """Submit a batch script; returns its job id (a string such as "12", also for arrays).

        Args:
            script_text: the script, starting with a `#!` line; `#SBATCH` lines are honoured.
            *args: extra sbatch options, e.g. `"--ntasks=2"`, `"--array=0-1"`.
            cwd: submission (and so job working) directory; default the cluster root. Relative
                `--output` paths and the default `slurm-%j.out` land here.
        """
        if not script_text.startswith("#!"):
            raise ValueError("script_text must start with an interpreter line such as '#!/bin/bash' "
                             f"(sbatch rejects scripts without one); got {script_text[:40]!r}")
        self._num_scripts += 1
        script = self.root / "scripts" / f"job-{self._num_scripts}.sh"
        script.write_text(script_text)
        result = self.run(["sbatch", "--parsable", *args, str(script)], cwd=cwd or self.root)
        # --parsable prints "<id>" or "<id>;<cluster>".
        job_id = result.stdout.strip().split(";")[0]
        if not job_id.isdigit():
            raise SlurmError(f"unexpected sbatch output {result.stdout!r} (stderr: {result.stderr})")
        return job_id

    def job_records(self, job_id: str | int) -> list[dict[str, str]]:
        """`scontrol show job` records of a job: one for a plain job, one per array task.

        Raises:
            SlurmError: the controller does not know the job (never submitted, or purged after
                `min_job_age_s`).
        """
        result = self.run(["scontrol", "--oneliner", "show", "job", str(job_id)], check=False, timeout=30)
        if result.returncode != 0:
            raise SlurmError(f"scontrol does not know job {job_id}: {result.stderr.strip() or result.stdout}")
        return parse_scontrol_records(result.stdout)

    def states(self, job_id: str | int) -> dict[str, str]:
        """Map of record id (`"12"`, or `"12_0"`, `"12_1"` for array tasks) to its JobState."""
        return {_record_id(rec): rec["JobState"] for rec in self.job_records(job_id)}

    def state(self, job_id: str | int) -> str:
        """The job's state, e.g. "PENDING", "RUNNING", "COMPLETED".

        For an array job whose tasks differ, the distinct states joined by commas in sorted
        order (e.g. "COMPLETED,RUNNING"); when all tasks agree, that one state.
        """
        return ",".join(sorted(set(self.states(job_id).values())))

    def wait(self, job_id: str | int, timeout: float = 120.0, *,
             states: Collection[str] = TERMINAL_STATES, poll_s: float = 0.5) -> str:
        """Block until every record of the job is in one of `states`; return `state(job_id)`.

        Args:
            timeout: seconds to wait.
            states: target states; default the terminal ones, e.g. `{"RUNNING"}` to wait for a start.
            poll_s: seconds between `scontrol` polls.

        Raises:
            TimeoutError: not reached within `timeout`; the message has the state and daemon logs.
        """
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        deadline = time.monotonic() + timeout
        while True:
            current = self.states(job_id)
            if current and all(s in states for s in current.values()):
                return ",".join(sorted(set(current.values())))
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not in {sorted(states)} after {timeout:.0f} s: {current}\n"
                                   f"{self.log_tail()}")
            time.sleep(poll_s)

    def requeue(self, job_id: str | int) -> None:
        """`scontrol requeue` a running or finished batch job; it becomes eligible again after
        `cred_expire_s` seconds, with SLURM_RESTART_COUNT one higher."""
        self.run(["scontrol", "requeue", str(job_id)])

    def cancel(self, job_id: str | int) -> None:
        """`scancel` a job (all its array tasks for an array job id)."""
        self.run(["scancel", str(job_id)])


def render_slurm_conf(*, cluster_name: str, node_name: str, num_cpus: int, real_memory_mb: int,
                      root: Path, munge_socket: Path, ctld_port: int, slurmd_port: int,
                      cred_expire_s: int, min_job_age_s: int) -> str:
    """The slurm.conf text of a one-node cluster whose files all live under `root`."""
    lines = [
        f"ClusterName={cluster_name}",
        # The explicit 127.0.0.1 address avoids depending on the hostname resolving in a container.
        f"SlurmctldHost={node_name}(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={slurmd_port}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={munge_socket},cred_expire={cred_expire_s}",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'run' / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'run' / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
        f"PlugStackConfig={root / 'etc' / 'plugstack.conf'}",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        # No cgroups: containers rarely delegate them, and tests do not need resource enforcement.
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        # Run the main and backfill schedulers every 1-2 s (defaults 60 s and 30 s) so a requeued
        # job starts as soon as its hold ends instead of up to half a minute later.
        "SchedulerParameters=sched_interval=1,bf_interval=2",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "MpiDefault=none",
        "ReturnToService=2",
        "JobRequeue=1",
        f"MinJobAge={min_job_age_s}",
        "MailProg=/bin/true",
        # Seconds between SIGTERM and SIGKILL when a job is cancelled or times out (default 30).
        "KillWait=5",
        "InactiveLimit=0",
        # Trust the CPU count below even where it differs from the hardware (e.g. 2 on 1 core).
        "SlurmdParameters=config_overrides",
        f"NodeName={node_name} NodeAddr=127.0.0.1 CPUs={num_cpus} RealMemory={real_memory_mb} State=UNKNOWN",
        f"PartitionName={SlurmCluster.partition} Nodes={node_name} Default=YES MaxTime=INFINITE "
        "State=UP OverSubscribe=FORCE:4",
    ]
    return "\n".join(lines) + "\n"

