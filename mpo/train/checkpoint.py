"""Checkpoints that resume exactly, and the final Hugging Face export.

A checkpoint is a DeepSpeed checkpoint directory `checkpoints/step_<8-digit step>/` (model, optimizer and
scheduler shards of every rank) whose client state carries the step, the reward shift δ, each rank's
data-stream position and RNG states. It becomes "latest" only after every rank has finished writing:
rank 0 then replaces `checkpoints/latest` atomically. A crash mid-save leaves the previous "latest"
intact, and the half-written directory is ignored and removed by the next save.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

LATEST = "latest"


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def latest_tag(ckpt_dir: Path) -> str | None:
    """Tag of the latest complete checkpoint, or None."""
    marker = ckpt_dir / LATEST
    if not marker.is_file():
        return None
    tag = marker.read_text().strip()
    return tag if (ckpt_dir / tag).is_dir() else None


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather_objects(obj, world_size: int) -> list:
    """Every rank's `obj`, in rank order (a plain list when not distributed)."""
    if world_size == 1:
        return [obj]
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def save_checkpoint(engine, ckpt_dir: Path, step: int, client_state: dict, *, rank: int, keep_last: int) -> Path:
    """Save a DeepSpeed checkpoint for `step`, then mark it latest and prune old ones (rank 0)."""
    tag = step_tag(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    if dist.is_initialized():
        dist.barrier()  # every rank's shards are on disk before "latest" moves
    if rank == 0:
        tmp = ckpt_dir / f".{LATEST}.tmp"
        tmp.write_text(tag + "\n")
        os.replace(tmp, ckpt_dir / LATEST)
        tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step_"))
        kept = [t for t in tags if t <= tag][-keep_last:]  # later tags are leftovers of a crashed run
        for old in tags:
            if old not in kept:
                shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return ckpt_dir / tag


def load_checkpoint(engine, ckpt_dir: Path) -> dict | None:
    """Load the latest complete checkpoint into `engine`; returns its client state or None."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    return client_state


def full_state_dict(engine, *, zero_stage: int) -> dict | None:
    """The complete model state dict on rank 0 (None elsewhere under ZeRO-3), without the wrapper's prefix."""
    if zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}
    if state is None:
        return None
    return {k.removeprefix("model."): v for k, v in state.items()}


def export_hf(engine, processor, out_dir: Path, *, zero_stage: int, rank: int, lora: bool) -> Path | None:
    """Write the trained model as a native Hugging Face directory (safetensors + processor)."""
    from mpo.train.policy import unwrap_internvl

    state = full_state_dict(engine, zero_stage=zero_stage)
    if rank != 0:
        return None
    module = engine.module.model  # inside the PreferenceLogps wrapper
    if lora:  # merge adapters into the base weights so the export is a plain InternVL checkpoint
        merged = module.merge_and_unload()
        model, state = merged, {k: v.detach().cpu() for k, v in merged.state_dict().items()}
    else:
        model = unwrap_internvl(module)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
    processor.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir
