"""Tests for the synthetic visual task generator (data_pipeline.synthetic / synthetic_render)."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import math
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipeline.synthetic import (
    KINDS,
    MATCH_MODES,
    answer_from_scene,
    cot_answer,
    generate_task,
    main,
    sample_question,
)
from data_pipeline.synthetic_render import COLORS, DIGIT_SEGMENTS, render_scene, segment_boxes

# The palette as specified for the task, written out here independently of the module.
RGB = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
AREA_PER_R2 = {"circle": math.pi, "square": 1.6**2, "triangle": 3 * math.sqrt(3) / 4}
REFERENCE_PROMPT_HEAD = (
    "Your task is to answer the question below. Give step by step reasoning before you answer, and "
    'when you\'re ready to answer, please use the format "Final answer: .."\n\nQuestion:\n\n'
)
SMALL = dict(num_train=45, num_pairs_questions=20, num_test=27, image_size=96)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    result = generate_task(out, seed=3, **SMALL)
    return out, result


def _read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text("utf-8").splitlines()]


def _all_records(out: Path) -> dict[str, list[dict]]:
    return {s: _read_jsonl(out / "questions" / f"{s}.jsonl") for s in ("train", "build", "test")}


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _pixels(png: bytes | Path) -> np.ndarray:
    data = png.read_bytes() if isinstance(png, Path) else png
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _final_answer(text: str) -> str:
    last = text.splitlines()[-1]
    assert last.startswith("Final answer: "), text
    return last[len("Final answer: "):]


# ---------------------------------------------------------------- independent answer derivation

def _hits(objects, flt):
    return [o for o in objects
            if (flt["color"] is None or o["color"] == flt["color"])
            and (flt["shape"] is None or o["shape"] == flt["shape"])]


def _expected_answer(record: dict) -> str:
    """Re-derive the answer from the stored scene, written without the module's helpers."""
    scene, query, options = record["scene"], record["query"], record.get("options")
    op = query["op"]
    if op == "digit":
        return str(scene["digit"])
    if op == "chart_value":
        (bar,) = [b for b in scene["bars"] if b["label"] == query["label"]]
        return str(bar["value"])
    if op == "chart_tallest":
        values = [b["value"] for b in scene["bars"]]
        assert values.count(max(values)) == 1
        return "ABCD"[options.index("bar " + "ABCD"[values.index(max(values))])]
    objects = scene["objects"]
    if op == "count":
        return str(len(_hits(objects, query["filter"])))
    if op == "exist":
        return "Yes" if _hits(objects, query["filter"]) else "No"
    if op == "total_minus":
        return str(len(objects) - len(_hits(objects, query["filter"])))
    if op == "sum":
        first, second = (_hits(objects, f) for f in query["filters"])
        assert not [o for o in first if o in second], "sum terms must be disjoint"
        return str(len(first) + len(second))
    if op == "color_of_largest":
        areas = sorted((AREA_PER_R2[o["shape"]] * o["r"] ** 2, o["color"]) for o in objects)
        assert areas[-1][0] >= 1.5 * areas[-2][0], "the largest shape must be clearly largest"
        return "ABCD"[options.index(areas[-1][1])]
    (obj,) = _hits(objects, query["filter"])
    if op == "shape_of":
        return obj["shape"]
    if op == "color_of":
        return "ABCD"[options.index(obj["color"])]
    assert op == "position"
    w, h = scene["width"], scene["height"]
    if query["axis"] == "horizontal":  # the whole object lies inside one half
        side = "left" if obj["cx"] + obj["r"] < w / 2 else "right" if obj["cx"] - obj["r"] > w / 2 else None
    else:
        side = "top" if obj["cy"] + obj["r"] < h / 2 else "bottom" if obj["cy"] - obj["r"] > h / 2 else None
    assert side is not None, f"target straddles the middle: {obj}"
    return "ABCD"[options.index(side)]


