"""Real training runs of `tiny_cpu` through launch/train.py: single process, 2-process torchrun under
DeepSpeed ZeRO-2 and ZeRO-3 (CPU, gloo), exact resume, gradient accumulation, LoRA and cached reference."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = dict(os.environ, MPO_CACHE=str(tmp_path_factory.mktemp("mpo_cache")), DS_ACCELERATOR="cpu",
             WANDB_MODE="offline", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return e


def train(env, run_dir: Path, *overrides: str, nproc: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    args = [str(ROOT / "launch" / "train.py"), "+exp=tiny_cpu", f"hydra.run.dir={run_dir}", "logger.progress=false",
            *overrides]
    if nproc == 1:
        cmd = [sys.executable, *args]
    else:
        with socket.socket() as sock:  # a free port for the rendezvous
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def state(path: Path) -> dict:
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path).state_dict()


def initial_weights(env) -> dict:
    return state(Path(env["MPO_CACHE"]) / "tiny_cpu" / "model")


def test_single_process_run_directory_contract(env, tmp_path):
    run = tmp_path / "run"
    train(env, run)
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 31))
    for key in ("step", "loss", "loss_dpo", "loss_bco", "loss_sft", "reward_accuracy", "delta", "lr", "grad_norm",
                "tokens_per_s", "pairs_per_s", "peak_mem_gib", "logps_chosen", "logps_rejected", "reward_margin"):
        assert key in rows[0], key
    assert rows[0]["loss_dpo"] == pytest.approx(math.log(2), abs=1e-5)
    assert rows[0]["loss_bco"] == pytest.approx(2 * math.log(2), abs=1e-5)
    assert rows[0]["delta"] == 0.0
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000030"
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000020", "step_00000030"]
    assert (run / "loss_curve.png").stat().st_size > 1000
    assert list((run / "wandb").glob("offline-run-*"))
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(run / "final")
    AutoProcessor.from_pretrained(run / "final")
    trained = model.state_dict()
    start = initial_weights(env)
    changed = [k for k in start if k in trained and not torch.equal(start[k], trained[k])]
    assert len(changed) > len(start) // 2


@pytest.mark.parametrize("stage", [2, 3])
def test_torchrun_two_processes_learns(env, tmp_path, stage):
    run = tmp_path / f"z{stage}"
    extra = ["reference=cached"] if stage == 2 else []
    train(env, run, f"deepspeed=zero{stage}", "max_steps=40", "save_every=20", *extra, nproc=2)
    rows = metrics(run)
    assert len(rows) == 40 and all(math.isfinite(r["loss"]) for r in rows)
    first, last = rows[:8], rows[-8:]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    assert mean(last, "loss") < mean(first, "loss") - 0.3
    assert mean(last, "loss_dpo") < math.log(2)
    assert (run / "rejects.rank1.jsonl").exists()
    from transformers import AutoModelForImageTextToText

    trained = AutoModelForImageTextToText.from_pretrained(run / "final").state_dict()
    start = initial_weights(env)
    assert any(not torch.equal(start[k], trained[k]) for k in start if k in trained)
    if stage == 2:
        assert list((run.parent / "ref_cache").glob("ref_logps-*.pt"))


def test_resume_continues_exactly(env, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    common = ["max_steps=12", "save_every=4"]
    train(env, full, *common)
    train(env, resumed, *common, "stop_after_steps=6")  # checkpoint at 4, "killed" at 6
    assert not (resumed / "final").exists()
    assert (resumed / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    proc = train(env, resumed, *common)
    assert "resumed from step_00000004" in proc.stdout + proc.stderr
    a, b = metrics(full), metrics(resumed)
    assert [r["step"] for r in b] == list(range(1, 13))  # lines after the checkpoint were replaced
    for ra, rb in zip(a, b):
        for key in ("loss", "loss_dpo", "loss_bco", "loss_sft", "delta"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), (ra["step"], key)
    assert b[4]["delta"] != 0.0  # δ came back from the checkpoint, not from 0


def test_gradient_accumulation_equivalence(env, tmp_path):
    one, two = tmp_path / "mb2", tmp_path / "mb1x2"
    common = ["max_steps=1", "global_batch_size=2", "optim.warmup_ratio=0"]
    train(env, one, *common, "micro_batch_size=2")
    train(env, two, *common, "micro_batch_size=1")
    wa, wb = state(one / "final"), state(two / "final")
    start = initial_weights(env)
    moved = [k for k in wa if not torch.equal(wa[k], start[k])]
    assert moved
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
    assert metrics(one)[0]["loss"] == pytest.approx(metrics(two)[0]["loss"], rel=1e-5)


def test_lora_with_adapter_reference(env, tmp_path):
    run = tmp_path / "lora"
    train(env, run, "max_steps=3", "model.lora.enabled=true", "model.lora.r=4", "reference=lora")
    rows = metrics(run)
    assert rows[0]["loss_dpo"] == pytest.approx(math.log(2), abs=1e-5)
    from transformers import AutoModelForImageTextToText

    merged = AutoModelForImageTextToText.from_pretrained(run / "final").state_dict()
    assert not any("lora" in k for k in merged)
    start = initial_weights(env)
    assert torch.equal(merged["model.vision_tower.embeddings.cls_token"], start["model.vision_tower.embeddings.cls_token"])
    q = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[q], start[q])


def test_sft_only_run_skips_reference_and_rejected_and_resumes(env, tmp_path):
    """loss=sft (dpo_weight = bco_weight = 0): no reference is built or cached, only SFT metrics, exact resume."""
    full, resumed = tmp_path / "sft_full", tmp_path / "sft_resumed"
    common = ["loss=sft", "reference=cached", "max_steps=6", "save_every=3"]
    proc = train(env, full, *common)
    assert "SFT only (dpo_weight = bco_weight = 0)" in proc.stdout
    rows = metrics(full)
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert {"loss", "loss_sft", "logps_chosen"} <= set(rows[0]) and "loss_dpo" not in rows[0]
    assert all(r["loss"] == pytest.approx(r["loss_sft"]) for r in rows)
    assert not list(tmp_path.glob("**/ref_logps-*.pt"))
    q = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(state(full / "final")[q], initial_weights(env)[q])
    train(env, resumed, *common, "stop_after_steps=4")
    train(env, resumed, *common)
    for ra, rb in zip(rows, metrics(resumed)):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5, abs=1e-6), ra["step"]
