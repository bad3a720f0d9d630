"""Benchmark registry, readers (VLMEvalKit TSV, custom jsonl) and InternVL-style prompts.

VLMEvalKit downloads its benchmark TSVs into ``~/LMUData``; point ``data_root`` there::

    from mpo.eval.benchmarks import load_benchmark, build_prompt
    items = load_benchmark("mmbench", "~/LMUData")
    prompt = build_prompt(items[0], "mmbench")          # "<image>\\n...Answer with the option's letter..."
    image = items[0].load_image()                        # base64 decoded only now

TSV columns (REFERENCE §7): index, question, hint, A..Z, answer, category, l2-category, image (base64;
a value of ≤ 64 characters is the index of another row whose image it reuses; a list literal holds
several images), image_path, split; other columns land in ``Item.extra``.
"""

from __future__ import annotations

import ast
import base64
import csv
import io
import json
import os
import string
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

MCQ_SUFFIX = "Answer with the option's letter from the given choices directly."
YES_NO_SUFFIX = "Please answer yes or no."
SHORT_ANSWER_SUFFIX = "Answer the question using a single word or phrase."
COT_TEMPLATE = (
    "Your task is to answer the question below. Give step by step reasoning before you answer, and "
    'when you\'re ready to answer, please use the format "Final answer: .."\n\nQuestion:\n\n{question}'
)
CUSTOM_PREFIX = "custom:"
CUSTOM_SCORERS = ("choice", "yesno", "number", "exact", "anls", "vqa")
REQUIRED_TSV_COLUMNS = ("index", "question", "answer")
# A real base64 image is far longer; VLMEvalKit stores the index of the row to reuse instead.
IMAGE_REFERENCE_MAX_CHARS = 64


@dataclass(frozen=True)
class BenchmarkSpec:
    """One registered benchmark.

    kind: scoring family: "circular_mcq", "mcq", "mcq_open" (MMMU), "yesno", "ocr", "mathvista",
    "custom". prompt_suffix: instruction appended to non-CoT prompts ("" = question as written).
    max_tiles: InternVL dynamic-resolution tile limit used for this benchmark.
    """

    name: str
    file_name: str
    kind: str
    prompt_suffix: str
    max_tiles: int


BENCHMARKS: dict[str, BenchmarkSpec] = {
    spec.name: spec
    for spec in (
        BenchmarkSpec("mmbench", "MMBench_DEV_EN.tsv", "circular_mcq", MCQ_SUFFIX, 6),
        BenchmarkSpec("mmstar", "MMStar.tsv", "mcq", MCQ_SUFFIX, 6),
        BenchmarkSpec("ai2d", "AI2D_TEST.tsv", "mcq", MCQ_SUFFIX, 6),
        BenchmarkSpec("mmmu", "MMMU_DEV_VAL.tsv", "mcq_open", MCQ_SUFFIX, 12),
        BenchmarkSpec("hallusionbench", "HallusionBench.tsv", "yesno", YES_NO_SUFFIX, 6),
        BenchmarkSpec("ocrbench", "OCRBench.tsv", "ocr", "", 24),
        # MathVista's question text already carries its hint and choices.
        BenchmarkSpec("mathvista", "MathVista_MINI.tsv", "mathvista", "", 6),
    )
}


def get_benchmark(name: str) -> BenchmarkSpec:
    """Return the spec for a registered name or ``custom:PATH.jsonl`` (kind "custom", 6 tiles)."""
    if name.startswith(CUSTOM_PREFIX):
        path = name[len(CUSTOM_PREFIX):]
        if not path:
            raise ValueError("custom benchmark needs a path: use 'custom:/path/to/items.jsonl'")
        return BenchmarkSpec(name, path, "custom", "", 6)
    if name not in BENCHMARKS:
        known = ", ".join(sorted(BENCHMARKS))
        raise ValueError(f"unknown benchmark {name!r}; known: {known}, or custom:PATH.jsonl")
    return BENCHMARKS[name]


