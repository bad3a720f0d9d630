"""Time and peak memory of AWQ-exporting the InternVL2.5-4B shape on one GPU (needs one CUDA GPU).

    python bench/bench_awq.py                    # JSON to $OUT/bench_awq.json (else bench/results/)
    python bench/bench_awq.py --out r.json --num-samples 64
    python bench/bench_awq.py --num-layers 4     # quick check of the script itself (4 decoder layers)

What it does:
1. builds the 4B shape (InternViT-300M + Qwen2.5-3B: hidden 2048, 36 layers, ffn 11008, vocab
   151,674) with random bf16 weights on the GPU, injects activation outliers (``--outlier-channels``
   hidden channels x``--outlier-scale`` in the token embeddings and the projector output, so every
   token carries them into the residual stream, as real Qwen models do), and saves it as a native
   checkpoint (offline tiny tokenizer) under ``--workdir``;
2. writes an MMPR directory of ``--num-samples`` synthetic conversations (one random 448 px image,
   a question, a ~``--max-response-tokens``-token chosen answer) so calibration runs the whole VLM;
3. runs ``mpo.quant.export.export_awq`` with the shipped defaults (device cuda, bf16, 128 x 512
   response tokens, 1 tile, rows of 2048, group 128, 20-point grids) and records the phase times,
   per-layer times, peak GPU memory (``torch.cuda.max_memory_allocated`` over the export), peak
   host RSS, and layer-output MSE of AWQ vs round-to-nearest;
4. loads the result with ``load_awq_model`` (W4A16 kernels) and checks one forward is finite.

Needs torch, transformers and this repository; nothing is downloaded. Disk: ~7.5 GB for the bf16
source + ~2.6 GB for the AWQ output (deleted at the end unless ``--keep``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import InternVLForConditionalGeneration  # noqa: E402

from mpo.model.shapes import SHAPES, internvl_config  # noqa: E402
from mpo.model.tiny import build_processor  # noqa: E402
from mpo.model.tokenizer import train_tiny_tokenizer  # noqa: E402
from mpo.quant.awq_linear import load_awq_model  # noqa: E402
from mpo.quant.export import CalibrationConfig, ExportConfig, QualityConfig, export_awq  # noqa: E402

WORDS = ("the red circle is left of a blue square and the answer is three because we count each shape "
         "in the image step by step then compare their sizes colours and positions final answer").split()


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def build_checkpoint(path: Path, *, num_layers: int | None, num_channels: int, scale: float, seed: int) -> dict:
    """Random 4B-shape InternVL with outlier channels, saved bf16 at ``path``; returns its facts."""
    shape = SHAPES["4b"]
    if num_layers is not None:
        shape = dataclasses.replace(shape, text=dataclasses.replace(shape.text, num_layers=num_layers))
    channels = sorted(random.Random(seed).sample(range(shape.text.hidden_size), num_channels))
    tokenizer = train_tiny_tokenizer()
    config = internvl_config(shape, image_token_id=tokenizer.context_image_token_id,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                             vocab_size=max(-(-len(tokenizer) // 64) * 64, shape.text.vocab_size))
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # init straight in bf16 on the GPU: seconds, 7.4 GB
    try:
        with torch.device("cuda"):
            model = InternVLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        emb = model.model.vision_tower.embeddings
        emb.position_embeddings.normal_(0, 0.02)
        emb.cls_token.normal_(0, 0.02)
        model.model.language_model.embed_tokens.weight[:, channels] *= scale
        model.model.multi_modal_projector.linear_2.weight[channels] *= scale
        model.model.multi_modal_projector.linear_2.bias[channels] *= scale
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    build_processor(tokenizer, image_size=shape.vision.image_size, tokens_per_tile=shape.tokens_per_tile
                    ).save_pretrained(path)
    facts = {"num_layers": shape.text.num_layers, "parameters": sum(p.numel() for p in model.parameters()),
             "outlier_channels": channels, "outlier_scale": scale}
    del model
    torch.cuda.empty_cache()
    return facts


def build_data(path: Path, *, num_samples: int, response_words: int, seed: int) -> Path:
    """MMPR directory: one random 448 px image and a long chosen answer per record."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    path.mkdir(parents=True)
    lines = []
    for i in range(num_samples):
        pixels = torch.randint(0, 256, (448, 448, 3), generator=gen, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(path / f"img{i}.png")
        answer = " ".join(rng.choice(WORDS) for _ in range(response_words))
        lines.append(json.dumps({"image": f"img{i}.png", "question": f"Describe the shapes in image {i}.",
                                 "chosen": answer, "rejected": "I do not know."}))
    (path / "bench.jsonl").write_text("\n".join(lines) + "\n")
    (path / "meta.json").write_text(json.dumps(
        {"bench": {"root": ".", "annotation": "bench.jsonl", "repeat_time": 1, "length": num_samples}}))
    return path


def check_load(awq_dir: Path) -> dict:
    start = time.perf_counter()
    model = load_awq_model(awq_dir, device="cuda", dtype=torch.bfloat16)
    load_s = time.perf_counter() - start
    ids = torch.randint(0, 700, (1, 64), device="cuda")
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    finite = bool(torch.isfinite(logits).all())
    del model
    torch.cuda.empty_cache()
    return {"load_s": load_s, "logits_finite": finite}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="JSON path (default $OUT/bench_awq.json, else bench/results/)")
    parser.add_argument("--workdir", default=None, help="where checkpoints are written (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the source and AWQ checkpoints")
    parser.add_argument("--num-layers", type=int, default=None, help="decoder layers (default: the 4B's 36)")
    parser.add_argument("--num-samples", type=int, default=128, help="calibration conversations")
    parser.add_argument("--max-response-tokens", type=int, default=512)
    parser.add_argument("--response-words", type=int, default=400, help="words per synthetic answer")
    parser.add_argument("--outlier-channels", type=int, default=4)
    parser.add_argument("--outlier-scale", type=float, default=50.0)
    parser.add_argument("--quality", action="store_true", help="also measure held-out perplexity (32 samples)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_awq needs a CUDA GPU", file=sys.stderr)
        return 2

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_awq_"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"device": torch.cuda.get_device_name(0), "shape": "4b", "torch": torch.__version__}
    try:
        start = time.perf_counter()
        result["model"] = build_checkpoint(work / "src", num_layers=args.num_layers,
                                           num_channels=args.outlier_channels, scale=args.outlier_scale,
                                           seed=args.seed)
        result["build_checkpoint_s"] = time.perf_counter() - start
        held_out = 32 if args.quality else 0
        data = build_data(work / "data", num_samples=args.num_samples + held_out,
                          response_words=args.response_words, seed=args.seed)
        result["rss_before_export_gib"] = peak_rss_gib()

        cfg = ExportConfig(model=str(work / "src"), output_dir=str(work / "awq"), data=str(data), device="cuda",
                           seed=args.seed, calibration=CalibrationConfig(
                               num_samples=args.num_samples, max_response_tokens=args.max_response_tokens),
                           quality=QualityConfig(enabled=args.quality))
        report = export_awq(cfg)
        layers = report["layers"]
        ratios = [x["output_mse"]["awq"] / x["output_mse"]["rtn"] for x in layers if x["output_mse"]["rtn"] > 0]
        result.update({
            "export_timings_s": report["timings"],
            "per_layer_s": {"median": statistics.median(x["time_s"] for x in layers),
                            "max": max(x["time_s"] for x in layers)},
            "peak_gpu_memory_gib": report.get("peak_gpu_memory_gib"),
            "peak_host_rss_gib": peak_rss_gib(),
            "calibration": report["calibration"],
            "awq_over_rtn_layer_mse": {"median": statistics.median(ratios), "max": max(ratios),
                                        "per_layer": ratios},
            "output_bytes": sum(p.stat().st_size for p in (work / "awq").iterdir()),
        })
        if "quality" in report:
            result["quality"] = report["quality"]
        result["load_check"] = check_load(work / "awq")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    out = Path(args.out) if args.out else (
        Path(os.environ["OUT"]) / "bench_awq.json" if os.environ.get("OUT")
        else Path(__file__).resolve().parent / "results" / "bench_awq.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    t = result["export_timings_s"]
    peak = result["peak_gpu_memory_gib"]
    print(f"{result['device']}: export {t['total_s']:.0f} s (calibration {t['calibration_s']:.0f} s, layers "
          f"{t['quantize_s']:.0f} s, write {t['write_s']:.0f} s), peak GPU "
          f"{'n/a' if peak is None else f'{peak:.1f} GiB'}, AWQ/RTN layer MSE median "
          f"{result['awq_over_rtn_layer_mse']['median']:.3f} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
