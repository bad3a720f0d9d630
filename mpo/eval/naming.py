"""Names in an evaluation run: models (folder names under predictions/ and keys of results.json) and
benchmark labels (file names and results keys)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mpo.eval.benchmarks import BENCHMARKS, CUSTOM_PREFIX

__all__ = ["as_named_paths", "benchmark_labels", "name_models"]


def _unique_names(paths: list[Path]) -> list[str]:
    """Directory (or file) names; names shared by several paths get their parent's name prefixed
    ("a-final", "b-final"), and any remaining clash a numeric suffix."""
    names = [path.name for path in paths]
    names = [f"{path.parent.name}-{name}" if names.count(name) > 1 and path.parent.name else name
             for path, name in zip(paths, names)]
    unique: list[str] = []
    for name in names:
        candidate, number = name, 2
        while candidate in unique:
            candidate, number = f"{name}_{number}", number + 1
        unique.append(candidate)
    return unique


def as_named_paths(value, naming: Callable[[Path], Path] = lambda p: p) -> dict[str, Path]:
    """A path, list of paths or {name: path} → {name: path}; list names come from ``naming(path)``."""
    if isinstance(value, dict):
        bad = [name for name in value if not str(name) or str(name) in (".", "..") or "/" in str(name)]
        if bad:
            raise ValueError(f"names {bad} cannot be folder names; use plain names such as {{base: DIR, mpo: DIR}}")
        return {str(name): Path(path).expanduser() for name, path in value.items()}
    paths = [Path(p).expanduser() for p in ([value] if isinstance(value, str) else value)]
    return dict(zip(_unique_names([naming(p.resolve()) for p in paths]), paths))


def name_models(model) -> dict[str, Path]:
    """``model`` (a path, list of paths or {name: path}) → {model_name: checkpoint dir}; names are the
    directory names, de-duplicated (see :func:`_unique_names`)."""
    return as_named_paths(model)


def benchmark_labels(names: list[str]) -> dict[str, str]:
    """Label (file and results key) → benchmark name: the registered name, or a custom file's stem
    ("custom_" prefixed when the stem is a registered name; "_2", … appended on a clash)."""
    labels: dict[str, str] = {}
    for name in names:
        base = name
        if name.startswith(CUSTOM_PREFIX):
            base = Path(name[len(CUSTOM_PREFIX):]).stem
            base = f"custom_{base}" if base in BENCHMARKS else base
        label, number = base, 2
        while label in labels:
            label, number = f"{base}_{number}", number + 1
        labels[label] = name
    return labels
