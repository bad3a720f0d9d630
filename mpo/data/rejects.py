"""Counted, logged rejects: every bad record is skipped with a reason, or raised in strict mode."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path


class DataError(ValueError):
    """Raised in strict mode for the first bad record, naming file, line and reason."""


class RejectLog:
    """Counts rejects per reason and writes one jsonl line per reject (file, line, reason, message).

    With `strict=True` the first reject raises `DataError` instead. `path=None` keeps the lines in
    memory only (`self.entries`); `append=True` continues an existing file (resumed runs).
    """

    def __init__(self, path: str | Path | None = None, *, strict: bool = False, append: bool = False):
        self.path = Path(path) if path is not None else None
        self.strict = strict
        self.counts: Counter[str] = Counter()
        self.entries: list[dict] = []
        self._fh = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = self.path.open("a" if append else "w", encoding="utf-8")

    def add(self, reason: str, message: str, *, file: str | Path | None = None, line: int | None = None,
            source: str | None = None) -> None:
        if self.strict:
            where = f"{file}:{line}" if line is not None else str(file)
            raise DataError(f"{where}: {reason}: {message}")
        self.counts[reason] += 1
        entry = {"file": str(file) if file is not None else None, "line": line, "source": source,
                 "reason": reason, "message": message}
        self.entries.append(entry)
        if self._fh is not None:
            self._fh.write(json.dumps(entry, ensure_ascii=False) + "\n")
            self._fh.flush()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "RejectLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