@dataclass
class Item:
    """One benchmark question. Images are decoded only by :meth:`load_images`.

    options: letter → text in letter order (empty for open questions). num_images: how many images
    the question shows (0 = text only). scorer: per-row scorer name (custom benchmarks only).
    """

    index: int | str
    question: str
    answer: str | list[str] | None
    options: dict[str, str] = field(default_factory=dict)
    hint: str | None = None
    category: str | None = None
    l2_category: str | None = None
    split: str | None = None
    scorer: str | None = None
    extra: dict[str, str] = field(default_factory=dict)
    num_images: int = 0
    image_loader: Callable[[], list[Image.Image]] | None = field(default=None, repr=False, compare=False)

    @property
    def has_image(self) -> bool:
        return self.num_images > 0

    def load_images(self) -> list[Image.Image]:
        """Decode and return this item's images as RGB PIL images ([] when text-only)."""
        return self.image_loader() if self.image_loader is not None else []

    def load_image(self) -> Image.Image:
        """Return the first image; ``ValueError`` when the item has none."""
        images = self.load_images()
        if not images:
            raise ValueError(f"item {self.index!r} has no image; check item.has_image first")
        return images[0]


def _parse_index(raw: str) -> int | str:
    text = raw.strip()
    return int(text) if text.lstrip("-").isdigit() else text


def _decode_base64_image(data: str, row_index: int | str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(base64.b64decode(data))) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as error:  # binascii.Error is a ValueError
        raise ValueError(f"row {row_index!r}: the image cell is not a base64-encoded image ({error}); "
                         "re-download the benchmark file") from error


def _open_image_file(path: Path) -> Image.Image:
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist; fix the path in the benchmark file")
    with Image.open(path) as image:
        return image.convert("RGB")


def _as_list(value: str) -> list[str]:
    """A cell holding a list literal (multi-image rows) → its strings; any other cell → [cell]."""
    text = value.strip()
    if text.startswith("["):
        try:
            parsed = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return [value]
        if isinstance(parsed, list) and all(isinstance(x, str) for x in parsed):
            return parsed
    return [value]


def _resolve_base64(raw_by_index: dict[str, str], key: str, row_index: int | str) -> str:
    """Follow ≤ 64-character references to the row that holds the actual base64 data."""
    seen = set()
    value = key
    while len(value.strip()) <= IMAGE_REFERENCE_MAX_CHARS:
        ref = value.strip()
        if ref in seen or ref not in raw_by_index:
            raise ValueError(
                f"row {row_index!r}: image refers to index {ref!r}, which is "
                f"{'part of a reference cycle' if ref in seen else 'not in the file'}"
            )
        seen.add(ref)
        value = raw_by_index[ref]
    return value


def _tsv_image_loader(raw: str | None, path_cell: str | None, raw_by_index: dict[str, str],
                      row_index: int | str, base_dirs: list[Path]) -> tuple[int, Callable | None]:
    """Return (num_images, lazy loader) for one TSV row; references are checked now, decoding later."""
    if raw:
        datas = [_resolve_base64(raw_by_index, part, row_index) for part in _as_list(raw)]
        return len(datas), (lambda: [_decode_base64_image(d, row_index) for d in datas])
    if path_cell:
        candidates = []
        for rel in _as_list(path_cell):
            options = [Path(rel)] if Path(rel).is_absolute() else [d / rel for d in base_dirs]
            candidates.append(next((p for p in options if p.is_file()), options[0]))
        return len(candidates), (lambda: [_open_image_file(p) for p in candidates])
    return 0, None


def _row_options(cell: dict[str, str | None], option_letters: list[str], path: Path) -> dict[str, str]:
    """Options from the A..Z columns, or (MathVista) from a ``choices`` list literal column."""
    options = {c: cell[c] for c in option_letters if cell.get(c) is not None}
    if options or not cell.get("choices"):
        return options
    try:
        choices = ast.literal_eval(cell["choices"])
    except (ValueError, SyntaxError) as error:
        raise ValueError(f"{path}: row {cell.get('index')!r} has an unreadable choices cell "
                         f"{cell['choices'][:80]!r}; it must be a list literal") from error
    if not isinstance(choices, (list, tuple)) or len(choices) > 26:
        raise ValueError(f"{path}: row {cell.get('index')!r}: choices must be a list of at most 26 items")
    return {string.ascii_uppercase[i]: str(text) for i, text in enumerate(choices)}


