"""`mpo.demo_stages`: a stage's command run in this process behaves like the same command in its own process
(exit codes, output to the log, failures as StageError), and leaves this process as it found it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from mpo.demo_stages import StageError, Stages

SCRIPT = """
import os, sys
print("out", sys.argv[1:], os.environ.get("WANDB_MODE"), os.environ.get("DS_ACCELERATOR"), flush=True)
os.write(2, b"fd2 line\\n")
os.environ["LEAK"] = "1"
mode = sys.argv[1]
if mode == "exit3":
    sys.exit(3)
if mode == "message":
    sys.exit("a message")
if mode == "raise":
    raise RuntimeError("boom")
if mode == "exit0":
    sys.exit(0)
"""


@pytest.fixture(params=[False, True], ids=["in_process", "separate_processes"])
def stages(request, tmp_path) -> Stages:
    return Stages(tmp_path, "cpu", lambda line: None, separate_processes=request.param)


def _script(tmp_path: Path) -> str:
    path = tmp_path / "stage_script.py"
    path.write_text(SCRIPT)
    return str(path)


@pytest.mark.parametrize("mode", ["ok", "exit0"])
def test_stage_success_logs_output_and_restores_the_process(stages, tmp_path, mode):
    argv_before, env_before, cwd_before = list(sys.argv), dict(os.environ), os.getcwd()
    stages.run("demo", [sys.executable, _script(tmp_path), mode])
    log = (tmp_path / "logs" / "demo.log").read_text()
    assert f"out ['{mode}'] disabled cpu" in log and "fd2 line" in log
    assert stages.timings["demo"] >= 0 and stages.commands[-1].startswith("# demo\npython ")
    assert sys.argv == argv_before and dict(os.environ) == env_before and os.getcwd() == cwd_before
    print("after the stage")  # fd 1 is this process's again (pytest captures it)
    assert "after the stage" not in (tmp_path / "logs" / "demo.log").read_text()


@pytest.mark.parametrize("mode,code,needle", [("exit3", 3, "fd2 line"), ("message", 1, "a message"),
                                              ("raise", 1, "RuntimeError: boom")])
def test_stage_failure_is_a_stage_error_with_the_log_tail(stages, tmp_path, mode, code, needle):
    with pytest.raises(StageError) as err:
        stages.run("broken", [sys.executable, _script(tmp_path), mode])
    message = str(err.value)
    assert f"stage 'broken' failed (exit {code})" in message and needle in message
    assert str(tmp_path / "logs" / "broken.log") in message
    assert "LEAK" not in os.environ


def test_module_stage_runs_as_main(stages, tmp_path):
    stages.run("mod", [sys.executable, "-m", "data_pipeline.synthetic", str(tmp_path / "task"), "--num-train", "2",
                       "--num-build", "1", "--num-test", "1", "--kinds", "grid"])
    assert (tmp_path / "task" / "manifest.json").is_file()
    with pytest.raises(StageError, match="exit 2"):  # argparse usage error
        stages.run("bad", [sys.executable, "-m", "data_pipeline.synthetic", str(tmp_path / "t2"), "--kinds", "nope"])


def test_malformed_stage_command_is_refused(tmp_path):
    stages = Stages(tmp_path, "cpu", print)
    for argv in (["python", "x.py"], [sys.executable], [sys.executable, "-m"]):
        with pytest.raises(ValueError, match="expected \\[python"):
            stages.run("x", argv)


def test_close_ends_the_process_group_a_trainer_stage_left(tmp_path):
    """An in-process trainer stage leaves its (one-process) group open; close() ends it, and is a no-op after."""
    import torch.distributed as dist

    script = tmp_path / "group.py"
    script.write_text("import os, torch.distributed as dist\n"
                      "os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=os.environ['TEST_PORT'])\n"
                      "dist.init_process_group('gloo', rank=0, world_size=1)\n")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["TEST_PORT"] = str(port)
    try:
        stages = Stages(tmp_path, "cpu", lambda line: None)
        stages.run("group", [sys.executable, str(script)])
        assert dist.is_initialized()
        stages.close()
        assert not dist.is_initialized()
        stages.close()
    finally:
        os.environ.pop("TEST_PORT", None)
        if dist.is_initialized():
            dist.destroy_process_group()
