"""Map-style preference dataset over an MMPR directory: records → images tiled → token ids.

The index (file offsets of valid records) is built once by `scan_mmpr`; images are opened only when
an item is read. An item that fails late (missing or corrupt image, prompt longer than max_length)
comes back as a `Rejected` value that the caller counts, so nothing is dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from mpo.data.images import DEFAULT_MAX_PIXELS, MediaError, Visual, load_image_tiles, load_video_frames, resolve_media_path, tile_budget
from mpo.data.mmpr import PreferenceRecord, RecordError, read_record, scan_mmpr
from mpo.data.rejects import RejectLog
from mpo.data.template import ChatTemplate, TemplateError, place_image_placeholders


@dataclass
class DataConfig:
    """How records become model inputs (defaults: InternVL2.5 training recipe)."""

    max_length: int = 8192  # tokens per prompt+response sequence, image tokens included
    max_dynamic_patch: int = 12  # tile budget per sample (sources may override in meta.json)
    use_thumbnail: bool = True
    tile_size: int = 448
    video_frames: int = 8
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self):
        problems = []
        if self.max_length < 2:
            problems.append(f"max_length={self.max_length} must be >= 2")
        if self.max_dynamic_patch < 1:
            problems.append(f"max_dynamic_patch={self.max_dynamic_patch} must be >= 1")
        if self.tile_size < 14:
            problems.append(f"tile_size={self.tile_size} must be >= 14")
        if self.video_frames < 1:
            problems.append(f"video_frames={self.video_frames} must be >= 1")
        if problems:
            raise ValueError("invalid data config: " + "; ".join(problems))


@dataclass
class PreferenceSample:
    """One encoded pair. `pixel_values` is [num_tiles, 3, H, W] or None for text-only samples."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    pixel_values: torch.Tensor | None
    num_image_tokens: int
    source: str
    file: str
    line: int
    index: int = -1


@dataclass
class Rejected:
    """An item that could not be encoded, with a countable reason and its location."""

    reason: str
    message: str
    source: str
    file: str
    line: int
    index: int = -1


def load_visual(record: PreferenceRecord, root: Path, config: DataConfig, max_dynamic_patch: int) -> Visual | None:
    """Load and tile a record's images (budget split across them) or sample its video frames."""
    if record.video is not None:
        path = resolve_media_path(root, record.video)
        return load_video_frames(path, num_segments=config.video_frames, tile_size=config.tile_size)
    if not record.images:
        return None
    budget = tile_budget(max_dynamic_patch, len(record.images))
    parts = [
        load_image_tiles(resolve_media_path(root, rel), max_num=budget, tile_size=config.tile_size,
                         use_thumbnail=config.use_thumbnail, max_pixels=config.max_pixels)
        for rel in record.images
    ]
    return Visual(torch.cat([p.pixel_values for p in parts]), [n for p in parts for n in p.tiles_per_part])


def encode_record(record: PreferenceRecord, root: Path, template: ChatTemplate, config: DataConfig,
                  max_dynamic_patch: int | None = None) -> PreferenceSample:
    """Turn a validated record into a `PreferenceSample`; raises MediaError / TemplateError."""
    visual = load_visual(record, root, config, max_dynamic_patch or config.max_dynamic_patch)
    if visual is None:
        question, tiles = place_image_placeholders(record.question, 0), []
    elif visual.is_video:
        question = place_image_placeholders(record.question, 0, video_frames=len(visual.tiles_per_part))
        tiles = visual.tiles_per_part
    else:
        question = place_image_placeholders(record.question, len(visual.tiles_per_part))
        tiles = visual.tiles_per_part
    pair = template.encode_pair(question, record.chosen, record.rejected, tiles, max_length=config.max_length)
    return PreferenceSample(
        prompt_ids=pair.prompt_ids,
        chosen_ids=pair.chosen_ids,
        rejected_ids=pair.rejected_ids,
        pixel_values=None if visual is None else visual.pixel_values,
        num_image_tokens=pair.num_image_tokens,
        source=record.source,
        file=record.file,
        line=record.line,
    )


class MMPRDataset(Dataset):
    """Preference pairs from an MMPR directory (meta.json), read lazily.

    Args:
        meta_path: meta.json or the directory holding it.
        template: the chat template (tokenizer + tokens per tile + system prompt).
        config: tiling and length settings.
        rejects: where scan-time rejects are counted (a fresh in-memory log by default).
        seed: seed of repeat_time subsampling.
        cache: keep each item (sample or reject) after it is first read and encoded, so later epochs
            read no file; memory grows with the dataset (each process keeps its own copy).
    """

    def __init__(self, meta_path: str | Path, template: ChatTemplate, config: DataConfig | None = None, *,
                 rejects: RejectLog | None = None, seed: int = 0, cache: bool = False):
        self.template = template
        self.config = config or DataConfig()
        scan = scan_mmpr(meta_path, rejects=rejects, seed=seed)
        self.sources, self.refs, self.scan_rejects, self.num_read = scan.sources, scan.refs, scan.rejects, scan.num_read
        self._cache: dict[int, PreferenceSample | Rejected] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index: int) -> PreferenceSample | Rejected:
        if self._cache is None:
            return self._encode(index)
        if index not in self._cache:
            self._cache[index] = self._encode(index)
        return self._cache[index]

    def _encode(self, index: int) -> PreferenceSample | Rejected:
        ref = self.refs[index]
        src = self.sources[ref.source_index]
        try:
            record = read_record(self.sources, ref)
            sample = encode_record(record, src.root, self.template, self.config, src.max_dynamic_patch)
        except (MediaError, TemplateError, RecordError) as err:
            return Rejected(err.reason, str(err), src.name, str(src.annotation), ref.line, index)
        sample.index = index
        return sample
