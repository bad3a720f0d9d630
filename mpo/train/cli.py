"""`mpo train [overrides...]`: runs launch/train.py of this checkout with the given Hydra overrides."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    script = Path(__file__).resolve().parents[2] / "launch" / "train.py"
    if not script.is_file():
        print(f"mpo train: {script} not found; run from a source checkout (pip install -e .)", file=sys.stderr)
        return 2
    sys.argv = [str(script), *(sys.argv[1:] if argv is None else argv)]
    runpy.run_path(str(script), run_name="__main__")
    return 0