def test_answers_match_the_scene(task):
    out, _ = task
    for records in _all_records(out).values():
        for record in records:
            assert record["answer"] == _expected_answer(record), record["id"]
            assert record["match_mode"] == MATCH_MODES[record["kind"]]
            assert record["source"] == f"synthetic_{record['kind']}"
            assert record["question"].startswith("<image>\n") and record["question"].endswith("?")
            assert record["question"].count("\n") == 1  # options live in "options" only
            if record["match_mode"] == "choice":
                assert 2 <= len(record["options"]) <= 4 and record["answer"] in "ABCD"[: len(record["options"])]
            else:
                assert "options" not in record
            if record["match_mode"] == "yesno":
                assert record["answer"] in ("Yes", "No")
            if record["match_mode"] == "number":
                assert record["answer"].isdigit()


def test_hand_built_scenes():
    scene = {"type": "shapes", "width": 100, "height": 100, "background": [255, 255, 255],
             "objects": [{"shape": "circle", "color": "red", "cx": 20, "cy": 20, "r": 8},
                         {"shape": "circle", "color": "red", "cx": 60, "cy": 20, "r": 8},
                         {"shape": "square", "color": "blue", "cx": 20, "cy": 70, "r": 20}]}
    red_circles = {"color": "red", "shape": "circle"}
    assert answer_from_scene(scene, {"op": "count", "filter": red_circles}) == "2"
    assert answer_from_scene(scene, {"op": "exist", "filter": {"color": "blue", "shape": "triangle"}}) == "No"
    squares = {"color": None, "shape": "square"}
    assert answer_from_scene(scene, {"op": "total_minus", "filter": squares}) == "2"
    options = ["green", "blue", "red", "yellow"]
    assert answer_from_scene(scene, {"op": "color_of_largest"}, options) == "B"
    # The blue square (cx 20) is on the left; options in the order right, left -> B.
    pos = {"op": "position", "filter": {"color": "blue", "shape": "square"}, "axis": "horizontal"}
    assert answer_from_scene(scene, pos, ["right", "left"]) == "B"
    with pytest.raises(ValueError, match="no well-defined answer"):
        answer_from_scene(scene, {"op": "shape_of", "filter": {"color": "red", "shape": None}})

    record = {"scene": scene, "query": {"op": "count", "filter": red_circles}, "answer": "2"}
    text = cot_answer(record, correct=True, rng=random.Random(0))
    assert text == ("I see 2 red circles and 1 blue square. Counting the red circles gives 2.\n"
                    "Final answer: 2")
    chart = {"type": "chart", "width": 100, "height": 100, "background": [255, 255, 255],
             "max_value": 10, "plot": [12, 6, 94, 89],
             "bars": [{"label": "A", "value": 4, "color": "red", "box": [20, 56, 30, 89]},
                      {"label": "B", "value": 7, "color": "blue", "box": [60, 31, 70, 89]}]}
    record = {"scene": chart, "query": {"op": "chart_tallest"}, "options": ["bar A", "bar B"],
              "answer": "B"}
    assert cot_answer(record, rng=random.Random(0)) == (
        "The chart has 2 bars: A = 4 and B = 7. The tallest bar is B with a value of 7, which is "
        "option B.\nFinal answer: B")


# ---------------------------------------------------------------- pixels

