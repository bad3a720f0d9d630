"""Per-shard append files and the merge into a final MMPR directory with stats.

Each shard appends one JSON line per finished question to
``OUT/shards/shard-{index:05d}-of-{count:05d}.jsonl`` (flushed and fsync-ed, so a kill loses at
most the question in flight; a partial last line is ignored and cut off on resume). A line is::

    {"id", "source", "line", "cfg": settings fingerprint, "branch": "ground_truth" | "dropout_ntp" | "rejected",
     "status": outcome, "num_samples", "num_tokens", "counts": {...},
     "pairs": {"correctness": [record...], "format": [...], "dropout_ntp": [...]},
     "hard": hard-question record | null, "reject": {"reason", "message"} | null}

:func:`merge_shards` checks that every question has exactly one line, then writes, sorted by
question id (so the result does not depend on how the work was sharded):

- ``meta.json`` (one entry per file, named ``{source}_{kind}``),
- ``{source}_pairs_vqa_correctness_rules.jsonl``, ``{source}_pairs_vqa_format_rules.jsonl``,
  ``{source}_prefix_pair_sr{ratio}_wo_image.jsonl``,
- ``stats.json`` (per source and in total), ``hard_questions.jsonl``, ``rejects.jsonl``.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from data_pipeline.sources import QuestionSet

__all__ = [
    "PAIR_KINDS",
    "MergeError",
    "MergeSummary",
    "ShardWriter",
    "finished_ids",
    "iter_shard_lines",
    "kind_file_suffix",
    "merge_shards",
    "read_shard_lines",
    "shard_path",
]

PAIR_KINDS = ("correctness", "format", "dropout_ntp")
_SHARD_RE = re.compile(r"shard-(\d{5})-of-(\d{5})\.jsonl")  # groups: index, count


class MergeError(ValueError):
    """The shard files cannot be merged yet (missing shards or questions, mixed settings)."""


def kind_file_suffix(kind: str, ratio: float) -> str:
    """MMPR's file-name suffix of a pair kind: ``prefix_pair_sr0.5_wo_image`` for dropout_ntp at 0.5."""
    if kind == "correctness":
        return "pairs_vqa_correctness_rules"
    if kind == "format":
        return "pairs_vqa_format_rules"
    if kind == "dropout_ntp":
        return f"prefix_pair_sr{ratio:g}_wo_image"
    raise ValueError(f"unknown pair kind {kind!r}; use one of {', '.join(PAIR_KINDS)}")


def shard_path(out_dir: str | Path, index: int, count: int) -> Path:
    """Where shard ``index`` of ``count`` appends its lines."""
    return Path(out_dir) / "shards" / f"shard-{index:05d}-of-{count:05d}.jsonl"


def iter_shard_lines(path: str | Path) -> Iterator[dict]:
    """Complete lines of one shard file, in order, read as a stream.

    A last line without its newline (the write a kill interrupted) is ignored; a corrupt complete
    line (should not happen) is reported on stderr and ignored, so its question is redone.
    """
    path = Path(path)
    if not path.is_file():
        return
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.endswith(b"\n"):
                return  # the partial last line
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
                if not isinstance(obj, dict) or not isinstance(obj.get("id"), str):
                    raise ValueError("not a question line")
            except ValueError as err:
                print(f"warning: {path}:{number}: ignoring an unreadable line ({err})", file=sys.stderr)
                continue
            yield obj


def read_shard_lines(path: str | Path) -> list[dict]:
    """All complete lines of one shard file (see :func:`iter_shard_lines`)."""
    return list(iter_shard_lines(path))


def _shard_files(out_dir: Path) -> list[Path]:
    shard_dir = out_dir / "shards"
    if not shard_dir.is_dir():
        return []
    return sorted(p for p in shard_dir.iterdir() if _SHARD_RE.fullmatch(p.name))


def finished_ids(out_dir: str | Path, index: int | None = None, count: int | None = None) -> set[str]:
    """Ids with a complete line in the shard files of ``out_dir``.

    With ``index``/``count``: only the files that can hold that shard's questions, i.e. its own
    and those written with another shard count (a resume after re-sharding); the other shards of
    the same count own other ids, so their (possibly large) files are not read.
    """
    paths = _shard_files(Path(out_dir))
    if count is not None:
        own = shard_path(out_dir, index, count).name
        paths = [p for p in paths if p.name == own or int(_SHARD_RE.fullmatch(p.name).group(2)) != count]
    return {line["id"] for path in paths for line in iter_shard_lines(path)}


