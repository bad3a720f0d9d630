"""Synthetic visual question task for the demo and the tests: no GPU, weights or datasets needed.

Small visual vocabulary (circles, squares, triangles in red, green, blue, yellow; bar charts; one
seven-segment digit), short checkable answers, and templated chain-of-thought answers (correct and
plausibly wrong) so a tiny InternVL-architecture model can be SFT-ed, sampled, MPO-trained and
evaluated on a laptop CPU in minutes.

    python -m data_pipeline.synthetic /tmp/synth --seed 0   # 600 train, 200 build, 200 test

Layout written under OUT_DIR (every path inside a file is relative, so the tree can be moved):

- ``images/{split}_{i:05d}.png``: one image per question.
- ``questions/{train,build,test}.jsonl``: ``{"id", "image" (relative to OUT_DIR), "question"
  ("<image>\\n" + question; options are not in it), "answer", "options" (choice questions only),
  "source", "kind", "match_mode", "scene", "query"}``; ``scene`` (see ``synthetic_render``) and
  ``query`` are hidden meta from which the answer is re-derivable.
- ``sft/meta.json`` + ``sft/synthetic_sft.jsonl``: an MMPR directory built from ``train``. In
  meta.json, ``root`` and ``annotation`` are relative to the directory holding meta.json.
- ``test/SYNTHETIC.tsv``: VLMEvalKit-style TSV of the test split (bare question, options in A-D).
- ``test/synthetic.jsonl``: custom-benchmark twin; its ``image`` is relative to ``test/``.
- ``manifest.json``: seed, image size, counts per split and kind.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import json
import random
import re
import sys
from pathlib import Path

from data_pipeline.synthetic_questions import (
    ALL_KINDS,
    COT_PROMPT,
    KIND_SETS,
    KINDS,
    LETTERS,
    MATCH_MODES,
    answer_from_scene,
    bare_question,
    cot_answer,
    cot_prompt,
    options_block,
    sample_question,
)
from data_pipeline.synthetic_render import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, png_bytes, render_scene

# Question sampling, answers and chain-of-thought text live in synthetic_questions; they are
# re-exported here so ``from data_pipeline.synthetic import sample_question`` keeps working.
__all__ = ["COT_PROMPT", "KIND_SETS", "KINDS", "MATCH_MODES", "SPLITS", "answer_from_scene", "cot_answer",
           "cot_prompt", "generate_task", "main", "options_block", "resolve_kinds", "sample_question"]

TSV_COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category",
               "l2-category", "image", "split"]

SPLITS = ("train", "build", "test")
_IMAGE_NAME = re.compile(r"(train|build|test)_\d{5}\.png")


# ---------------------------------------------------------------- files and command line

def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def _check_side(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer number of pixels, got {value!r}")
    if not MIN_IMAGE_SIZE <= value <= MAX_IMAGE_SIZE:
        raise ValueError(
            f"{name}={value} is out of range: use {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE} pixels "
            f"(smaller images cannot hold eight separable objects)"
        )
    return value


def _generate_split(
    split: str, count: int, seed: int, width: int, height: int, seen: set[tuple[str, str]],
    fixed_options: bool = False, kind_list: tuple[str, ...] = KINDS,
) -> list[tuple[dict, bytes]]:
    """``count`` (record, png) pairs; kinds balanced to within one, order shuffled by the seed."""
    rng = random.Random(f"synthetic:{seed}:{split}")
    kinds = [kind_list[i % len(kind_list)] for i in range(count)]
    rng.shuffle(kinds)
    out = []
    for i, kind in enumerate(kinds):
        while True:
            record = sample_question(rng, kind, width, height, fixed_options=fixed_options)
            png = png_bytes(render_scene(record["scene"]))
            # The splits must never share an identical (image, question): key on pixels + text.
            key = (hashlib.sha1(png).hexdigest(), record["question"] + options_block(record))
            if key not in seen:
                seen.add(key)
                break
        record_id = f"{split}_{i:05d}"
        ordered = {"id": record_id, "image": f"images/{record_id}.png", **record}
        out.append((ordered, png))
    return out


def resolve_kinds(kinds: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Question kinds from a set name of ``KIND_SETS`` ("mixed", "grid"), a comma-separated list or a
    sequence of kind names (sets may be mixed in: "grid,color"); duplicates are dropped, order kept."""
    items = kinds.split(",") if isinstance(kinds, str) else list(kinds)
    out: list[str] = []
    for item in items:
        name = item.strip() if isinstance(item, str) else item
        if name in KIND_SETS:
            out.extend(KIND_SETS[name])
        elif name in ALL_KINDS:
            out.append(name)
        else:
            raise ValueError(f"unknown question kind {name!r}: use a set ({', '.join(KIND_SETS)}) "
                             f"or kinds from {', '.join(ALL_KINDS)}")
    if not out:
        raise ValueError("kinds is empty: name at least one question kind or kind set")
    return tuple(dict.fromkeys(out))


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _sft_rows(records: list[dict], seed: int, scene_description: bool = True) -> list[dict]:
    rows = []
    for record in records:
        # One generator per record: a record's pair does not depend on the records before it.
        rng = random.Random(f"synthetic:{seed}:cot:{record['id']}")
        rows.append(
            {
                "image": record["image"],
                "question": cot_prompt(record),
                "chosen": cot_answer(record, correct=True, rng=rng, scene_description=scene_description),
                "rejected": cot_answer(record, correct=False, rng=rng, scene_description=scene_description),
                "answer_gt": record["answer"],
            }
        )
    return rows