def test_images_show_the_scene(task):
    out, _ = task
    checked = Counter()
    for records in _all_records(out).values():
        for record in records:
            scene = record["scene"]
            pixels = _pixels(out / record["image"])
            assert pixels.shape == (scene["height"], scene["width"], 3)
            # Drawing is a pure function of the stored scene.
            assert np.array_equal(pixels, np.asarray(render_scene(scene)))
            assert tuple(pixels[0, 0]) == tuple(scene["background"])
            if scene["type"] == "shapes":
                objs = scene["objects"]
                for i, o in enumerate(objs):
                    assert tuple(pixels[o["cy"], o["cx"]]) == RGB[o["color"]]
                    assert o["r"] <= o["cx"] < scene["width"] - o["r"]
                    assert o["r"] <= o["cy"] < scene["height"] - o["r"]
                    for p in objs[i + 1:]:
                        assert math.hypot(o["cx"] - p["cx"], o["cy"] - p["cy"]) > o["r"] + p["r"]
                    # A point just outside the circumcircle, towards the nearer border, is background.
                    dy = o["r"] + 1 if o["cy"] < scene["height"] / 2 else -(o["r"] + 1)
                    others = [p for p in objs if p is not o]
                    if all(math.hypot(o["cx"] - p["cx"], o["cy"] + dy - p["cy"]) > p["r"] + 1 for p in others):
                        checked["outside"] += 1
                        assert tuple(pixels[o["cy"] + dy, o["cx"]]) == tuple(scene["background"])
            elif scene["type"] == "chart":
                x0, y0, x1, y1 = scene["plot"]
                unit = (y1 - y0) / scene["max_value"]
                for bar in scene["bars"]:
                    bx0, top, bx1, bottom = bar["box"]
                    assert bottom == y1 and bottom - top == round(bar["value"] * unit)
                    cx = (bx0 + bx1) // 2
                    assert tuple(pixels[(top + bottom) // 2, cx]) == RGB[bar["color"]]
                    assert tuple(pixels[top, cx]) == RGB[bar["color"]]
                    assert tuple(pixels[top - 2, cx]) != RGB[bar["color"]]  # the bar ends at its value
                lefts = [b["box"][0] for b in scene["bars"]]
                assert lefts == sorted(lefts)  # labels A, B, ... run left to right
            else:
                boxes = segment_boxes(scene["box"], scene["thickness"])
                lit = set(DIGIT_SEGMENTS[scene["digit"]])
                for name, (sx0, sy0, sx1, sy1) in boxes.items():
                    x, y = (sx0 + sx1) // 2, (sy0 + sy1) // 2  # no other segment covers a centre
                    want = RGB[scene["color"]] if name in lit else tuple(scene["background"])
                    assert tuple(pixels[y, x]) == want, (record["id"], name)
            checked[scene["type"]] += 1
    assert min(checked.values()) >= 5 and len(checked) == 4


def test_palette_matches_specification():
    assert {k: tuple(v) for k, v in COLORS.items()} == RGB


# ---------------------------------------------------------------- chain of thought

def test_cot_answers_end_with_the_right_final_answer(task):
    out, _ = task
    for records in _all_records(out).values():
        for record in records:
            good = cot_answer(record, correct=True, rng=random.Random(1))
            assert _final_answer(good) == record["answer"]
            assert len(good.splitlines()) == 2 and len(good) < 400
            for seed in range(3):
                bad = cot_answer(record, correct=False, rng=random.Random(seed))
                wrong = _final_answer(bad)
                assert wrong != record["answer"], record["id"]
                assert bad.count("Final answer:") == 1
                if record["match_mode"] == "choice":
                    assert wrong in "ABCD"[: len(record["options"])]
                elif record["match_mode"] == "yesno":
                    assert wrong in ("Yes", "No")
                elif record["match_mode"] == "number":
                    assert wrong.isdigit()
                else:
                    assert wrong in ("circle", "square", "triangle")
            # Reproducible for a given generator state.
            assert cot_answer(record, correct=False, rng=random.Random(7)) == cot_answer(
                record, correct=False, rng=random.Random(7))


def test_cot_wrong_reasoning_is_internally_consistent(task):
    out, _ = task
    for record in _all_records(out)["train"]:
        bad = cot_answer(record, correct=False, rng=random.Random(5))
        wrong = _final_answer(bad)
        if record["kind"] == "count" and wrong != "0":
            assert bad.splitlines()[0].endswith(f"gives {wrong}.")
        if record["kind"] == "chart_value":
            assert f"Bar {record['query']['label']} reaches the grid line for {wrong}." in bad
        if record["kind"] == "digit":
            assert bad.splitlines()[0].endswith(f"form the digit {wrong}.")


def test_cot_rejects_bad_records(task):
    out, _ = task
    record = _all_records(out)["train"][0]
    with pytest.raises(ValueError, match="lacks"):
        cot_answer({"answer": "1"}, rng=random.Random(0))
    tampered = dict(record, answer="not-the-answer")
    with pytest.raises(ValueError, match="does not match its scene"):
        cot_answer(tampered, rng=random.Random(0))


# ---------------------------------------------------------------- files

def test_mmpr_directory(task):
    out, result = task
    meta_path = Path(result["sft_meta"])
    meta = json.loads(meta_path.read_text())
    (entry,) = meta.values()
    assert entry["repeat_time"] == 1
    root = (meta_path.parent / entry["root"]).resolve()
    annotation = meta_path.parent / entry["annotation"]
    assert root == out.resolve() and annotation.is_file()
    rows = _read_jsonl(annotation)
    train = _all_records(out)["train"]
    assert entry["length"] == len(rows) == len(train) == SMALL["num_train"]
    for row, record in zip(rows, train):
        assert set(row) == {"image", "question", "chosen", "rejected", "answer_gt"}
        assert (root / row["image"]).is_file() and row["image"] == record["image"]
        bare = record["question"].removeprefix("<image>\n")
        assert row["question"].startswith("<image>\n" + REFERENCE_PROMPT_HEAD + bare)
        assert row["question"].count("<image>") == 1
        for letter, text in zip("ABCD", record.get("options", [])):
            assert f"\n{letter}. {text}" in row["question"]
        assert row["answer_gt"] == record["answer"]
        assert _final_answer(row["chosen"]) == record["answer"]
        assert _final_answer(row["rejected"]) != record["answer"]


def test_tsv_and_benchmark_jsonl(task):
    out, result = task
    test_records = _all_records(out)["test"]
    with open(result["test_tsv"], encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    with open(result["test_tsv"], encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
    assert header == ["index", "question", "hint", "A", "B", "C", "D", "answer", "category",
                      "l2-category", "image", "split"]
    assert len(rows) == len(test_records) == SMALL["num_test"]
    for i, (row, record) in enumerate(zip(rows, test_records)):
        assert row["index"] == str(i) and row["split"] == "test" and row["hint"] == ""
        assert "<image>\n" + row["question"] == record["question"] and "<image>" not in row["question"]
        assert row["answer"] == record["answer"] and row["category"] == record["kind"]
        options = record.get("options", [])
        assert [row[c] for c in "ABCD"] == options + [""] * (4 - len(options))
        decoded = base64.b64decode(row["image"])
        assert decoded == (out / record["image"]).read_bytes()
        assert np.array_equal(_pixels(decoded), _pixels(out / record["image"]))

    bench = _read_jsonl(result["test_jsonl"])
    bench_dir = Path(result["test_jsonl"]).parent
    for i, (row, record) in enumerate(zip(bench, test_records)):
        assert set(row) == {"index", "image", "question", "options", "answer", "scorer"}
        assert row["index"] == i and row["scorer"] == record["match_mode"]
        assert (bench_dir / row["image"]).resolve() == (out / record["image"]).resolve()
        assert row["answer"] == record["answer"] and row["options"] == record.get("options", [])


def test_manifest_and_kind_balance(task):
    out, result = task
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 3 and manifest["image_width"] == manifest["image_height"] == 96
    expected = {"train": 45, "build": 20, "test": 27}
    assert manifest["counts"] == result["counts"] == expected
    for split, records in _all_records(out).items():
        kinds = Counter(r["kind"] for r in records)
        assert set(kinds) == set(KINDS)
        assert max(kinds.values()) - min(kinds.values()) <= 1
        assert manifest["kinds"][split] == {k: kinds[k] for k in KINDS}
        assert len({r["id"] for r in records}) == len(records) == expected[split]
    assert {MATCH_MODES[k] for k in KINDS} == {"choice", "number", "yesno", "exact"}
    assert len(list((out / "images").glob("*.png"))) == result["num_images"] == 92


def test_splits_share_no_image_question(task):
    out, _ = task
    keys = {}
    for split, records in _all_records(out).items():
        for record in records:
            key = (hashlib.sha1((out / record["image"]).read_bytes()).hexdigest(), record["question"])
            assert key not in keys, f"{record['id']} repeats {keys[key]}"
            keys[key] = record["id"]


# ---------------------------------------------------------------- determinism

def test_same_seed_same_bytes_different_seed_differs(task, tmp_path):
    out, _ = task
    again = tmp_path / "again"
    generate_task(again, seed=3, **SMALL)
    first, second = _tree_bytes(out), _tree_bytes(again)
    assert first.keys() == second.keys() and first == second

    other = tmp_path / "other"
    generate_task(other, seed=4, **SMALL)
    third = _tree_bytes(other)
    assert third["questions/train.jsonl"] != first["questions/train.jsonl"]
    differing = [k for k in first if k.startswith("images/") and first[k] != third[k]]
    assert len(differing) > 0.9 * sum(SMALL[k] for k in ("num_train", "num_pairs_questions", "num_test"))


def test_rerun_with_fewer_questions_removes_stale_images(tmp_path):
    generate_task(tmp_path, seed=0, num_train=5, num_pairs_questions=2, num_test=2, image_size=64)
    result = generate_task(tmp_path, seed=0, num_train=2, num_pairs_questions=0, num_test=1, image_size=64)
    names = sorted(p.name for p in (tmp_path / "images").glob("*.png"))
    assert names == ["test_00000.png", "train_00000.png", "train_00001.png"]
    assert result["num_images"] == 3 and _read_jsonl(tmp_path / "questions" / "build.jsonl") == []


def test_non_square_and_minimum_size(tmp_path):
    result = generate_task(tmp_path / "wide", seed=1, num_train=18, num_pairs_questions=0,
                           num_test=0, width=160, height=72)
    for record in _read_jsonl(result["questions"]["train"]):
        assert Image.open(tmp_path / "wide" / record["image"]).size == (160, 72)
        assert record["answer"] == _expected_answer(record)
    result = generate_task(tmp_path / "tiny", seed=1, num_train=27, num_pairs_questions=0,
                           num_test=0, image_size=64)
    for record in _read_jsonl(result["questions"]["train"]):
        assert record["answer"] == _expected_answer(record)


# ---------------------------------------------------------------- bad input and CLI

@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_train": -1}, "num_train must be a non-negative integer"),
        ({"num_test": 2.5}, "num_test must be a non-negative integer"),
        ({"num_pairs_questions": True}, "num_pairs_questions must be a non-negative integer"),
        ({"image_size": 16}, "out of range"),
        ({"width": 100, "height": 5000}, "height=5000 is out of range"),
        ({"seed": "0"}, "seed must be an integer"),
    ],
)
def test_generate_task_rejects_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate_task(tmp_path, **kwargs)
    assert not (tmp_path / "manifest.json").exists()


def test_sample_question_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown question kind 'colour'"):
        sample_question(random.Random(0), "colour", 96, 96)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--num-train", "-3"], "expected a non-negative integer"),
        (["--num-test", "many"], "expected a non-negative integer"),
        (["--image-size", "8"], "out of range"),
    ],
)
def test_cli_bad_arguments_exit_with_usage_error(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path), *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_prints_counts(tmp_path, capsys):
    assert main([str(tmp_path), "--seed", "2", "--num-train", "3", "--num-build", "2",
                 "--num-test", "1", "--image-size", "64"]) == 0
    printed = capsys.readouterr().out
    assert "train=3 build=2 test=1" in printed
    assert json.loads((tmp_path / "manifest.json").read_text())["seed"] == 2