def _benchmark_not_found(file_name: str, data_root: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"benchmark file {file_name} not found in data_root {data_root}. VLMEvalKit downloads these "
        f"TSVs into ~/LMUData (run VLMEvalKit once for this benchmark, or place the file there) and "
        f"data_root should point to that folder, e.g. data_root='~/LMUData'."
    )


def _read_tsv(path: Path, data_root: Path) -> list[Item]:
    # Base64 image cells exceed csv's default 128 KiB field limit; C longs cap the value on Windows.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with path.open(newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    columns = list(rows[0].keys()) if rows else []
    if not rows:
        raise ValueError(f"{path} has no data rows; re-download it (VLMEvalKit stores it in ~/LMUData)")
    for column in REQUIRED_TSV_COLUMNS:
        if column not in columns:
            raise ValueError(f"{path} has no {column!r} column (columns: {columns}); is it a VLMEvalKit TSV?")
    option_letters = [c for c in string.ascii_uppercase if c in columns]
    known = {"index", "question", "hint", "answer", "category", "l2-category", "image", "image_path", "split"}
    raw_by_index: dict[str, str] = {}
    for row in rows:
        key = (row["index"] or "").strip()
        if not key:
            raise ValueError(f"{path}: a row has an empty index (row {len(raw_by_index) + 2} of the file); "
                             "every row needs a unique index")
        if key in raw_by_index:
            raise ValueError(f"{path}: index {key!r} appears twice; indices must be unique")
        raw_by_index[key] = row.get("image") or ""
    base_dirs = [path.parent, data_root / "images" / path.stem]

    items = []
    for row in rows:
        cell = {k: (v if v is not None and v.strip() != "" else None) for k, v in row.items() if k}
        index = _parse_index(row["index"])
        num_images, loader = _tsv_image_loader(cell.get("image"), cell.get("image_path"), raw_by_index,
                                               index, base_dirs)
        items.append(Item(
            index=index,
            question=cell.get("question") or "",
            answer=cell.get("answer"),
            options=_row_options(cell, option_letters, path),
            hint=cell.get("hint"),
            category=cell.get("category"),
            l2_category=cell.get("l2-category"),
            split=cell.get("split"),
            extra={k: v for k, v in cell.items()
                   if k not in known and k not in option_letters and v is not None},
            num_images=num_images,
            image_loader=loader,
        ))
    return items


def _custom_item(record: dict, line_number: int, base_dir: Path, path: Path) -> Item:
    where = f"{path}:{line_number}"
    for key in ("question", "answer", "scorer"):
        if key not in record:
            raise ValueError(f"{where}: missing required field {key!r}")
    if record["scorer"] not in CUSTOM_SCORERS:
        raise ValueError(f"{where}: scorer {record['scorer']!r} is not one of {CUSTOM_SCORERS}")
    raw_options = record.get("options") or []
    if not isinstance(raw_options, list) or len(raw_options) > 26:
        raise ValueError(f"{where}: options must be a list of at most 26 strings or null")
    if record["scorer"] == "choice" and not raw_options:
        raise ValueError(f"{where}: scorer 'choice' needs a non-empty options list")
    image = record.get("image")
    num_images, loader = 0, None
    if image is not None:
        image_path = Path(image) if Path(image).is_absolute() else base_dir / image
        num_images, loader = 1, (lambda: [_open_image_file(image_path)])
    answer = record["answer"]
    known = {"index", "image", "question", "options", "answer", "scorer", "category", "l2_category", "hint",
             "split"}
    return Item(
        index=record.get("index", line_number),
        question=str(record["question"]),
        answer=[str(a) for a in answer] if isinstance(answer, list) else str(answer),
        options={string.ascii_uppercase[i]: str(text) for i, text in enumerate(raw_options)},
        hint=record.get("hint"),
        category=record.get("category"),
        l2_category=record.get("l2_category"),
        split=record.get("split"),
        scorer=record["scorer"],
        extra={k: str(v) for k, v in record.items() if k not in known},
        num_images=num_images,
        image_loader=loader,
    )


