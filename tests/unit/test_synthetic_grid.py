"""Tests for the grid question kinds of the synthetic task (data_pipeline.synthetic_grid) and kind selection."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipeline.synthetic import KIND_SETS, KINDS, MATCH_MODES, cot_answer, generate_task, main, resolve_kinds
from data_pipeline.synthetic_grid import GRID_CELLS, GRID_KINDS, grid_scene
from mpo.demo_settings import FULL

RGB = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}


@pytest.fixture(scope="module")
def grid_task(tmp_path_factory):
    out = tmp_path_factory.mktemp("grid")
    generate_task(out, seed=5, num_train=40, num_pairs_questions=12, num_test=12, kinds="grid", fixed_options=True)
    records = [json.loads(line) for split in ("train", "build", "test")
               for line in (out / "questions" / f"{split}.jsonl").read_text().splitlines()]
    return out, records


def _count(objects, color):
    return sum(o["color"] == color and o["shape"] == "square" for o in objects)


def _expected(record) -> str:
    """The answer from the stored scene, derived without the module's helpers."""
    objects, query = record["scene"]["objects"], record["query"]
    if query["op"] == "count":
        return str(_count(objects, query["filter"]["color"]))
    if query["op"] == "sum":
        return str(sum(_count(objects, f["color"]) for f in query["filters"]))
    if query["op"] == "total_minus":
        return str(len(objects) - _count(objects, query["filter"]["color"]))
    assert query["op"] == "exist"
    return "Yes" if _count(objects, query["filter"]["color"]) else "No"


def test_grid_records_answers_and_balance(grid_task):
    _, records = grid_task
    kinds = Counter(r["kind"] for r in records)
    assert set(kinds) == set(GRID_KINDS) == set(KIND_SETS["grid"])
    for record in records:
        assert record["answer"] == _expected(record), record["id"]
        assert record["match_mode"] == MATCH_MODES[record["kind"]]
        assert "options" not in record
        if record["kind"] == "grid_exist":
            assert record["answer"] in ("Yes", "No")
        else:
            assert record["answer"].isdigit() and int(record["answer"]) >= 1
    # Both existence answers occur (half the scenes hold the colour asked about).
    assert {r["answer"] for r in records if r["kind"] == "grid_exist"} == {"Yes", "No"}


