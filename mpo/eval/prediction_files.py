"""The evaluation's answer files: jsonl appended a batch at a time, resumable, with a settings sidecar.

- ``{benchmark}.jsonl``: greedy answers, one row per question ``{"index", "prediction", "question",
  "finished"}`` (:func:`read_predictions`);
- ``{benchmark}.samples.jsonl``: K sampled answers per question ``{"index", "samples": [...],
  "finished": [...]}`` (:func:`read_samples`, written when ``samples=K`` is set);
- ``{name}.settings.json`` beside each: what produced the answers. :func:`pending_items` refuses to
  resume a file under other settings, because one score over answers from two settings is silently wrong.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from mpo.eval.benchmarks import Item

__all__ = ["append_predictions", "pending_items", "read_predictions", "read_samples", "settings_path"]


def _read_rows(path: str | Path, field: str, check: Callable[[object], str | None], example: str) -> dict[str, dict]:
    """Rows of a jsonl answer file by ``str(index)``; ``check(row[field])`` returns a problem or None."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"predictions file {path} does not exist")
    rows: dict[str, dict] = {}
    lines_of: dict[str, int] = {}
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error}); each line must be {example}") from error
            if not isinstance(row, dict) or "index" not in row or field not in row:
                raise ValueError(f'{where}: each line needs "index" and "{field}", got {line.strip()[:120]!r}')
            if not isinstance(row["index"], (int, str)) or isinstance(row["index"], bool):
                raise ValueError(f"{where}: index must be an int or a str, got {row['index']!r}")
            problem = check(row[field])
            if problem:
                raise ValueError(f"{where}: {problem}")
            key = str(row["index"])
            if key in rows:
                raise ValueError(f"{where}: index {row['index']!r} already appeared on line {lines_of[key]}")
            rows[key], lines_of[key] = row, number
    return rows


def read_predictions(path: str | Path) -> dict[str, dict]:
    """Read a predictions jsonl into {str(index): row}. Rows need ``index`` (int or str) and
    ``prediction`` (str); blank lines are skipped. Raises ``ValueError`` naming file:line for a bad row
    or a repeated index, ``FileNotFoundError`` when the file is missing."""
    return _read_rows(path, "prediction",
                      lambda value: None if isinstance(value, str)
                      else f"prediction must be a str, got {type(value).__name__}",
                      '{"index": ..., "prediction": "..."}')


def read_samples(path: str | Path) -> dict[str, dict]:
    """Read a samples jsonl into {str(index): row}; ``samples`` must be a non-empty list of str.
    Errors as :func:`read_predictions`."""
    def check(value) -> str | None:
        if not isinstance(value, list) or not value or not all(isinstance(text, str) for text in value):
            return f"samples must be a non-empty list of str, got {str(value)[:80]!r}"
        return None

    return _read_rows(path, "samples", check, '{"index": ..., "samples": ["...", ...]}')


def append_predictions(path: Path, rows: list[dict]) -> None:
    """Append rows as jsonl lines and flush them to disk (one call per batch)."""
    with path.open("a", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def _repair_tail(path: Path) -> None:
    """Make the file end with a newline so appends start a new line: a last line cut mid-write (a run
    killed while flushing) is dropped, a complete one merely lacking its newline is kept."""
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    cut = data.rfind(b"\n") + 1
    try:
        json.loads(data[cut:])
        path.write_bytes(data + b"\n")
    except ValueError:
        path.write_bytes(data[:cut])


def settings_path(answers_path: Path) -> Path:
    """The settings sidecar of an answer file (``x.jsonl`` → ``x.settings.json``)."""
    return answers_path.with_name(answers_path.stem + ".settings.json")


def pending_items(path: Path, items: list[Item], settings: dict,
                  reader: Callable[[Path], dict[str, dict]] = read_predictions) -> list[Item]:
    """Items of ``items`` without an answer in ``path`` (resume), after checking that the saved answers
    were made under the same ``settings``; writes the settings file next to ``path``. ``reader`` reads
    the file (:func:`read_predictions` or :func:`read_samples`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sidecar = settings_path(path)
    done: dict[str, dict] = {}
    if path.is_file():
        _repair_tail(path)
        done = reader(path)
    if done and sidecar.is_file():
        saved = json.loads(sidecar.read_text(encoding="utf-8"))
        changed = {key: (saved.get(key), value) for key, value in settings.items() if saved.get(key) != value}
        if changed:
            details = ", ".join(f"{key}: saved {old!r}, now {new!r}" for key, (old, new) in changed.items())
            raise ValueError(f"{path} holds {len(done)} answers made under other settings ({details}); "
                             "use another output_dir, or delete the file to regenerate")
    sidecar.write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return [item for item in items if str(item.index) not in done]
