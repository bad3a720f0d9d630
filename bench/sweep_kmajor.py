"""Sweep launch configs of the K-major W4A16 decode kernel against the AWQ-layout kernel (one CUDA GPU).

    python bench/sweep_kmajor.py [--ms 1,8] [--out $OUT/sweep_kmajor.json]

Same harness as bench/bench_kernels.py (CUDA-graph replays over weight copies 3x the L2).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.bench_kernels import (  # noqa: E402
    CALLS_PER_GRAPH_MIN, GROUP_SIZE, SHAPES, bytes_w4a16, copy_bandwidth_gbs, graph_us_per_call, num_copies,
    random_awq,
)
from mpo.infer.kernels import W4A16Config, w4a16_gemm, w4a16_gemm_ref  # noqa: E402
from mpo.infer.kernels.w4a16_kmajor import kmajor_config, repack_kmajor, w4a16_kmajor_gemm  # noqa: E402


def configs(m):
    """(block_m, block_n, warps, stages, programs per SM)."""
    block_ms = (16,) if m <= 16 else (16, 32, 64)
    yield from itertools.product(block_ms, (32, 64, 128), (4, 8), (2, 3), (1, 2, 4))


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--ms", default="1,8")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    sms = props.multi_processor_count
    gen = torch.Generator(device=dev).manual_seed(0)
    copy_gbs = copy_bandwidth_gbs(dev)
    rows = []
    for (name, (k, n)), m in itertools.product(SHAPES.items(), [int(v) for v in args.ms.split(",")]):
        nbytes = bytes_w4a16(m, k, n)
        ncopy = num_copies(nbytes, props.L2_cache_size)
        awq = [random_awq(k, n, dev, gen) for _ in range(ncopy)]
        km = [repack_kmajor(*w, GROUP_SIZE) for w in awq]
        x = torch.randn((m, k), generator=gen, device=dev).to(torch.bfloat16)
        twin = w4a16_gemm_ref(x, *awq[0], group_size=GROUP_SIZE).float()

        def cyc(calls):
            return list(itertools.islice(itertools.cycle(calls), max(len(calls), CALLS_PER_GRAPH_MIN)))

        base_us = graph_us_per_call(cyc([lambda w=w: w4a16_gemm(x, *w, group_size=GROUP_SIZE) for w in awq]), 20)
        default = kmajor_config(m, n, k, GROUP_SIZE, dev)
        y = w4a16_kmajor_gemm(x, km[0]).float()
        err = ((y - twin).abs() / (2**-7 * twin.abs().clamp_min(1e-2))).max().item()
        def_us = graph_us_per_call(cyc([lambda w=w: w4a16_kmajor_gemm(x, w) for w in km]), 20)
        best = (def_us, default.__dict__)
        tried = []
        for bm, bn, warps, stages, per_sm in configs(m):
            tiles = -(-n // bn) * -(-m // bm)
            split = max(1, min(k // 128, round(per_sm * sms / tiles)))
            cfg = W4A16Config(bm, bn, 16, split, warps, stages)
            try:
                yc = w4a16_kmajor_gemm(x, km[0], config=cfg).float()
                e = ((yc - twin).abs() / (2**-7 * twin.abs().clamp_min(1e-2))).max().item()
                us = graph_us_per_call(cyc([lambda w=w, c=cfg: w4a16_kmajor_gemm(x, w, config=c) for w in km]), 10)
            except Exception as exc:  # noqa: BLE001
                tried.append({"config": cfg.__dict__, "error": str(exc)[:120]})
                continue
            tried.append({"config": cfg.__dict__, "us": us, "err_ulps": e})
            if e < 4 and us < best[0]:
                best = (us, cfg.__dict__)
        row = {"shape": name, "M": m, "K": k, "N": n, "awq_layout_us": base_us,
               "awq_layout_gbs": nbytes / base_us / 1e3, "kmajor_default_us": def_us,
               "kmajor_default_gbs": nbytes / def_us / 1e3, "kmajor_err_ulps": err,
               "kmajor_best_us": best[0], "kmajor_best_gbs": nbytes / best[0] / 1e3, "best_config": best[1],
               "tried": tried}
        rows.append(row)
        print(f"{name:<18} M={m:<3} awq {base_us:7.1f}us {row['awq_layout_gbs']:5.0f}GB/s | kmajor default "
              f"{def_us:7.1f}us {row['kmajor_default_gbs']:5.0f}GB/s err {err:.2f} | best {best[0]:7.1f}us "
              f"{row['kmajor_best_gbs']:5.0f}GB/s {best[1]}", flush=True)
        del awq, km
        torch.cuda.empty_cache()
    print(f"copy bandwidth {copy_gbs:.0f} GB/s")
    out = Path(args.out or Path(os.environ.get("OUT", ".")) / "sweep_kmajor.json")
    out.write_text(json.dumps({"device": props.name, "copy_gbs": copy_gbs, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
