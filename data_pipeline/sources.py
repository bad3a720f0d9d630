"""Question readers for the pair builder: jsonl, parquet or a saved `datasets` directory.

    qs = read_questions("synth/questions/build.jsonl", image_root="synth")
    qs.questions[0].id, qs.questions[0].images, qs.questions[0].answer   # 'build_00000', ['images/...'], '2'
    qs.rejects                                                            # bad records, counted by reason

Each record: ``id`` (optional; default ``{source}-{line}``, line 1-based), ``image`` (str, list of
str, or absent; relative to the image root), ``question``, ``answer`` (optional ground truth: a
string, a number, or a list of acceptable strings; absent means the Dropout-NTP branch),
``options`` (optional option texts in A, B, C order), ``source`` (default "default") and
``match_mode`` (optional). Other fields are ignored.

Reading never raises for a bad record: it becomes an :class:`InputReject` with a countable reason
(``missing_field``, ``wrong_type``, ``empty_question``, ``bad_source``, ``bad_match_mode``,
``duplicate_id``, ``placeholder_mismatch``, ``path_escapes_root``, ``missing_image``,
``malformed_json``, ``invalid_utf8``) unless ``strict=True``, which raises on the first. Images are
checked to exist but not opened here (the engine opens them; a corrupt file is counted then).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from data_pipeline.answers import MATCH_MODES
from data_pipeline.prompts import strip_short_answer_instructions
from mpo.data.images import MediaError, resolve_media_path
from mpo.data.rejects import DataError
from mpo.data.template import TemplateError, place_image_placeholders

__all__ = ["DEFAULT_SOURCE", "InputReject", "Question", "QuestionSet", "iter_raw_records", "read_questions"]

DEFAULT_SOURCE = "default"
# Source names become file names ({source}_pairs_vqa_correctness_rules.jsonl) and meta.json keys.
_SOURCE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")


@dataclass(frozen=True)
class Question:
    """One usable question.

    Attributes:
        id: unique id (the key of sharding, resume, per-question seeds and output order).
        source: source name (one output file per source and pair kind).
        question: the question text as given (instructions not yet stripped).
        images: image paths relative to the image root, in prompt order.
        answer: ground truth (one string or several acceptable ones), or None.
        options: option texts in A, B, C order, or None.
        match_mode: the record's matching mode, or None (the config decides).
        line: 1-based record number in the input (file line for jsonl, row + 1 otherwise).
    """

    id: str
    source: str
    question: str
    images: tuple[str, ...] = ()
    answer: str | tuple[str, ...] | None = None
    options: tuple[str, ...] | None = None
    match_mode: str | None = None
    line: int = 0


@dataclass(frozen=True)
class InputReject:
    """A record that cannot be used, with a countable ``reason`` and where it was."""

    id: str
    source: str
    line: int
    reason: str
    message: str


@dataclass
class QuestionSet:
    """What :func:`read_questions` found: usable questions, rejects, and the resolved image root."""

    path: Path
    image_root: Path
    questions: list[Question] = field(default_factory=list)
    rejects: list[InputReject] = field(default_factory=list)

    @property
    def num_read(self) -> int:
        """Records read (usable + rejected)."""
        return len(self.questions) + len(self.rejects)


class _BadRecord(ValueError):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def iter_raw_records(path: str | Path) -> Iterator[tuple[int, dict | _BadRecord]]:
    """(1-based record number, raw record or the error that made it unreadable) for each record.

    ``path``: a ``.jsonl`` / ``.json`` lines file (blank lines skipped), a ``.parquet`` file, or a
    directory written by ``datasets.Dataset.save_to_disk`` (a ``DatasetDict`` with one split is
    accepted; with several, point at one split's subdirectory).
    """
    path = Path(path)
    if path.is_dir():
        yield from _iter_datasets_dir(path)
    elif not path.is_file():
        raise ValueError(f"questions={path} not found: give a .jsonl or .parquet file or a saved datasets directory")
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for row, record in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield row, record
    elif path.suffix in (".jsonl", ".json", ".ndjson"):
        yield from _iter_jsonl(path)
    else:
        raise ValueError(f"questions={path}: unknown format {path.suffix!r}; "
                         "use .jsonl, .parquet or a datasets directory")


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict | _BadRecord]]:
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as err:
                yield number, _BadRecord("invalid_utf8", f"line is not valid UTF-8 ({err})")
                continue
            except json.JSONDecodeError as err:
                yield number, _BadRecord("malformed_json", f"cannot parse JSON ({err})")
                continue
            if not isinstance(obj, dict):
                yield number, _BadRecord("malformed_json", f"line is a JSON {type(obj).__name__}, not an object")
                continue
            yield number, obj


def _iter_datasets_dir(path: Path) -> Iterator[tuple[int, dict]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as err:
        raise ValueError(f"questions={path} is a directory but not a saved datasets directory ({err})") from err
    if isinstance(loaded, datasets.DatasetDict):
        if len(loaded) != 1:
            raise ValueError(f"questions={path} holds splits {sorted(loaded)}; point questions at one split, "
                             f"e.g. questions={path / sorted(loaded)[0]}")
        loaded = next(iter(loaded.values()))
    for row, record in enumerate(loaded, start=1):
        yield row, record


def _absent(value) -> bool:
    # parquet / datasets rows carry None (or NaN from pandas-written files) for missing fields
    return value is None or (isinstance(value, float) and math.isnan(value))


def _text_list(name: str, value, *, allow_single: bool) -> tuple[str, ...]:
    if allow_single and isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise _BadRecord("wrong_type", f"field {name!r} must be a non-empty list of strings, got {value!r}")
    if not all(isinstance(v, str) and v.strip() for v in value):
        raise _BadRecord("wrong_type", f"every entry of {name!r} must be a non-empty string, got {value!r}")
    return tuple(value)


def _answer(value) -> str | tuple[str, ...] | None:
    if _absent(value):
        return None
    if isinstance(value, bool):  # True/False are ambiguous: "Yes"? "true"? make the source say
        raise _BadRecord("wrong_type", f"field 'answer' must be a string or number, got the boolean {value!r}")
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        if not value.strip():
            raise _BadRecord("wrong_type", "field 'answer' is empty: leave it out for the Dropout-NTP branch")
        return value
    answers = _text_list("answer", value, allow_single=False)
    return answers[0] if len(answers) == 1 else answers


def _parse(obj: dict, line: int, image_root: Path, seen: set[str]) -> Question:
    source = obj.get("source")
    source = DEFAULT_SOURCE if _absent(source) else source
    if not isinstance(source, str) or not _SOURCE_RE.fullmatch(source):
        raise _BadRecord("bad_source", f"source must match {_SOURCE_RE.pattern} (it names output files), "
                                       f"got {source!r}")
    record_id = obj.get("id")
    if _absent(record_id):
        record_id = f"{source}-{line}"
    elif isinstance(record_id, bool) or not isinstance(record_id, (str, int)) or not str(record_id).strip():
        raise _BadRecord("wrong_type", f"field 'id' must be a non-empty string or an integer, got {record_id!r}")
    record_id = str(record_id)
    if record_id in seen:
        raise _BadRecord("duplicate_id", f"id {record_id!r} was already used by an earlier record")
    question = obj.get("question")
    if _absent(question):
        raise _BadRecord("missing_field", "missing field 'question'")
    if not isinstance(question, str):
        raise _BadRecord("wrong_type", f"field 'question' must be a string, got {type(question).__name__}")
    if not strip_short_answer_instructions(question).strip():
        raise _BadRecord("empty_question", "field 'question' is empty once short-answer instructions are stripped")
    images = () if _absent(obj.get("image")) else _text_list("image", obj["image"], allow_single=True)
    answer = _answer(obj.get("answer"))
    options = None if _absent(obj.get("options")) else _text_list("options", obj["options"], allow_single=False)
    if options is not None and len(options) > 26:
        raise _BadRecord("wrong_type", f"at most 26 options (letters A-Z) are supported, got {len(options)}")
    mode = obj.get("match_mode")
    mode = None if _absent(mode) else mode
    if mode is not None and mode not in MATCH_MODES:
        raise _BadRecord("bad_match_mode", f"match_mode {mode!r} is not one of {', '.join(MATCH_MODES)}")
    try:
        place_image_placeholders(question, len(images))  # the engine renders it the same way
        for rel in images:
            if not resolve_media_path(image_root, rel).is_file():
                raise MediaError("missing_image", f"image {rel!r} not found under image_root {image_root}")
    except (MediaError, TemplateError) as err:
        raise _BadRecord(err.reason, str(err)) from err
    return Question(record_id, source, question, images, answer, options, mode, line)


def _fallback_identity(obj, line: int) -> tuple[str, str]:
    """(id, source) of a rejected record, as far as they can be read, for counting and sharding."""
    source = obj.get("source") if isinstance(obj, dict) else None
    source = source if isinstance(source, str) and _SOURCE_RE.fullmatch(source) else DEFAULT_SOURCE
    record_id = obj.get("id") if isinstance(obj, dict) else None
    if isinstance(record_id, bool) or not isinstance(record_id, (str, int)) or not str(record_id).strip():
        record_id = f"{source}-{line}"
    return str(record_id), source


def read_questions(path: str | Path, *, image_root: str | Path | None = None, strict: bool = False) -> QuestionSet:
    """Read and validate every record of a questions file or datasets directory.

    Args:
        path: the questions (see :func:`iter_raw_records` for the formats).
        image_root: directory that image paths are relative to; default: the directory holding
            ``path`` (for a datasets directory, its parent).
        strict: raise :class:`~mpo.data.rejects.DataError` at the first bad record instead of
            counting it.

    Returns:
        A :class:`QuestionSet`; ``num_read == len(questions) + len(rejects)``.

    Raises:
        ValueError: ``path`` is missing or of an unknown format, or ``image_root`` is not a directory.
        DataError: a bad record with ``strict=True``.
    """
    path = Path(path).resolve()
    root = Path(image_root).resolve() if image_root is not None else path.parent
    if not root.is_dir():
        raise ValueError(f"image_root={root} is not a directory")
    result = QuestionSet(path=path, image_root=root)
    seen: set[str] = set()
    for line, raw in iter_raw_records(path):
        try:
            if isinstance(raw, _BadRecord):
                raise raw
            question = _parse(raw, line, root, seen)
        except _BadRecord as err:
            if strict:
                raise DataError(f"{path}:{line}: {err.reason}: {err}") from None
            record_id, source = _fallback_identity(raw, line)
            if err.reason == "duplicate_id":  # keep the first record's id unique in every later step
                record_id = f"{record_id}#line{line}"
            result.rejects.append(InputReject(record_id, source, line, err.reason, str(err)))
            continue
        seen.add(question.id)
        result.questions.append(question)
    return result