class ShardWriter:
    """Appends question lines to one shard file; holds an exclusive lock while open.

    On open, a partial last line left by a kill is cut off, so the next line starts clean.
    Two processes given the same shard fail fast instead of interleaving their lines.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.path.open("ab")
        try:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._fh.close()
            raise ValueError(f"{self.path} is locked by another process: two runs were given the same shard "
                             "(check shard.index / shard.count and the SLURM array or torchrun ranks)") from None
        self._cut_partial_tail()

    def _cut_partial_tail(self) -> None:
        size = self.path.stat().st_size
        if size == 0:
            return
        with self.path.open("rb") as fh:
            data = fh.read()
        keep = data.rfind(b"\n") + 1  # 0 when not even one line is complete
        if keep < size:
            os.truncate(self.path, keep)

    def write(self, line: dict) -> None:
        """Append one question line and make it durable before returning."""
        self._fh.write((json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8"))
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()  # also releases the lock
            self._fh = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class MergeSummary:
    """What :func:`merge_shards` wrote: file name -> records, and per-source stats."""

    files: dict[str, int] = field(default_factory=dict)
    stats: dict = field(default_factory=dict)


def _collect(out_dir: Path, fingerprint: str) -> dict[str, dict]:
    by_id: dict[str, dict] = {}
    for path in _shard_files(out_dir):
        for line in iter_shard_lines(path):
            if line.get("cfg") != fingerprint:
                raise MergeError(f"{path} holds results built with other settings (fingerprint {line.get('cfg')} "
                                 f"!= {fingerprint}); rerun those questions with the same settings or use a new "
                                 "output_dir")
            # The same id twice (a re-sharded resume) carries the same result: keep the first file's.
            by_id.setdefault(line["id"], line)
    return by_id


def _check_complete(out_dir: Path, questions: QuestionSet, by_id: dict[str, dict], shard_of, count: int) -> None:
    expected = {q.id for q in questions.questions}
    missing = sorted(expected - by_id.keys())
    unknown = sorted(by_id.keys() - expected)
    if unknown:
        raise MergeError(f"shard files hold {len(unknown)} question ids not in {questions.path} (e.g. {unknown[:3]}): "
                         "the questions changed since sampling; use a new output_dir")
    if not missing:
        return
    per_shard = Counter(shard_of(qid, count) for qid in missing)
    absent = [shard_path(out_dir, i, count).name for i in sorted(per_shard)
              if not shard_path(out_dir, i, count).is_file()]
    detail = ", ".join(f"shard {i} misses {n}" for i, n in sorted(per_shard.items()))
    hint = f"; shard files missing: {', '.join(absent)}" if absent else ""
    raise MergeError(f"{len(missing)} of {len(expected)} questions have no result yet (of {count} shards: {detail})"
                     f"{hint}. Run (or rerun, it resumes) stage=sample for those shards with shard.count={count}, "
                     "then merge again")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)  # readers never see a half-written file


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _relative_root(image_root: Path, out_dir: Path) -> str:
    image_root, out_dir = image_root.resolve(), out_dir.resolve()
    # Only a root sharing more than "/" with OUT is written relative (keeps OUT movable with its images).
    if os.path.commonpath([image_root, out_dir]) == os.sep:
        return str(image_root)
    return os.path.relpath(image_root, out_dir)


def _empty_stats() -> dict:
    return {
        "questions": 0, "samples": 0, "generated_tokens": 0,
        "ground_truth": {"questions": 0, "samples": 0, "positive": 0, "negative": 0, "format_failure": 0,
                         "positive_rate": None, "outcomes": Counter()},
        "dropout_ntp": {"questions": 0, "samples": 0, "outcomes": Counter()},
        "pairs": Counter(), "rejects": Counter(), "hard_questions": 0, "dropped_all_correct": 0,
    }


def _accumulate(stats: dict, line: dict, suffixes: dict[str, str]) -> None:
    if line["branch"] == "rejected":
        stats["rejects"][line["reject"]["reason"]] += 1
        return
    stats["questions"] += 1
    stats["samples"] += line["num_samples"]
    stats["generated_tokens"] += line["num_tokens"]
    branch = stats[line["branch"]]
    branch["questions"] += 1
    branch["samples"] += line["num_samples"]
    branch["outcomes"][line["status"]] += 1
    for key, value in line.get("counts", {}).items():
        branch[key] += value
    for kind, records in line["pairs"].items():
        if records:
            stats["pairs"][suffixes[kind]] += len(records)
    stats["hard_questions"] += line.get("hard") is not None
    stats["dropped_all_correct"] += line["status"] == "all_correct"


def _finish_stats(stats: dict) -> dict:
    gt = stats["ground_truth"]
    gt["positive_rate"] = round(gt["positive"] / gt["samples"], 6) if gt["samples"] else None
    for section in (gt, stats["dropout_ntp"]):
        section["outcomes"] = dict(sorted(section["outcomes"].items()))
    stats["pairs"] = dict(sorted(stats["pairs"].items()))
    stats["rejects"] = dict(sorted(stats["rejects"].items()))
    return stats


def _sum_stats(per_source: dict[str, dict]) -> dict:
    total = _empty_stats()
    for stats in per_source.values():
        for key in ("questions", "samples", "generated_tokens", "hard_questions", "dropped_all_correct"):
            total[key] += stats[key]
        for key in ("pairs", "rejects"):
            total[key].update(stats[key])
        for branch in ("ground_truth", "dropout_ntp"):
            for key, value in stats[branch].items():
                if key == "outcomes":
                    total[branch]["outcomes"].update(value)
                elif key != "positive_rate":
                    total[branch][key] += value
    return _finish_stats(total)


def _remove_stale_outputs(out_dir: Path, keep: set[str]) -> None:
    """Drop pair files of an earlier merge that this one no longer produces (meta.json is rewritten)."""
    pattern = re.compile(
        r".+_(pairs_vqa_correctness_rules|pairs_vqa_format_rules|prefix_pair_sr[\d.e-]+_wo_image)\.jsonl")
    for path in out_dir.iterdir():
        if pattern.fullmatch(path.name) and path.name not in keep:
            path.unlink()


def merge_shards(out_dir: str | Path, questions: QuestionSet, *, fingerprint: str, ratio: float,
                 shard_of, shard_count: int) -> MergeSummary:
    """Merge every shard file of ``out_dir`` into the final MMPR directory.

    Args:
        out_dir: the build's output directory (holding ``shards/``).
        questions: the questions as read for sampling (input rejects included).
        fingerprint: settings fingerprint every shard line must carry.
        ratio: Dropout-NTP ratio (names the ``prefix_pair_sr{ratio}_wo_image`` files).
        shard_of: ``(id, count) -> shard index``, for naming the shards that still miss questions.
        shard_count: the shard count to name in that message.

    Returns:
        A :class:`MergeSummary`.

    Raises:
        MergeError: a question has no result, results of other settings or questions are present.
    """
    out_dir = Path(out_dir)
    by_id = _collect(out_dir, fingerprint)
    _check_complete(out_dir, questions, by_id, shard_of, shard_count)
    suffixes = {kind: kind_file_suffix(kind, ratio) for kind in PAIR_KINDS}
    files: dict[str, list[dict]] = {}
    stats: dict[str, dict] = {}
    hard, rejects = [], []
    for reject in questions.rejects:
        stats.setdefault(reject.source, _empty_stats())["rejects"][reject.reason] += 1
        rejects.append({"id": reject.id, "source": reject.source, "file": str(questions.path), "line": reject.line,
                        "reason": reject.reason, "message": reject.message})
    for qid in sorted(by_id):
        line = by_id[qid]
        _accumulate(stats.setdefault(line["source"], _empty_stats()), line, suffixes)
        for kind in PAIR_KINDS:
            records = line["pairs"].get(kind, [])
            if records:
                files.setdefault(f"{line['source']}_{suffixes[kind]}", []).extend(records)
        if line.get("hard") is not None:
            hard.append(line["hard"])
        if line["branch"] == "rejected":
            rejects.append({"id": qid, "source": line["source"], "file": str(questions.path), "line": line.get("line"),
                            **line["reject"]})
    rejects.sort(key=lambda r: (r["line"] or 0, r["id"]))
    root = _relative_root(questions.image_root, out_dir)
    meta = {}
    for name in sorted(files):
        _write_jsonl(out_dir / f"{name}.jsonl", files[name])
        meta[name] = {"root": root, "annotation": f"{name}.jsonl", "repeat_time": 1, "length": len(files[name])}
    _remove_stale_outputs(out_dir, {f"{name}.jsonl" for name in files})
    _write_json(out_dir / "meta.json", meta)
    per_source = {name: _finish_stats(s) for name, s in sorted(stats.items())}
    all_stats = {"sources": per_source, "total": _sum_stats(per_source)}
    _write_json(out_dir / "stats.json", all_stats)
    _write_jsonl(out_dir / "hard_questions.jsonl", hard)
    _write_jsonl(out_dir / "rejects.jsonl", rejects)
    return MergeSummary(files={f"{name}.jsonl": len(rows) for name, rows in sorted(files.items())}, stats=all_stats)
