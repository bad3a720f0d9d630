"""How `mpo demo` runs its stages: each as the command a user would type, timed and logged.

    stages = Stages(out_dir, "cuda", print)                       # in this process (the default)
    stages.run("sft", [sys.executable, "launch/train.py", "+exp=demo_sft", ...])
    stages = Stages(out_dir, "cpu", print, separate_processes=True)  # one Python process per stage

A stage's argv is ``[python, SCRIPT, ARGS...]`` or ``[python, -m, MODULE, ARGS...]``. In a separate
process it runs exactly so. In this process (the default) it runs through ``runpy`` as ``__main__``
with the same ``sys.argv``, environment and working directory, its stdout and stderr (file
descriptors 1 and 2, so C extensions and logging handlers too) sent to ``logs/NAME.log``. Both give
the same outputs (tests/integration/test_demo.py checks the CPU run bit for bit); the in-process
one saves each stage's start-up: about 30 s per stage on the GPU machine (imports, torch registering
its custom ops, CUDA and Triton initialisation), ~2 of the 5 minutes of a GPU demo
(docs/demo_notes.md, round 5).
"""

from __future__ import annotations

import os
import runpy
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

__all__ = ["REPO_ROOT", "StageError", "Stages"]


class StageError(RuntimeError):
    """A stage's command failed; the message names the stage and its log file."""


class Stages:
    """Runs the pipeline's commands, times each stage and keeps the command lines for commands.sh.

    Args:
        out_dir: the demo's output directory (logs go to ``out_dir/logs``).
        device: "cpu" or "cuda" (sets DS_ACCELERATOR for DeepSpeed on CPU).
        log: where progress lines go.
        separate_processes: run each command as its own Python process instead of in this one.
    """

    def __init__(self, out_dir: Path, device: str, log: Callable[[str], None], *, separate_processes: bool = False):
        self.out_dir, self.device, self.log = out_dir, device, log
        self.separate_processes = separate_processes
        self.timings: dict[str, float] = {}
        self.commands: list[str] = []
        (out_dir / "logs").mkdir(parents=True, exist_ok=True)

    def env_updates(self) -> dict[str, str]:
        """Variables every stage runs with (on top of the caller's environment)."""
        env = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
        if self.device == "cpu":
            env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed would otherwise probe for CUDA
        return env

    def timed(self, name: str, func: Callable[[], object], equivalent: list[str]) -> object:
        """Run an in-process stage, record its wall time (seconds) and the command that does the same."""
        self.commands.append(f"# {name}\n" + " ".join(shlex.quote(a) for a in equivalent))
        start = time.perf_counter()
        result = func()
        self.timings[name] = round(time.perf_counter() - start, 2)
        return result

    def run(self, name: str, argv: list[str]) -> None:
        """Run one stage's command (output to logs/NAME.log); raise StageError when it fails."""
        if argv[:1] != [sys.executable] or len(argv) < 2 or (argv[1] == "-m" and len(argv) < 3):
            raise ValueError(f"stage {name!r}: expected [python, SCRIPT | -m MODULE, ARGS...], got {argv!r}")
        log_path = self.out_dir / "logs" / f"{name}.log"
        line = " ".join(shlex.quote(a) for a in ["python" if a == sys.executable else a for a in argv])
        self.commands.append(f"# {name}\n{line}")
        self.log(f"[demo] {name}: {line}")
        start = time.perf_counter()
        if self.separate_processes:
            with log_path.open("w", encoding="utf-8") as handle:
                proc = subprocess.run(argv, stdout=handle, stderr=subprocess.STDOUT,
                                      env={**os.environ, **self.env_updates()}, cwd=REPO_ROOT)
            code, error = proc.returncode, None
        else:
            code, error = _run_here(argv[1:], log_path, self.env_updates())
        elapsed = time.perf_counter() - start
        self.timings[name] = round(elapsed, 2)
        if code != 0:
            tail = "\n".join(log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-25:])
            cause = f" ({type(error).__name__}: {error})" if error is not None else ""
            raise StageError(f"stage {name!r} failed (exit {code}){cause}; full log: {log_path}\n{tail}")
        self.log(f"[demo] {name}: done in {elapsed:.1f} s")

    def close(self) -> None:
        """After the last stage: close the process group the in-process trainer stages opened (a
        separate trainer process closes its own by exiting)."""
        dist = getattr(sys.modules.get("torch"), "distributed", None)
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _run_here(args: list[str], log_path: Path, env: dict[str, str]) -> tuple[int, BaseException | None]:
    """``python ARGS`` run in this process; returns (exit code, the exception when one escaped).

    The code is what the command would have exited with: 0 when it returned or exited with 0/None,
    the SystemExit code otherwise (1 for a non-integer message), 1 for any other exception (its
    traceback goes to the log, as the interpreter would print it).
    """
    import traceback

    with _stage_context(args, log_path, env):
        try:
            if args[0] == "-m":
                runpy.run_module(args[1], run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(args[0], run_name="__main__")
            return 0, None
        except SystemExit as exit_:
            code = exit_.code
            if code is None or code == 0:
                return 0, None
            if not isinstance(code, int):
                print(code, file=sys.stderr)
                code = 1
            return code, None
        except Exception as error:  # noqa: BLE001 - reported like an uncaught exception of the command
            traceback.print_exc()
            return 1, error


@contextmanager
def _stage_context(args: list[str], log_path: Path, env: dict[str, str]) -> Iterator[None]:
    """sys.argv, environment, working directory and fds 1/2 of a command, restored afterwards.

    Hydra's global state is cleared before and after (each command composes its own config), and
    memory the stage left behind is collected (on CUDA, cached blocks go back to the driver).
    """
    from hydra.core.global_hydra import GlobalHydra

    saved_argv, saved_env, saved_cwd = list(sys.argv), dict(os.environ), os.getcwd()
    saved_path, saved_streams = list(sys.path), (sys.stdout, sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_fds = os.dup(1), os.dup(2)
    handle = log_path.open("w", encoding="utf-8")
    try:
        os.dup2(handle.fileno(), 1)
        os.dup2(handle.fileno(), 2)
        # Python-level writes must reach fds 1/2 too (they do unless sys.stdout was replaced, e.g. by
        # pytest); the wrappers never close the fds, so a logging handler that keeps one stays valid.
        sys.stdout, sys.stderr = (_stream_on(stream, fd) for stream, fd in ((sys.stdout, 1), (sys.stderr, 2)))
        os.environ.update(env)
        os.chdir(REPO_ROOT)
        sys.argv = [args[0] if args[0] != "-m" else args[1], *args[(2 if args[0] == "-m" else 1):]]
        GlobalHydra.instance().clear()
        yield
    finally:
        GlobalHydra.instance().clear()
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = saved_streams
        os.dup2(saved_fds[0], 1)
        os.dup2(saved_fds[1], 2)
        for fd in saved_fds:
            os.close(fd)
        handle.close()
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        sys.argv, sys.path[:] = saved_argv, saved_path
        from mpo.model.load import free_memory

        free_memory()


def _stream_on(stream, fd: int):
    """``stream`` when it writes to file descriptor ``fd``, else a line-buffered text stream that does."""
    try:
        if stream.fileno() == fd:
            return stream
    except (AttributeError, OSError, ValueError):
        pass
    return open(fd, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
