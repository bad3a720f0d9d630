"""Question readers of the pair builder (data_pipeline/sources.py): formats, defaults, bad records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_image

from data_pipeline.sources import InputReject, Question, read_questions
from mpo.data.rejects import DataError

GOOD = [
    {"id": "q1", "image": "img/a.png", "question": "<image>\nHow many circles?", "answer": "3", "source": "count"},
    {"image": ["img/a.png", "img/b.png"], "question": "Which is larger?", "answer": "B",
     "options": ["left", "right"], "source": "compare", "match_mode": "choice"},
    {"id": 7, "question": "Describe a sunset.", "source": "caption"},  # text-only, no answer: Dropout-NTP
    {"id": "q4", "image": "img/b.png", "question": "What number?", "answer": 42},
]


def _tree(tmp_path: Path) -> Path:
    write_image(tmp_path / "img" / "a.png")
    write_image(tmp_path / "img" / "b.png", color=(0, 0, 200))
    return tmp_path


def _jsonl(path: Path, rows: list, raw: list[bytes] = ()) -> Path:
    with path.open("wb") as fh:
        for row in rows:
            fh.write((json.dumps(row) + "\n").encode())
        for line in raw:
            fh.write(line + b"\n")
    return path


def _check_good(questions: list[Question], first_line: int = 1) -> None:
    assert [q.id for q in questions] == ["q1", f"compare-{first_line + 1}", "7", "q4"]
    q1, q2, q3, q4 = questions
    assert q1.images == ("img/a.png",) and q1.answer == "3" and q1.source == "count" and q1.match_mode is None
    assert q2.images == ("img/a.png", "img/b.png") and q2.options == ("left", "right") and q2.match_mode == "choice"
    assert q3.images == () and q3.answer is None and q3.source == "caption"
    assert q4.answer == "42" and q4.source == "default"  # numbers become strings; source defaults


def test_jsonl_reads_fields_and_defaults(tmp_path):
    root = _tree(tmp_path)
    path = _jsonl(root / "q.jsonl", GOOD[:2], [b"   "])
    with path.open("a") as fh:  # a blank line is not a record but still counts as a line
        for row in GOOD[2:]:
            fh.write(json.dumps(row) + "\n")
    qs = read_questions(path)
    assert qs.image_root == root.resolve()  # default: the questions file's directory
    assert qs.rejects == []
    assert [q.line for q in qs.questions] == [1, 2, 4, 5]
    _check_good(qs.questions)


def test_parquet_and_datasets_dir_read_the_same_records(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = _tree(tmp_path)
    # Arrow columns need one type: images as lists, answers and ids as strings
    rows = [dict(r, image=[r["image"]] if isinstance(r.get("image"), str) else r.get("image")) for r in GOOD]
    rows = [dict(r, answer=None if r.get("answer") is None else str(r["answer"]),
                 id=None if r.get("id") is None else str(r["id"])) for r in rows]
    keys = sorted({k for r in rows for k in r})  # from_pylist takes the schema from the first row
    rows = [{k: r.get(k) for k in keys} for r in rows]
    pq.write_table(pa.Table.from_pylist(rows), root / "q.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(root / "q_ds"))
    for path in (root / "q.parquet", root / "q_ds"):
        qs = read_questions(path)
        assert qs.image_root == root.resolve()
        assert qs.rejects == []
        _check_good(qs.questions)
        assert qs.questions[3].answer == "42"


def test_datasets_dict_with_several_splits_asks_for_one(tmp_path):
    import datasets

    dd = datasets.DatasetDict({"a": datasets.Dataset.from_list([{"question": "x"}]),
                               "b": datasets.Dataset.from_list([{"question": "y"}])})
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match="point questions at one split"):
        read_questions(tmp_path / "dd")
    qs = read_questions(tmp_path / "dd" / "a")
    assert [q.question for q in qs.questions] == ["x"]


BAD = [
    ({"image": "img/a.png"}, "missing_field"),
    ({"question": 5}, "wrong_type"),
    ({"question": "   "}, "empty_question"),
    ({"question": "Answer with the option's letter from the given choices directly."}, "empty_question"),
    ({"question": "q", "image": "img/missing.png"}, "missing_image"),
    ({"question": "q", "image": "../outside.png"}, "path_escapes_root"),
    ({"question": "q", "image": ["img/a.png", 3]}, "wrong_type"),
    ({"question": "q", "answer": True}, "wrong_type"),
    ({"question": "q", "answer": ""}, "wrong_type"),
    ({"question": "q", "options": "A. x"}, "wrong_type"),
    ({"question": "q", "source": "a/b"}, "bad_source"),
    ({"question": "q", "match_mode": "fuzzy"}, "bad_match_mode"),
    ({"question": "<image>\n<image>\nq", "image": "img/a.png"}, "placeholder_mismatch"),
    ({"question": "q", "id": {"x": 1}}, "wrong_type"),
    ({"id": "q1", "question": "again"}, "duplicate_id"),
]


def test_bad_records_are_counted_by_reason_not_raised(tmp_path):
    root = _tree(tmp_path / "data")
    write_image(tmp_path / "outside.png")
    path = _jsonl(root / "q.jsonl", [GOOD[0]] + [rec for rec, _ in BAD], [b"{not json", b"[1, 2]", b"\xff\xfe"])
    qs = read_questions(path)
    assert [q.id for q in qs.questions] == ["q1"]
    expected = [reason for _, reason in BAD] + ["malformed_json", "malformed_json", "invalid_utf8"]
    assert [r.reason for r in qs.rejects] == expected
    assert [r.line for r in qs.rejects] == list(range(2, 2 + len(expected)))
    assert qs.num_read == 1 + len(expected)
    assert all(isinstance(r, InputReject) and r.message for r in qs.rejects)
    dup = qs.rejects[len(BAD) - 1]
    assert dup.id == f"q1#line{len(BAD) + 1}" and "already used" in dup.message
    assert qs.rejects[0].id == "default-2"  # a rejected record still gets an id and a source for counting


def test_strict_fails_on_the_first_bad_record(tmp_path):
    root = _tree(tmp_path)
    path = _jsonl(root / "q.jsonl", [GOOD[0], {"question": "q", "image": "img/nope.png"}, {"image": "x"}])
    with pytest.raises(DataError, match=r"q.jsonl:2: missing_image"):
        read_questions(path, strict=True)


def test_explicit_image_root_and_bad_paths(tmp_path):
    root = _tree(tmp_path / "images_here")
    (tmp_path / "qs").mkdir()
    path = _jsonl(tmp_path / "qs" / "q.jsonl", [GOOD[0]])
    assert read_questions(path).rejects[0].reason == "missing_image"  # default root is qs/
    assert read_questions(path, image_root=root).questions[0].images == ("img/a.png",)
    with pytest.raises(ValueError, match="image_root=.* is not a directory"):
        read_questions(path, image_root=tmp_path / "nope")
    with pytest.raises(ValueError, match="not found"):
        read_questions(tmp_path / "missing.jsonl")
    (tmp_path / "q.csv").write_text("question\nx\n")
    with pytest.raises(ValueError, match="unknown format '.csv'"):
        read_questions(tmp_path / "q.csv")


def test_list_answers_and_nan_fields(tmp_path):
    path = _jsonl(tmp_path / "q.jsonl", [{"question": "q", "answer": ["cat", "kitten"]},
                                         {"question": "r", "answer": ["dog"]}])
    qs = read_questions(path)
    assert qs.questions[0].answer == ("cat", "kitten")
    assert qs.questions[1].answer == "dog"
    # pandas-written parquet files carry NaN for missing values: treated as absent
    import pandas as pd

    pd.DataFrame([{"question": "q", "answer": float("nan"), "source": None}]).to_parquet(tmp_path / "n.parquet")
    q = read_questions(tmp_path / "n.parquet").questions[0]
    assert q.answer is None and q.source == "default" and q.id == "default-1"
