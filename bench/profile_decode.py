"""Where a batch-1 decode step's time goes: per-kernel GPU time of one fused decode step (one CUDA GPU).

    python bench/profile_decode.py [--engine awq|bf16] [--out $OUT/profile_decode.json]

Builds InternVL2.5-4B's shape with random weights (bf16; `--engine awq` quantizes the decoder linears
RTN int4 as bench/bench_infer.py does), fills a KV cache of `--context` positions, runs
`decode_logits_fused` eagerly under `torch.profiler` and prints GPU microseconds per step by kernel
name, sorted. Eager launches cost host time, not GPU time: the kernel sums are what a CUDA-graph step
costs on the GPU (plus ~1 us per kernel of graph launch gaps).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.bench_infer import build_model, quantize_rtn  # noqa: E402
from mpo.infer import decode_ops  # noqa: E402
from mpo.infer.decoder import ModelPieces, decode_logits_fused  # noqa: E402


def profile_step(pieces: ModelPieces, rows: int, context: int, steps: int) -> dict:
    cache = pieces.new_cache(rows, context + 64)
    tokens = torch.randint(0, 1000, (rows,), device=pieces.device)
    positions = torch.full((rows,), context, device=pieces.device)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    splits = decode_ops.default_num_splits(rows, pieces.num_kv_heads, cache.capacity, sms)
    for _ in range(3):
        decode_logits_fused(pieces, cache, tokens, positions, num_splits=splits)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            decode_logits_fused(pieces, cache, tokens, positions, num_splits=splits)
        torch.cuda.synchronize()
    per_kernel = collections.defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[ev.name][0] += ev.device_time / steps
            per_kernel[ev.name][1] += 1
    rows_out = sorted(({"kernel": k[:90], "us_per_step": v[0], "launches_per_step": v[1] / steps}
                       for k, v in per_kernel.items()), key=lambda r: -r["us_per_step"])
    return {"rows": rows, "context": context, "kernel_us_per_step": sum(r["us_per_step"] for r in rows_out),
            "launches_per_step": sum(r["launches_per_step"] for r in rows_out), "kernels": rows_out}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=("awq", "bf16"), default="awq")
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--context", type=int, default=640)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    model = build_model("4b", torch.device("cuda"))
    if args.engine == "awq":
        quantize_rtn(model)
    pieces = ModelPieces(model)
    pieces.fuse_projections()
    with torch.no_grad():
        result = profile_step(pieces, args.rows, args.context, args.steps)
    result["engine"] = args.engine
    print(f"{args.engine} rows={args.rows}: {result['kernel_us_per_step']:.0f} us of kernels per step, "
          f"{result['launches_per_step']:.0f} launches")
    for r in result["kernels"][:14]:
        print(f"  {r['us_per_step']:8.1f} us  x{r['launches_per_step']:<5.0f} {r['kernel']}")
    out = Path(args.out or Path(os.environ.get("OUT", ".")) / f"profile_decode_{args.engine}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