def test_grid_squares_fill_distinct_cells_and_colour_area_counts(grid_task):
    out, records = grid_task
    for record in records:
        scene = record["scene"]
        cell = scene["width"] / GRID_CELLS
        cells = {(int(o["cx"] // cell), int(o["cy"] // cell)) for o in scene["objects"]}
        assert len(cells) == len(scene["objects"])  # one square per cell
        assert {o["shape"] for o in scene["objects"]} == {"square"}
        assert len({o["r"] for o in scene["objects"]}) == 1  # one size for all
        pixels = np.asarray(Image.open(out / record["image"]).convert("RGB"))
        side = 2 * round(0.8 * scene["objects"][0]["r"]) + 1
        for color, rgb in RGB.items():
            painted = int(np.all(pixels == rgb, axis=-1).sum())
            assert painted == _count(scene["objects"], color) * side * side, (record["id"], color)
        for o in scene["objects"]:
            # The square lies inside its cell, with background around it.
            cx, cy = int(o["cx"] // cell), int(o["cy"] // cell)
            assert tuple(pixels[o["cy"], o["cx"]]) == RGB[o["color"]]
            assert tuple(pixels[int(cy * cell), int(cx * cell)]) == tuple(scene["background"])


def _listed_counts(text: str) -> dict[str, int]:
    head = text.split(".", 1)[0]
    assert head.startswith("Squares by color: "), text
    pairs = [item.split() for item in head.removeprefix("Squares by color: ").split(", ")]
    assert [color for color, _ in pairs] == list(RGB)  # always all four colours, in one order
    return {color: int(n) for color, n in pairs}


def _answer_from_counts(record, counts: dict[str, int]) -> str:
    query = record["query"]
    if query["op"] == "count":
        return str(counts[query["filter"]["color"]])
    if query["op"] == "sum":
        return str(sum(counts[f["color"]] for f in query["filters"]))
    if query["op"] == "total_minus":
        return str(sum(counts.values()) - counts[query["filter"]["color"]])
    return "Yes" if counts[query["filter"]["color"]] else "No"


def test_grid_chain_of_thought_right_and_wrong(grid_task):
    _, records = grid_task
    for record in records:
        good = cot_answer(record, correct=True, rng=random.Random(0))
        counts = _listed_counts(good)
        assert counts == {c: _count(record["scene"]["objects"], c) for c in RGB}
        assert good.endswith(f"\nFinal answer: {record['answer']}") and len(good.splitlines()) == 2
        for seed in range(3):
            bad = cot_answer(record, correct=False, rng=random.Random(seed))
            wrong = bad.rsplit("Final answer: ", 1)[1]
            assert wrong != record["answer"]
            # A wrong answer comes from misread counts, reasoned on consistently.
            assert _listed_counts(bad) != counts and _answer_from_counts(record, _listed_counts(bad)) == wrong
            assert wrong in ("Yes", "No") if record["kind"] == "grid_exist" else wrong.isdigit()
    sums = [cot_answer(r, correct=True, rng=random.Random(0)) for r in records if r["kind"] == "grid_sum"]
    totals = [cot_answer(r, correct=True, rng=random.Random(0)) for r in records if r["kind"] == "grid_total_minus"]
    assert sums and all(" + " in t and " = " in t for t in sums)
    assert totals and all("Total " in t and ", minus " in t for t in totals)


def test_grid_scene_rejects_too_many_squares():
    with pytest.raises(ValueError, match="do not fit"):
        grid_scene(random.Random(0), ["red"] * (GRID_CELLS * GRID_CELLS + 1), 224, 224)


def test_resolve_kinds():
    assert resolve_kinds("mixed") == KINDS
    assert resolve_kinds("grid") == GRID_KINDS
    assert resolve_kinds("grid_count, digit,grid_count") == ("grid_count", "digit")
    assert resolve_kinds(["grid", "color"]) == GRID_KINDS + ("color",)
    with pytest.raises(ValueError, match="unknown question kind 'colour'"):
        resolve_kinds("grid,colour")
    with pytest.raises(ValueError, match="unknown question kind ''"):
        resolve_kinds("")


def test_generate_task_with_kind_list_and_bad_kinds(tmp_path):
    result = generate_task(tmp_path / "t", seed=0, num_train=6, num_pairs_questions=2, num_test=2,
                           kinds="grid_sum,digit", image_size=112)
    manifest = json.loads(Path(result["manifest"]).read_text())
    assert manifest["kinds"]["train"] == {"grid_sum": 3, "digit": 3}
    with pytest.raises(ValueError, match="unknown question kind 'squares'"):
        generate_task(tmp_path / "bad", kinds="squares")
    assert not (tmp_path / "bad" / "manifest.json").exists()


def test_cli_kinds(tmp_path, capsys):
    assert main([str(tmp_path / "ok"), "--num-train", "4", "--num-build", "0", "--num-test", "0",
                 "--kinds", "grid", "--image-size", "112"]) == 0
    manifest = json.loads((tmp_path / "ok" / "manifest.json").read_text())
    assert set(manifest["kinds"]["train"]) == set(GRID_KINDS)
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "bad"), "--kinds", "grid,hexagons"])
    assert exc.value.code == 2
    assert "unknown question kind 'hexagons'" in capsys.readouterr().err


def test_demo_settings_check_kinds():
    assert FULL.with_values(["kinds=grid,color"]).kinds == "grid,color"
    with pytest.raises(ValueError, match="kinds='circles'"):
        FULL.with_values(["kinds=circles"])