def _read_custom_jsonl(path: Path) -> list[Item]:
    items, seen = [], set()
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({error})") from error
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_number}: each line must be a JSON object")
            item = _custom_item(record, line_number, path.parent, path)
            if str(item.index) in seen:
                raise ValueError(f"{path}:{line_number}: index {item.index!r} appears twice")
            seen.add(str(item.index))
            items.append(item)
    if not items:
        raise ValueError(f"{path} holds no items")
    return items


def default_data_root() -> Path:
    """``$LMUData`` if set (VLMEvalKit's own variable), else ``~/LMUData``."""
    return Path(os.environ.get("LMUData", "~/LMUData")).expanduser()


def load_benchmark(name: str, data_root: str | os.PathLike | None = None) -> list[Item]:
    """Read a benchmark into :class:`Item` objects (images stay encoded until asked for).

    Args:
        name: a registered name (see :data:`BENCHMARKS`) or ``custom:PATH.jsonl``.
        data_root: folder holding the VLMEvalKit TSVs (default :func:`default_data_root`). A relative
            custom path is looked up in the working directory first, then under data_root.
    Raises:
        FileNotFoundError: the file is missing (the message names the file and the folder searched).
        ValueError: unknown name, missing required column/field, duplicate index, bad reference.
    """
    spec = get_benchmark(name)
    root = Path(data_root).expanduser() if data_root is not None else default_data_root()
    if spec.kind == "custom":
        path = Path(spec.file_name).expanduser()
        if not path.is_absolute() and not path.is_file() and (root / path).is_file():
            path = root / path
        if not path.is_file():
            raise FileNotFoundError(f"custom benchmark file {spec.file_name} not found (cwd {Path.cwd()}, "
                                    f"data_root {root})")
        return _read_custom_jsonl(path)
    path = root / spec.file_name
    if not path.is_file():
        raise _benchmark_not_found(spec.file_name, root)
    return _read_tsv(path, root)


def _question_body(item: Item, spec: BenchmarkSpec) -> str:
    """Hint + question + "A. text" option lines, joined by newlines (InternVL's layout)."""
    lines = [item.hint] if item.hint else []
    lines.append(item.question)
    # MathVista questions already list their choices; do not print them twice.
    if item.options and not (spec.kind == "mathvista" and "Choices" in item.question):
        lines.extend(f"{letter}. {text}" for letter, text in item.options.items())
    return "\n".join(lines)


def _suffix(item: Item, spec: BenchmarkSpec) -> str:
    if spec.kind == "custom":
        return {"choice": MCQ_SUFFIX, "yesno": YES_NO_SUFFIX}.get(item.scorer or "", SHORT_ANSWER_SUFFIX)
    if spec.kind == "mcq_open" and not item.options:
        return SHORT_ANSWER_SUFFIX
    return spec.prompt_suffix


def _image_prefix(num_images: int) -> str:
    if num_images == 0:
        return ""
    if num_images == 1:
        return "<image>\n"
    return "".join(f"Image-{i}: <image>\n" for i in range(1, num_images + 1))


def build_prompt(item: Item, benchmark: str | BenchmarkSpec, *, cot: bool = False) -> str:
    """Build the user prompt for one item, InternVL style.

    Non-CoT: ``<image>\\n`` (when the item has an image; ``Image-k: <image>`` lines for several) +
    hint + question + option lines + the benchmark's instruction (MCQ letter, yes/no, or short
    answer). CoT: the MPO chain-of-thought template (REFERENCE §4 step 2) around hint + question +
    options, without the short-answer instruction; parse answers after "Final answer:".
    """
    spec = benchmark if isinstance(benchmark, BenchmarkSpec) else get_benchmark(benchmark)
    body = _question_body(item, spec)
    if cot:
        text = COT_TEMPLATE.format(question=body)
    else:
        suffix = _suffix(item, spec)
        text = body if not suffix or body.rstrip().endswith(suffix) else f"{body}\n{suffix}"
    return _image_prefix(item.num_images) + text
