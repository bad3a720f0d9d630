"""Benchmark registry, VLMEvalKit TSV / custom jsonl readers and prompt building (mpo.eval.benchmarks)."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from mpo.eval.benchmarks import (
    BENCHMARKS,
    COT_TEMPLATE,
    MCQ_SUFFIX,
    SHORT_ANSWER_SUFFIX,
    YES_NO_SUFFIX,
    Item,
    build_prompt,
    get_benchmark,
    load_benchmark,
)


def _png_base64(color: tuple[int, int, int], size: tuple[int, int] = (4, 3)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _write_tsv(path: Path, rows: list[dict]) -> Path:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    return path


RED, BLUE = (255, 0, 0), (0, 0, 255)


@pytest.fixture()
def mmbench_root(tmp_path: Path) -> Path:
    rows = [
        {"index": 0, "question": "What color?", "hint": "Look closely.", "A": "red", "B": "blue", "C": "", "D": "",
         "answer": "A", "category": "color", "l2-category": "perception", "image": _png_base64(RED),
         "split": "dev", "source": "synthetic"},
        {"index": 1000000, "question": "What color?", "hint": "Look closely.", "A": "blue", "B": "red", "C": "", "D": "",
         "answer": "B", "category": "color", "l2-category": "perception", "image": "0", "split": "dev",
         "source": "synthetic"},
        {"index": 1, "question": "Which shape?", "hint": "", "A": "square", "B": "circle", "C": "line", "D": "",
         "answer": "C", "category": "shape", "l2-category": "perception", "image": _png_base64(BLUE, (8, 8)),
         "split": "dev", "source": "synthetic"},
    ]
    _write_tsv(tmp_path / "MMBench_DEV_EN.tsv", rows)
    return tmp_path


def test_registry_matches_the_documented_files_and_tiles():
    assert get_benchmark("mmbench").file_name == "MMBench_DEV_EN.tsv"
    assert get_benchmark("mmbench").kind == "circular_mcq"
    assert get_benchmark("mmbench").max_tiles == 6
    assert get_benchmark("mmmu").max_tiles == 12
    assert get_benchmark("ocrbench").max_tiles == 24
    assert get_benchmark("hallusionbench").prompt_suffix == YES_NO_SUFFIX
    assert {spec.file_name for spec in BENCHMARKS.values()} == {
        "MMBench_DEV_EN.tsv", "MMStar.tsv", "AI2D_TEST.tsv", "MMMU_DEV_VAL.tsv", "HallusionBench.tsv",
        "OCRBench.tsv", "MathVista_MINI.tsv"}
    custom = get_benchmark("custom:/data/x.jsonl")
    assert (custom.kind, custom.file_name) == ("custom", "/data/x.jsonl")


@pytest.mark.parametrize("name", ["mmbench_v11", "MMBench", "custom:"])
def test_unknown_benchmark_names_are_rejected(name):
    with pytest.raises(ValueError, match="benchmark"):
        get_benchmark(name)


def test_tsv_reader_parses_columns_options_and_extras(mmbench_root):
    items = load_benchmark("mmbench", mmbench_root)
    assert [item.index for item in items] == [0, 1000000, 1]
    first = items[0]
    assert first.question == "What color?" and first.hint == "Look closely."
    assert first.options == {"A": "red", "B": "blue"}  # empty C/D cells are not options
    assert list(items[2].options) == ["A", "B", "C"]
    assert (first.answer, first.category, first.l2_category, first.split) == ("A", "color", "perception", "dev")
    assert first.extra == {"source": "synthetic"}
    assert items[2].hint is None


def test_images_decode_lazily_and_reuse_by_index(mmbench_root):
    items = load_benchmark("mmbench", mmbench_root)
    assert all(item.has_image and item.num_images == 1 for item in items)
    original, rotation, other = (item.load_image() for item in items)
    assert original.mode == "RGB" and original.size == (4, 3)
    assert original.getpixel((0, 0)) == RED
    assert rotation.getpixel((2, 1)) == RED and rotation.size == (4, 3)  # reused from index 0
    assert other.size == (8, 8) and other.getpixel((0, 0)) == BLUE


def test_broken_base64_only_fails_when_the_image_is_asked_for(tmp_path):
    garbage = "!" * 100  # longer than a reference, not an image
    _write_tsv(tmp_path / "MMStar.tsv", [
        {"index": 1, "question": "q", "A": "x", "B": "y", "answer": "A", "image": garbage},
    ])
    items = load_benchmark("mmstar", tmp_path)  # loading must not decode
    with pytest.raises(ValueError, match="row 1: the image cell is not a base64-encoded image"):
        items[0].load_image()


def test_reference_to_a_missing_row_is_reported(tmp_path):
    _write_tsv(tmp_path / "MMStar.tsv", [
        {"index": 1, "question": "q", "A": "x", "B": "y", "answer": "A", "image": "42"},
    ])
    with pytest.raises(ValueError, match="index '42'"):
        load_benchmark("mmstar", tmp_path)


def test_image_path_column_and_multi_image_list(tmp_path):
    Image.new("RGB", (5, 5), BLUE).save(tmp_path / "pic.png")
    images_list = repr([_png_base64(RED), _png_base64(BLUE)])
    _write_tsv(tmp_path / "MMMU_DEV_VAL.tsv", [
        {"index": 1, "question": "q1", "A": "x", "B": "y", "answer": "A", "image": "", "image_path": "pic.png"},
        {"index": 2, "question": "q2", "A": "x", "B": "y", "answer": "B", "image": images_list, "image_path": ""},
        {"index": 3, "question": "q3 text only", "A": "", "B": "", "answer": "7", "image": "", "image_path": ""},
    ])
    by_path, multi, text_only = load_benchmark("mmmu", tmp_path)
    assert by_path.load_image().getpixel((0, 0)) == BLUE
    assert multi.num_images == 2
    assert [im.getpixel((0, 0)) for im in multi.load_images()] == [RED, BLUE]
    assert not text_only.has_image and text_only.load_images() == []
    with pytest.raises(ValueError, match="has no image"):
        text_only.load_image()
    assert build_prompt(multi, "mmmu").startswith("Image-1: <image>\nImage-2: <image>\nq2\n")
    assert build_prompt(text_only, "mmmu") == f"q3 text only\n{SHORT_ANSWER_SUFFIX}"


def test_missing_file_message_names_file_root_and_lmudata(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_benchmark("ocrbench", tmp_path)
    message = str(error.value)
    assert "OCRBench.tsv" in message and str(tmp_path) in message and "~/LMUData" in message


def test_missing_required_column_is_named(tmp_path):
    _write_tsv(tmp_path / "AI2D_TEST.tsv", [{"index": 1, "question": "q", "A": "x", "B": "y"}])
    with pytest.raises(ValueError, match="'answer'"):
        load_benchmark("ai2d", tmp_path)


def test_duplicate_index_is_rejected(tmp_path):
    row = {"index": 1, "question": "q", "A": "x", "B": "y", "answer": "A"}
    _write_tsv(tmp_path / "AI2D_TEST.tsv", [row, row])
    with pytest.raises(ValueError, match="appears twice"):
        load_benchmark("ai2d", tmp_path)


def test_mathvista_choices_column_becomes_options(tmp_path):
    _write_tsv(tmp_path / "MathVista_MINI.tsv", [
        {"index": 1, "question": "Hint: pick.\nQuestion: Which?\nChoices:\n(A) 3\n(B) 4", "answer": "4",
         "choices": "['3', '4']", "answer_option": "B", "question_type": "multi_choice", "task": "FQA"},
        {"index": 2, "question": "How many?", "answer": "5", "choices": "", "question_type": "free_form",
         "answer_type": "integer", "task": "MWP"},
    ])
    choice, free = load_benchmark("mathvista", tmp_path)
    assert choice.options == {"A": "3", "B": "4"}
    assert free.options == {} and free.extra["answer_type"] == "integer"
    # The question already lists the choices and MathVista carries no suffix: the prompt is the question.
    assert build_prompt(choice, "mathvista") == choice.question


def test_build_prompt_mcq_layout(mmbench_root):
    item = load_benchmark("mmbench", mmbench_root)[0]
    expected = f"<image>\nLook closely.\nWhat color?\nA. red\nB. blue\n{MCQ_SUFFIX}"
    assert build_prompt(item, "mmbench") == expected
    assert build_prompt(item, get_benchmark("mmbench")) == expected


def test_build_prompt_cot_wraps_the_question_without_suffix(mmbench_root):
    item = load_benchmark("mmbench", mmbench_root)[0]
    prompt = build_prompt(item, "mmbench", cot=True)
    body = "Look closely.\nWhat color?\nA. red\nB. blue"
    assert prompt == "<image>\n" + COT_TEMPLATE.format(question=body)
    assert 'please use the format "Final answer: .."' in prompt
    assert MCQ_SUFFIX not in prompt


def test_build_prompt_yes_no_and_no_duplicate_suffix():
    item = Item(index=1, question="Is it red?", answer="Yes", num_images=1)
    assert build_prompt(item, "hallusionbench") == f"<image>\nIs it red?\n{YES_NO_SUFFIX}"
    already = Item(index=2, question=f"Is it red? {YES_NO_SUFFIX}", answer="No")
    assert build_prompt(already, "hallusionbench") == f"Is it red? {YES_NO_SUFFIX}"
    assert build_prompt(Item(index=3, question="Read the text.", answer="[]"), "ocrbench") == "Read the text."


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


def test_custom_jsonl_reader_resolves_images_and_scorers(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (6, 2), RED).save(tmp_path / "imgs" / "a.png")
    path = _write_jsonl(tmp_path / "bench.jsonl", [
        {"index": "q1", "image": "imgs/a.png", "question": "Color?", "options": ["red", "blue"],
         "answer": "A", "scorer": "choice", "category": "color", "difficulty": "easy"},
        {"index": "q2", "image": None, "question": "2+2?", "options": None, "answer": "4", "scorer": "number"},
        {"index": "q3", "image": str(tmp_path / "imgs" / "a.png"), "question": "Is it red?", "options": None,
         "answer": "yes", "scorer": "yesno"},
    ])
    first, second, third = load_benchmark(f"custom:{path}", tmp_path / "unused")
    assert first.options == {"A": "red", "B": "blue"} and first.scorer == "choice"
    assert first.extra == {"difficulty": "easy"} and first.category == "color"
    assert first.load_image().size == (6, 2)
    assert not second.has_image and second.options == {}
    assert third.load_image().getpixel((0, 0)) == RED
    assert build_prompt(first, f"custom:{path}") == f"<image>\nColor?\nA. red\nB. blue\n{MCQ_SUFFIX}"
    assert build_prompt(second, f"custom:{path}") == f"2+2?\n{SHORT_ANSWER_SUFFIX}"
    assert build_prompt(third, f"custom:{path}").endswith(YES_NO_SUFFIX)


@pytest.mark.parametrize("record, message", [
    ({"index": 1, "question": "q", "answer": "a", "scorer": "fuzzy"}, "scorer 'fuzzy'"),
    ({"index": 1, "question": "q", "answer": "a"}, "'scorer'"),
    ({"index": 1, "question": "q", "answer": "A", "scorer": "choice", "options": None}, "non-empty options"),
    ("[1, 2]", "JSON object"),
])
def test_custom_jsonl_bad_records(tmp_path, record, message):
    path = tmp_path / "bad.jsonl"
    path.write_text((record if isinstance(record, str) else json.dumps(record)) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        load_benchmark(f"custom:{path}")


def test_custom_jsonl_invalid_json_names_the_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"index": 1, "question": "q", "answer": "a", "scorer": "exact"}\n{oops\n', encoding="utf-8")
    with pytest.raises(ValueError, match="broken.jsonl:2"):
        load_benchmark(f"custom:{path}")


def test_custom_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_benchmark(f"custom:{tmp_path / 'nope.jsonl'}", tmp_path)
