"""MMPR reader: meta.json sources and their jsonl annotations, validated and indexed without images.

meta.json maps a source name to `{"root": image dir, "annotation": file.jsonl, "repeat_time": r,
"max_dynamic_patch": optional, "length": optional, "data_augment": optional}`; relative paths are
taken from the meta.json's directory. Each jsonl line is `{"image": str | [str] | absent,
"video": str (optional), "question", "chosen", "rejected", "answer_gt"?, "chosen_meta"?,
"rejected_meta"?}`. repeat_time < 1 keeps a seeded random subset of int(n·r) lines; > 1 repeats
each line int(r) times.

`scan_mmpr` reads every line once (no image is opened), rejects malformed records with a counted
reason, and returns references (file, byte offset) that `read_record` turns back into records.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from mpo.data.rejects import RejectLog
from mpo.data.template import normalize_text


class MetaError(ValueError):
    """meta.json cannot be used at all (fatal, unlike per-record rejects)."""


@dataclass(frozen=True)
class MMPRSource:
    name: str
    root: Path  # images are relative to this
    annotation: Path
    repeat_time: float = 1.0
    max_dynamic_patch: int | None = None


@dataclass(frozen=True)
class RecordRef:
    """Where one accepted record lives: source index, file, 1-based line number, byte offset."""

    source_index: int
    line: int
    offset: int


@dataclass
class PreferenceRecord:
    source: str
    file: str
    line: int
    question: str
    chosen: str
    rejected: str
    images: list[str] = field(default_factory=list)
    video: str | None = None
    answer_gt: str | None = None
    meta: dict = field(default_factory=dict)


def read_meta(meta_path: str | Path) -> list[MMPRSource]:
    """Parse meta.json into sources; any problem with the file itself raises `MetaError`."""
    meta_path = Path(meta_path)
    if meta_path.is_dir():
        meta_path = meta_path / "meta.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise MetaError(f"{meta_path} not found: an MMPR directory needs a meta.json") from err
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MetaError(f"{meta_path} is not valid JSON: {err}") from err
    if not isinstance(meta, dict) or not meta:
        raise MetaError(f"{meta_path} must be a non-empty JSON object mapping source names to entries")
    base = meta_path.parent
    sources = []
    for name, entry in meta.items():
        if not isinstance(entry, dict) or "annotation" not in entry:
            raise MetaError(f"{meta_path}: source {name!r} needs an object with at least 'annotation'")
        annotation = base / entry["annotation"]
        if not annotation.is_file():
            raise MetaError(f"{meta_path}: source {name!r} annotation {annotation} not found")
        repeat = entry.get("repeat_time", 1)
        if not isinstance(repeat, (int, float)) or isinstance(repeat, bool) or repeat <= 0:
            raise MetaError(f"{meta_path}: source {name!r} repeat_time must be a positive number, got {repeat!r}")
        mdp = entry.get("max_dynamic_patch")
        if mdp is not None and (not isinstance(mdp, int) or isinstance(mdp, bool) or mdp < 1):
            raise MetaError(f"{meta_path}: source {name!r} max_dynamic_patch must be a positive integer, got {mdp!r}")
        sources.append(MMPRSource(name=name, root=base / entry.get("root", "."), annotation=annotation,
                                  repeat_time=float(repeat), max_dynamic_patch=mdp))
    return sources


class RecordError(ValueError):
    """One jsonl record that cannot be used; `reason` is a short, countable category."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def parse_record(raw: bytes, *, source: str, file: str, line: int) -> PreferenceRecord:
    """Decode and validate one jsonl line; raises `RecordError` with a countable reason."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RecordError("invalid_utf8", f"line is not valid UTF-8 ({err})") from err
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise RecordError("malformed_json", f"cannot parse JSON ({err})") from err
    if not isinstance(obj, dict):
        raise RecordError("malformed_json", f"line is a JSON {type(obj).__name__}, not an object")
    for key in ("question", "chosen", "rejected"):
        if key not in obj:
            raise RecordError("missing_field", f"missing field {key!r}")
        if not isinstance(obj[key], str):
            raise RecordError("wrong_type", f"field {key!r} must be a string, got {type(obj[key]).__name__}")
    if not obj["chosen"].strip() or not obj["rejected"].strip():
        raise RecordError("empty_response", "chosen or rejected is empty")
    if normalize_text(obj["chosen"]) == normalize_text(obj["rejected"]):
        raise RecordError("identical_responses", "chosen and rejected are identical")
    images = obj.get("image", [])
    if images is None:
        images = []
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(i, str) and i for i in images):
        raise RecordError("wrong_type", "field 'image' must be a non-empty string or a list of them")
    video = obj.get("video")
    if video is not None and (not isinstance(video, str) or not video):
        raise RecordError("wrong_type", "field 'video' must be a non-empty string")
    if video is not None and images:
        raise RecordError("wrong_type", "a record has either 'image' or 'video', not both")
    answer_gt = obj.get("answer_gt")
    meta = {k: obj[k] for k in ("chosen_meta", "rejected_meta") if k in obj}
    return PreferenceRecord(source=source, file=file, line=line, question=obj["question"], chosen=obj["chosen"],
                            rejected=obj["rejected"], images=images, video=video,
                            answer_gt=None if answer_gt is None else str(answer_gt), meta=meta)


def _select_lines(num_lines: int, repeat_time: float, seed: int) -> list[int]:
    """Line indices kept by repeat_time, in file order (repeats adjacent)."""
    if repeat_time < 1:
        keep = sorted(random.Random(seed).sample(range(num_lines), int(num_lines * repeat_time)))
        return keep
    return [i for i in range(num_lines) for _ in range(int(repeat_time))]


@dataclass
class ScanResult:
    sources: list[MMPRSource]
    refs: list[RecordRef]
    num_read: int  # lines read (after repeat_time selection, before rejects)
    rejects: RejectLog


def scan_mmpr(meta_path: str | Path, *, rejects: RejectLog | None = None, seed: int = 0) -> ScanResult:
    """Read every selected line of every source once, validate it, and index the accepted ones.

    Counts reconcile: `num_read == len(refs) + rejects.total`. Blank lines are not records.
    """
    sources = read_meta(meta_path)
    rejects = rejects if rejects is not None else RejectLog()
    refs: list[RecordRef] = []
    num_read = 0
    for index, src in enumerate(sources):
        offsets, line_numbers = [], []  # of non-blank lines; line numbers are 1-based file lines
        with src.annotation.open("rb") as fh:
            pos = 0
            for number, raw in enumerate(fh, start=1):
                if raw.strip():
                    offsets.append(pos)
                    line_numbers.append(number)
                pos += len(raw)
        selected = _select_lines(len(offsets), src.repeat_time, seed + index)
        verdicts: dict[int, RecordError | None] = {}  # a repeated line is validated once
        with src.annotation.open("rb") as fh:
            for i in selected:
                num_read += 1
                if i not in verdicts:
                    fh.seek(offsets[i])
                    try:
                        parse_record(fh.readline(), source=src.name, file=str(src.annotation), line=line_numbers[i])
                        verdicts[i] = None
                    except RecordError as err:
                        verdicts[i] = err
                error = verdicts[i]
                if error is not None:
                    rejects.add(error.reason, str(error), file=src.annotation, line=line_numbers[i], source=src.name)
                    continue
                refs.append(RecordRef(index, line_numbers[i], offsets[i]))
    return ScanResult(sources=sources, refs=refs, num_read=num_read, rejects=rejects)


def read_record(sources: list[MMPRSource], ref: RecordRef) -> PreferenceRecord:
    """Re-read one indexed record from disk."""
    src = sources[ref.source_index]
    with src.annotation.open("rb") as fh:
        fh.seek(ref.offset)
        return parse_record(fh.readline(), source=src.name, file=str(src.annotation), line=ref.line)