def _write_tsv(path: Path, records: list[tuple[dict, bytes]]) -> None:
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(TSV_COLUMNS)
        for index, (record, png) in enumerate(records):
            options = record.get("options", [])
            option_cells = [options[i] if i < len(options) else "" for i in range(len(LETTERS))]
            writer.writerow(
                [index, bare_question(record), "", *option_cells, record["answer"], record["kind"],
                 record["scene"]["type"], base64.b64encode(png).decode("ascii"), "test"]
            )


def _benchmark_rows(records: list[dict]) -> list[dict]:
    return [
        {
            "index": index,
            "image": "../" + record["image"],
            "question": bare_question(record),
            "options": record.get("options", []),
            "answer": record["answer"],
            "scorer": record["match_mode"],
        }
        for index, record in enumerate(records)
    ]


def generate_task(
    out_dir: str | Path,
    *,
    seed: int = 0,
    num_train: int = 600,
    num_pairs_questions: int = 200,
    num_test: int = 200,
    image_size: int = 224,
    width: int | None = None,
    height: int | None = None,
    fixed_options: bool = False,
    scene_description: bool = True,
    kinds: str | tuple[str, ...] = "mixed",
) -> dict:
    """Generate the synthetic task under ``out_dir`` (created; existing files are overwritten).

    Args:
        seed: any integer; the same seed gives byte-identical files, PNGs included.
        num_train / num_pairs_questions / num_test: questions in the ``train`` (SFT), ``build``
            (pair builder) and ``test`` splits; one image each.
        image_size: side in pixels of the square images; ``width`` / ``height`` override it for
            non-square images. Each side must be within 64..4096.
        fixed_options: list choice options in one canonical order instead of shuffled ones (see
            ``sample_question``); the same draws as with False, so the same scenes and questions,
            only the option order and hence the answer letters differ. The demo uses it: its 2-layer language model does not
            learn to look a colour or side up in a shuffled option list within its CPU budget.
        scene_description: False: the SFT answers' reasoning about shapes scenes leaves out the
            opening description of every object and names only the queried ones (``cot_answer``).
        kinds: question kinds, balanced within each split (``resolve_kinds``): "mixed" (default:
            shapes, charts and digits), "grid" (counting squares on a grid, ``synthetic_grid``), or
            a comma-separated list of kinds and sets.
    Returns:
        ``{"out_dir", "manifest", "questions": {split: path}, "sft_meta", "sft_annotation",
        "test_tsv", "test_jsonl", "counts": {split: n}, "num_images"}`` (paths are absolute).
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    for name, flag in (("fixed_options", fixed_options), ("scene_description", scene_description)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be True or False, got {flag!r}")
    kind_list = resolve_kinds(kinds)
    counts = {
        "train": _check_count("num_train", num_train),
        "build": _check_count("num_pairs_questions", num_pairs_questions),
        "test": _check_count("num_test", num_test),
    }
    width = _check_side("width", image_size if width is None else width)
    height = _check_side("height", image_size if height is None else height)

    root = Path(out_dir).resolve()
    dirs = {name: root / name for name in ("images", "questions", "sft", "test")}
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)

    seen: set[tuple[str, str]] = set()
    splits = {s: _generate_split(s, counts[s], seed, width, height, seen, fixed_options, kind_list)
              for s in SPLITS}
    written = set()
    for split, pairs in splits.items():
        for record, png in pairs:
            (root / record["image"]).write_bytes(png)
            written.add(Path(record["image"]).name)
        _write_jsonl(dirs["questions"] / f"{split}.jsonl", [r for r, _ in pairs])
    # A rerun with smaller counts must not leave images of the previous run behind (only files
    # named like ours are touched).
    for path in dirs["images"].glob("*.png"):
        if _IMAGE_NAME.fullmatch(path.name) and path.name not in written:
            path.unlink()

    sft_rows = _sft_rows([r for r, _ in splits["train"]], seed, scene_description)
    sft_annotation = dirs["sft"] / "synthetic_sft.jsonl"
    _write_jsonl(sft_annotation, sft_rows)
    sft_meta = dirs["sft"] / "meta.json"
    _write_json(sft_meta, {"synthetic_sft": {"root": "..", "annotation": sft_annotation.name,
                                             "repeat_time": 1, "length": len(sft_rows)}})

    test_tsv, test_jsonl = dirs["test"] / "SYNTHETIC.tsv", dirs["test"] / "synthetic.jsonl"
    _write_tsv(test_tsv, splits["test"])
    _write_jsonl(test_jsonl, _benchmark_rows([r for r, _ in splits["test"]]))

    per_kind = {s: {k: sum(r["kind"] == k for r, _ in pairs) for k in kind_list}
                for s, pairs in splits.items()}
    manifest = root / "manifest.json"
    _write_json(manifest, {
        "generator": "data_pipeline.synthetic", "format_version": 1, "seed": seed,
        "image_width": width, "image_height": height, "fixed_options": fixed_options,
        "scene_description": scene_description,
        "counts": counts, "kinds": per_kind,
        "files": {"questions": {s: f"questions/{s}.jsonl" for s in SPLITS},
                  "sft_meta": "sft/meta.json", "test_tsv": "test/SYNTHETIC.tsv",
                  "test_jsonl": "test/synthetic.jsonl"},
    })
    return {
        "out_dir": str(root),
        "manifest": str(manifest),
        "questions": {s: str(dirs["questions"] / f"{s}.jsonl") for s in SPLITS},
        "sft_meta": str(sft_meta),
        "sft_annotation": str(sft_annotation),
        "test_tsv": str(test_tsv),
        "test_jsonl": str(test_jsonl),
        "counts": counts,
        "num_images": sum(counts.values()),
    }


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def _image_side(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer number of pixels, got {text!r}") from None
    if not MIN_IMAGE_SIZE <= value <= MAX_IMAGE_SIZE:
        raise argparse.ArgumentTypeError(
            f"{value} is out of range: use {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE} pixels"
        )
    return value


def main(argv: list[str] | None = None) -> int:
    """Command line entry: generate the task and print the counts per split."""
    parser = argparse.ArgumentParser(
        prog="python -m data_pipeline.synthetic", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("out_dir", help="directory to write (created if missing)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train", type=_non_negative_int, default=600)
    parser.add_argument("--num-build", type=_non_negative_int, default=200,
                        help="questions for the preference-pair builder")
    parser.add_argument("--num-test", type=_non_negative_int, default=200)
    parser.add_argument("--image-size", type=_image_side, default=224, help="square side in pixels")
    parser.add_argument("--width", type=_image_side, default=None, help="overrides --image-size")
    parser.add_argument("--height", type=_image_side, default=None, help="overrides --image-size")
    parser.add_argument("--fixed-options", action="store_true",
                        help="canonical option order (red, green, blue, yellow; left, right; ...) instead of shuffled")
    parser.add_argument("--no-scene-description", dest="scene_description", action="store_false",
                        help="SFT reasoning names only the queried objects, without first describing every object")
    parser.add_argument("--kinds", default="mixed",
                        help="question kinds: a set (mixed, grid) or a comma-separated list of kinds and sets")
    args = parser.parse_args(argv)
    try:
        result = generate_task(
            args.out_dir, seed=args.seed, num_train=args.num_train,
            num_pairs_questions=args.num_build, num_test=args.num_test,
            image_size=args.image_size, width=args.width, height=args.height,
            fixed_options=args.fixed_options, scene_description=args.scene_description,
            kinds=args.kinds,
        )
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    counts = result["counts"]
    print(f"wrote {result['num_images']} images and questions to {result['out_dir']}: "
          + " ".join(f"{split}={counts[split]}" for split in SPLITS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
