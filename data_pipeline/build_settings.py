"""The pair builder's settings on disk: what its results depend on, and the check that a resumed or
merged run uses the same (``OUTPUT_DIR/build_config.json``; every shard line carries its fingerprint)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from data_pipeline.sources import QuestionSet

if TYPE_CHECKING:  # the schema lives with the CLI
    from mpo.build_pairs import BuildConfig

__all__ = ["CONFIG_FILE", "check_or_store_settings", "load_settings", "run_settings", "settings_fingerprint"]

CONFIG_FILE = "build_config.json"


def run_settings(cfg: BuildConfig, questions: QuestionSet) -> dict:
    """What the results depend on: a resumed or merged run must have the same."""
    free = ("output_dir", "device", "dtype", "shard", "stage", "strict", "progress", "stop_after_questions",
            "questions_per_call", "max_batch_rows")
    keep = {k: v for k, v in asdict(cfg).items() if k not in free}
    keep.update(model_dir=str(Path(cfg.model_dir).resolve()), questions=str(questions.path),
                image_root=str(questions.image_root))
    return json.loads(json.dumps(keep, sort_keys=True))  # plain JSON types, canonical order


def settings_fingerprint(settings: dict) -> str:
    """16 hex digits identifying ``settings``; stored on every shard line."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def load_settings(out_dir: Path) -> dict | None:
    path = out_dir / CONFIG_FILE
    return json.loads(path.read_text(encoding="utf-8"))["settings"] if path.is_file() else None


def check_or_store_settings(out_dir: Path, settings: dict) -> None:
    stored = load_settings(out_dir)
    if stored is None:
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / f".{CONFIG_FILE}.{os.getpid()}"
        record = {"settings": settings, "fingerprint": settings_fingerprint(settings)}
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, out_dir / CONFIG_FILE)
    elif stored != settings:
        diff = [f"{k}: {stored.get(k)!r} -> {settings.get(k)!r}" for k in sorted(stored.keys() | settings.keys())
                if stored.get(k) != settings.get(k)]
        raise ValueError(f"{out_dir} was built with other settings ({'; '.join(diff)}); rerun with the same "
                         "settings to resume, or choose a new output_dir")
