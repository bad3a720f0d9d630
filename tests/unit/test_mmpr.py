"""MMPR reader and dataset: meta.json, repeat_time, every bad-input reason, strict mode, reconciliation."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from conftest import write_image, write_mmpr
from mpo.data.dataset import DataConfig, MMPRDataset, PreferenceSample, Rejected
from mpo.data.mmpr import MetaError, read_meta, scan_mmpr
from mpo.data.rejects import DataError, RejectLog
from mpo.data.template import ChatTemplate
from mpo.model.tokenizer import train_tiny_tokenizer


def good(i, image="img.png", **kw):
    rec = {"image": image, "question": f"<image>\nQ{i}?", "chosen": f"right {i}", "rejected": f"wrong {i}", "answer_gt": "A"}
    rec.update(kw)
    return rec


@pytest.fixture(scope="module")
def template():
    return ChatTemplate(train_tiny_tokenizer(), tokens_per_tile=4, system_prompt=None)


def test_meta_and_repeat_time(tmp_path):
    root = write_mmpr(tmp_path / "d", [good(i) for i in range(10)], repeat_time=0.5)
    sources = read_meta(root / "meta.json")
    assert sources[0].name == "src" and sources[0].repeat_time == 0.5
    scan = scan_mmpr(root)
    assert len(scan.refs) == 5 == scan.num_read
    assert scan_mmpr(root).refs == scan.refs  # seeded
    assert scan_mmpr(root, seed=1).refs != scan.refs
    root2 = write_mmpr(tmp_path / "e", [good(i) for i in range(3)], repeat_time=2.7)
    scan2 = scan_mmpr(root2)
    assert [r.line for r in scan2.refs] == [1, 1, 2, 2, 3, 3]


def test_fatal_meta_errors(tmp_path):
    with pytest.raises(MetaError, match="not found"):
        read_meta(tmp_path)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(MetaError, match="not valid JSON"):
        read_meta(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"s": {"annotation": "missing.jsonl"}}))
    with pytest.raises(MetaError, match="not found"):
        read_meta(tmp_path)
    (tmp_path / "a.jsonl").write_text("")
    (tmp_path / "meta.json").write_text(json.dumps({"s": {"annotation": "a.jsonl", "repeat_time": -1}}))
    with pytest.raises(MetaError, match="repeat_time"):
        read_meta(tmp_path)


def make_messy_dataset(root):
    write_image(root / "img.png", (64, 48))
    (root / "corrupt.png").write_bytes(b"not an image at all")
    Image.new("RGB", (500, 500)).save(root / "huge.png")
    records = [
        good(0),
        good(1, image=None, question="text only?"),
        good(2, image=["img.png", "img.png"], question="compare"),
        {"question": "q", "chosen": "a"},  # missing rejected
        {"question": 3, "chosen": "a", "rejected": "b"},  # wrong type
        good(5, chosen="  "),  # empty response
        good(6, chosen="same  answer", rejected="same answer"),  # identical after whitespace folding
        good(7, image="missing.png"),
        good(8, image="corrupt.png"),
        good(9, image="../outside.png"),
        good(10, image="huge.png"),
        good(11, image=5),  # wrong-typed image field
        good(12, question="<image> <image> two placeholders one image"),
    ]
    raw = [b"{broken json", b"\xff\xfe not utf8 \xc3\x28", b"[1, 2]"]
    return write_mmpr(root, records, raw_lines=raw)


def test_every_bad_input_counted_and_logged(tmp_path, template):
    root = make_messy_dataset(tmp_path / "d")
    rejects_file = tmp_path / "rejects.jsonl"
    with RejectLog(rejects_file) as log:
        ds = MMPRDataset(root, template, DataConfig(max_length=4096, max_pixels=200_000), rejects=log)
        items = [ds[i] for i in range(len(ds))]
        for item in items:
            if isinstance(item, Rejected):
                log.add(item.reason, item.message, file=item.file, line=item.line, source=item.source)
    accepted = [x for x in items if isinstance(x, PreferenceSample)]
    assert ds.num_read == 16 == len(accepted) + log.total
    assert len(accepted) == 3
    assert dict(log.counts) == {
        "missing_field": 1, "wrong_type": 2, "empty_response": 1, "identical_responses": 1, "missing_image": 1,
        "corrupt_image": 1, "path_escapes_root": 1, "image_too_large": 1, "placeholder_mismatch": 1,
        "malformed_json": 2, "invalid_utf8": 1,
    }
    lines = [json.loads(x) for x in rejects_file.read_text().splitlines()]
    assert len(lines) == log.total
    by_reason = {x["reason"]: x for x in lines}
    assert by_reason["malformed_json"]["line"] in (14, 16)
    assert by_reason["invalid_utf8"]["line"] == 15
    assert by_reason["missing_image"]["line"] == 8 and by_reason["missing_image"]["file"].endswith("src.jsonl")
    text_only = next(x for x in accepted if x.pixel_values is None)
    assert text_only.num_image_tokens == 0
    multi = next(x for x in accepted if x.line == 3)
    # each 64x48 image gets half the 12-tile budget: 3x2 grid (ratio 1.5 closest to 1.33) + thumbnail
    assert multi.pixel_values.shape[0] == 2 * 7
    assert multi.prompt_ids.count(template.img_context_id) == 2 * 7 * 4


def test_strict_mode_names_file_line_reason(tmp_path, template):
    root = make_messy_dataset(tmp_path / "d")
    with pytest.raises(DataError, match=r"src\.jsonl:4: missing_field"):
        MMPRDataset(root, template, rejects=RejectLog(strict=True))


def test_prompt_too_long_rejected(tmp_path, template):
    write_image(tmp_path / "d" / "img.png")
    root = write_mmpr(tmp_path / "d", [good(0)])
    ds = MMPRDataset(root, template, DataConfig(max_length=8))
    item = ds[0]
    assert isinstance(item, Rejected) and item.reason == "prompt_too_long"


def test_source_max_dynamic_patch_and_tiles(tmp_path, template):
    write_image(tmp_path / "d" / "img.png", (896, 448))
    root = write_mmpr(tmp_path / "d", [good(0)], extra_meta={"max_dynamic_patch": 1})
    sample = MMPRDataset(root, template, DataConfig(max_dynamic_patch=12))[0]
    assert sample.pixel_values.shape[0] == 1
    root2 = write_mmpr(tmp_path / "e", [good(0, image="../d/img.png")], extra_meta={"root": "../d"})
    sample2 = MMPRDataset(root2, template)[0]
    assert sample2.pixel_values.shape[0] == 3  # 2x1 grid + thumbnail
    assert sample2.num_image_tokens == 12


def test_data_config_validation():
    with pytest.raises(ValueError, match="max_length"):
        DataConfig(max_length=0, max_dynamic_patch=0)


def test_cached_dataset_reads_each_item_once(tmp_path, template):
    write_image(tmp_path / "a.png", (64, 64), (200, 10, 10))
    write_mmpr(tmp_path, [{"image": "a.png", "question": "Colour?", "chosen": "Red.", "rejected": "Blue."},
                          {"image": "gone.png", "question": "Colour?", "chosen": "Red.", "rejected": "Blue."}])
    cached = MMPRDataset(tmp_path, template, cache=True)
    plain = MMPRDataset(tmp_path, template)
    first, missing = cached[0], cached[1]
    assert isinstance(first, PreferenceSample) and isinstance(missing, Rejected)
    reference = plain[0]
    assert (first.prompt_ids, first.chosen_ids, first.rejected_ids) == (
        reference.prompt_ids, reference.chosen_ids, reference.rejected_ids)
    assert first.pixel_values.equal(reference.pixel_values) and first.index == reference.index == 0
    (tmp_path / "a.png").unlink()  # later epochs read no file
    assert cached[0] is first and cached[1] is missing
    assert isinstance(plain[0], Rejected) and plain[0].reason == "missing_image"
