"""Check an MMPR directory before a long run: every record the trainer would read, with reject counts.

    python -m mpo.data.validate MMPR_DIR [--model DIR] [--max-length N] [--rejects FILE] [--strict]

Opens every image, applies the chat template and truncation (with `--model`, the model's tokenizer and
tile geometry; without it, the images and fields are checked but prompt lengths are not), prints
accepted and rejected counts by reason, and writes one jsonl line per reject. Exits non-zero only on a
fatal problem (an unreadable meta.json) or, with `--strict`, on the first bad record.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from mpo.data.dataset import DataConfig, MMPRDataset, Rejected, load_visual
from mpo.data.images import MediaError
from mpo.data.mmpr import MetaError, RecordError, read_record
from mpo.data.rejects import DataError, RejectLog
from mpo.data.template import ChatTemplate, TemplateError, place_image_placeholders


def _template_for(model_dir: str | None) -> tuple[ChatTemplate | None, int]:
    if model_dir is None:
        return None, 448
    from mpo.model.load import load_processor, read_checkpoint_config

    config = read_checkpoint_config(model_dir)
    processor = load_processor(model_dir)
    size = config["vision_config"]["image_size"]
    size = size[0] if isinstance(size, list) else size
    return ChatTemplate(processor.tokenizer, tokens_per_tile=config["image_seq_length"]), size


def validate(mmpr_dir: str | Path, *, model_dir: str | None = None, max_length: int = 8192,
             rejects_path: str | Path | None = None, strict: bool = False) -> dict:
    """Validate every record; returns `{"read", "accepted", "rejected", "by_reason", "by_source"}`."""
    template, tile_size = _template_for(model_dir)
    config = DataConfig(max_length=max_length, tile_size=tile_size)
    by_source: Counter[str] = Counter()
    with RejectLog(rejects_path, strict=strict) as rejects:
        if template is not None:
            dataset = MMPRDataset(mmpr_dir, template, config, rejects=rejects)
            items = (dataset[i] for i in range(len(dataset)))
        else:
            dataset = _FieldsOnly(mmpr_dir, config, rejects)
            items = iter(dataset)
        accepted = 0
        for item in items:
            if isinstance(item, Rejected):
                rejects.add(item.reason, item.message, file=item.file, line=item.line, source=item.source)
            else:
                accepted += 1
                by_source[item.source] += 1
        summary = {
            "read": dataset.num_read,
            "accepted": accepted,
            "rejected": rejects.total,
            "by_reason": dict(sorted(rejects.counts.items())),
            "by_source": dict(sorted(by_source.items())),
            "length_checked": template is not None,
        }
    assert summary["read"] == summary["accepted"] + summary["rejected"], summary
    return summary


class _FieldsOnly:
    """Without a model: records and media are checked, token lengths are not."""

    def __init__(self, mmpr_dir, config: DataConfig, rejects: RejectLog):
        from mpo.data.mmpr import scan_mmpr

        scan = scan_mmpr(mmpr_dir, rejects=rejects)
        self.sources, self.refs, self.num_read, self.config = scan.sources, scan.refs, scan.num_read, config

    def __iter__(self):
        for ref in self.refs:
            src = self.sources[ref.source_index]
            try:
                record = read_record(self.sources, ref)
                visual = load_visual(record, src.root, self.config, src.max_dynamic_patch or self.config.max_dynamic_patch)
                if visual is not None and not visual.is_video:
                    place_image_placeholders(record.question, len(visual.tiles_per_part))
                yield record
            except (MediaError, TemplateError, RecordError) as err:
                yield Rejected(err.reason, str(err), src.name, str(src.annotation), ref.line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpo.data.validate", description="Validate an MMPR directory.")
    parser.add_argument("mmpr_dir", help="MMPR directory (with meta.json) or the meta.json itself")
    parser.add_argument("--model", default=None, help="model directory: check token lengths with its tokenizer")
    parser.add_argument("--max-length", type=int, default=8192, help="max tokens per sequence (default 8192)")
    parser.add_argument("--rejects", default="rejects.jsonl", help="where to write rejects (default rejects.jsonl)")
    parser.add_argument("--strict", action="store_true", help="stop with an error at the first bad record")
    args = parser.parse_args(argv)
    try:
        summary = validate(args.mmpr_dir, model_dir=args.model, max_length=args.max_length,
                           rejects_path=args.rejects, strict=args.strict)
    except (MetaError, DataError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"read {summary['read']}  accepted {summary['accepted']}  rejected {summary['rejected']}")
    for reason, count in summary["by_reason"].items():
        print(f"  {reason}: {count}")
    if not summary["length_checked"]:
        print("(token lengths not checked: pass --model DIR)")
    print(f"rejects written to {args.rejects}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
