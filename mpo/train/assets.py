"""First-use assets for self-contained experiments (tiny_cpu): a tiny checkpoint and synthetic data.

Both are created only when their configured path does not exist and the config asks for it. They
are built in a temporary directory and moved into place, so concurrent runs sharing a cache
directory never see a half-written asset.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from mpo.config import TrainConfig


def _build_atomically(target: Path, build) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.exists():  # lost a race with another run: theirs is complete, keep it
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_assets(cfg: TrainConfig) -> None:
    """Create the tiny model and/or synthetic MMPR data where the config allows and they are absent."""
    model_path = Path(cfg.model.path).expanduser()
    if not model_path.exists():
        if not cfg.model.create_tiny_if_missing:
            raise FileNotFoundError(f"model.path {model_path} does not exist")
        from mpo.model.tiny import write_tiny_checkpoint

        _build_atomically(model_path, lambda d: write_tiny_checkpoint(d, seed=cfg.seed, image_size=cfg.model.tiny_image_size))
    data_path = Path(cfg.data.path).expanduser()
    if not data_path.exists():
        if not cfg.data.create_synthetic_if_missing:
            raise FileNotFoundError(f"data.path {data_path} does not exist")
        if data_path.name != "sft":
            raise ValueError(f"data.create_synthetic_if_missing needs data.path to end in /sft (the synthetic task's "
                             f"MMPR directory), got {data_path}")
        from data_pipeline.synthetic import generate_task

        n = cfg.data.synthetic_num_train
        _build_atomically(data_path.parent, lambda d: generate_task(d, seed=cfg.seed, num_train=n,
                                                                     num_pairs_questions=8, num_test=8))
