"""Shared fixtures: a tiny InternVL checkpoint built once per session, tiny MMPR directories."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def one_intra_op_thread():
    """Test models are tiny and test processes share 2 cores: extra intra-op threads only add
    synchronisation (measured 30-50x slower under contention), so every test runs single-threaded."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random tiny InternVL checkpoint (448 px tiles, 256 tokens per tile), written once."""
    from mpo.model.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_model") / "model", seed=0)


def write_image(path: Path, size=(64, 48), color=(200, 30, 30)) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def write_mmpr(root: Path, records: list, *, name: str = "src", repeat_time: float = 1, extra_meta: dict | None = None,
               raw_lines: list[bytes] | None = None) -> Path:
    """Write an MMPR directory: meta.json + one jsonl (records as JSON, plus optional raw byte lines)."""
    root.mkdir(parents=True, exist_ok=True)
    ann = root / f"{name}.jsonl"
    with ann.open("wb") as fh:
        for rec in records:
            fh.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
        for raw in raw_lines or []:
            fh.write(raw + b"\n")
    entry = {"root": ".", "annotation": ann.name, "repeat_time": repeat_time, "length": len(records)}
    entry.update(extra_meta or {})
    (root / "meta.json").write_text(json.dumps({name: entry}))
    return root


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running one-node SLURM cluster (tests/slurm_cluster.py), shared by the session; skips where
    SLURM is not installed. Tests using it are marked `slurm`."""
    from slurm_cluster import SlurmCluster, slurm_available

    ok, reason = slurm_available()
    if not ok:
        pytest.skip(reason)
    with SlurmCluster() as cluster:
        yield cluster
