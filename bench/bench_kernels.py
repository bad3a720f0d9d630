"""Benchmark the W4A16 Triton kernels on InternVL2.5-4B's LLM linear shapes (needs one CUDA GPU).

    python bench/bench_kernels.py                      # table + $OUT/bench_kernels.json
    python bench/bench_kernels.py --out results.json   # explicit output path
    python bench/bench_kernels.py --sweep              # also time candidate configs per shape

For each linear shape (K in, N out) of Qwen2.5-3B and each M (tokens per call) it:
1. checks the dispatcher's output against the plain-torch twin (fp32 dequantize + matmul);
2. times our AWQ-layout kernel, the K-major decode kernel (``w4a16_kmajor``, the layout the engine
   repacks AWQ linears into for decode) and bf16 ``F.linear`` on the same shape, replaying a CUDA graph of many calls
   (decode runs under graphs; eager launches would time Python overhead) and rotating among enough
   weight copies that the data set is 3x the L2, so every call reads its weights from HBM as a
   real decode step does;
3. reports achieved GB/s (weights + scales + zeros + activations read and output written, i.e.
   the fewest bytes the op must move) against the device-to-device copy bandwidth measured in the
   same run.

Needs only torch, triton and this repository (``mpo.infer.kernels``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from mpo.infer.kernels import (  # noqa: E402
    SKINNY_MAX_M,
    W4A16Config,
    default_config,
    w4a16_gemm,
    w4a16_gemm_ref,
    w4a16_gemm_tiled,
    w4a16_gemv_splitk,
)
from mpo.infer.kernels.w4a16_kmajor import repack_kmajor, w4a16_kmajor_gemm  # noqa: E402

GROUP_SIZE = 128
# Qwen2.5-3B (InternVL2.5-4B's LLM), hidden 2048, 16 heads x 128, 2 kv heads, ffn 11008: (K, N).
SHAPES = {
    "q_proj/o_proj": (2048, 2048),
    "k_proj/v_proj": (2048, 256),
    "gate_proj/up_proj": (2048, 11008),
    "down_proj": (11008, 2048),
    "qkv (fused)": (2048, 2560),  # what decode runs: q/k/v and gate/up as one GEMM each
    "gate_up (fused)": (2048, 22016),
}
MS = (1, 8, 64, 256)
CALLS_PER_GRAPH_MIN = 16
MAX_COPIES = 512


def random_awq(k: int, n: int, device: torch.device, gen: torch.Generator):
    """Random but valid AutoAWQ GEMM tensors: every int32 bit pattern is eight valid nibbles."""
    def words(rows: int) -> torch.Tensor:
        u = torch.randint(0, 2**32, (rows, n // 8), generator=gen, dtype=torch.int64, device=device)
        return torch.where(u >= 2**31, u - 2**32, u).to(torch.int32)

    qweight = words(k)
    qzeros = words(k // GROUP_SIZE)
    # Scales of a typical 4-bit group of N(0, 0.02) weights: range ~ 0.1 / 15.
    scales = ((torch.rand((k // GROUP_SIZE, n), generator=gen, device=device) + 0.5) * 6e-3).half()
    return qweight, qzeros, scales


def bytes_w4a16(m: int, k: int, n: int) -> int:
    groups = k // GROUP_SIZE
    return k * n // 2 + groups * n // 2 + groups * n * 2 + m * k * 2 + m * n * 2


def bytes_bf16(m: int, k: int, n: int) -> int:
    return k * n * 2 + m * k * 2 + m * n * 2


def median_event_ms(fn, reps: int, warmup: int) -> float:
    """Median over ``reps`` of one ``fn()`` timed with CUDA events (after ``warmup`` calls)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def graph_us_per_call(calls, reps: int) -> float:
    """Capture ``calls`` (zero-arg callables) in one CUDA graph; median replay time / len(calls)."""
    for c in calls:  # compile + allocate outside the capture
        c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm the capture stream's allocator pool, as the docs advise
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    ms = median_event_ms(graph.replay, reps=reps, warmup=3)
    del graph
    return ms * 1e3 / len(calls)


def copy_bandwidth_gbs(device: torch.device) -> float:
    """Device-to-device ``copy_`` of 1 GiB, counting bytes read + written."""
    src = torch.randn(2**28, device=device)
    dst = torch.empty_like(src)
    ms = median_event_ms(lambda: dst.copy_(src), reps=20, warmup=3)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def num_copies(bytes_per_call: int, l2_bytes: int) -> int:
    return max(1, min(MAX_COPIES, math.ceil(3 * l2_bytes / bytes_per_call)))


def check_correct(x, weights) -> dict:
    """Dispatcher vs fp32 twin: relative Frobenius error and max error in output ulps."""
    qweight, qzeros, scales = weights
    y = w4a16_gemm(x, qweight, qzeros, scales, group_size=GROUP_SIZE).float()
    twin = w4a16_gemm_ref(x, qweight, qzeros, scales, group_size=GROUP_SIZE).float()
    exact = x.float() @ _dequant(qweight, qzeros, scales)
    rel = ((y - exact).norm() / exact.norm()).item()
    ulp = torch.finfo(x.dtype).eps * exact.abs().clamp_min(1e-3)
    worst_ulps = ((y - twin).abs() / ulp).max().item()
    ok = bool(torch.isfinite(y).all()) and rel < 5e-3 and worst_ulps <= 2.0
    return {"rel_fro_err": rel, "max_ulps_vs_twin": worst_ulps, "correct": ok}


def _dequant(qweight, qzeros, scales):
    from mpo.quant.pack import dequantize_awq_gemm

    return dequantize_awq_gemm(qweight, qzeros, scales, group_size=GROUP_SIZE)


def bench_shape(name, k, n, m, device, gen, l2, reps) -> dict:
    weights = random_awq(k, n, device, gen)
    x = torch.randn((m, k), generator=gen, device=device).to(torch.bfloat16)
    row = {"shape": name, "K": k, "N": n, "M": m, **check_correct(x, weights)}
    cfg = default_config(m, n, k, GROUP_SIZE, device)
    # Same rule as w4a16_gemm's dispatch.
    row["kernel"] = "tiled" if m > SKINNY_MAX_M and cfg.split_k == 1 else "splitk"
    row["config"] = cfg.__dict__

    n_w4 = num_copies(bytes_w4a16(m, k, n), l2)
    copies = [weights] + [random_awq(k, n, device, gen) for _ in range(n_w4 - 1)]
    calls = [lambda w=w: w4a16_gemm(x, *w, group_size=GROUP_SIZE) for w in copies]
    calls = list(itertools.islice(itertools.cycle(calls), max(len(calls), CALLS_PER_GRAPH_MIN)))
    row["ours_us"] = graph_us_per_call(calls, reps)
    row["ours_eager_us"] = median_event_ms(calls[0], reps=reps, warmup=10) * 1e3
    # The K-major repack the engine decodes with (weights + fp16 scales + uint8 zeros).
    kcopies = [repack_kmajor(*w, GROUP_SIZE) for w in copies]
    y = w4a16_kmajor_gemm(x, kcopies[0]).float()
    twin = w4a16_gemm_ref(x, *weights, group_size=GROUP_SIZE).float()
    row["kmajor_max_ulps_vs_twin"] = ((y - twin).abs() / (torch.finfo(x.dtype).eps * twin.abs().clamp_min(1e-3))).max().item()
    calls = [lambda w=w: w4a16_kmajor_gemm(x, w) for w in kcopies]
    calls = list(itertools.islice(itertools.cycle(calls), max(len(calls), CALLS_PER_GRAPH_MIN)))
    row["kmajor_us"] = graph_us_per_call(calls, reps)
    del copies, kcopies, calls

    n_bf = num_copies(bytes_bf16(m, k, n), l2)
    w_bf = [torch.randn((n, k), generator=gen, device=device).to(torch.bfloat16) * 0.02
            for _ in range(n_bf)]
    calls = [lambda w=w: F.linear(x, w) for w in w_bf]
    calls = list(itertools.islice(itertools.cycle(calls), max(len(calls), CALLS_PER_GRAPH_MIN)))
    row["bf16_us"] = graph_us_per_call(calls, reps)
    del w_bf, calls

    row["ours_gbs"] = bytes_w4a16(m, k, n) / (row["ours_us"] * 1e-6) / 1e9
    row["kmajor_gbs"] = (bytes_w4a16(m, k, n) + (k // GROUP_SIZE) * n // 2) / (row["kmajor_us"] * 1e-6) / 1e9
    row["bf16_gbs"] = bytes_bf16(m, k, n) / (row["bf16_us"] * 1e-6) / 1e9
    row["ours_tflops"] = 2 * m * k * n / (row["ours_us"] * 1e-6) / 1e12
    row["speedup_vs_bf16"] = row["bf16_us"] / row["ours_us"]
    return row


def sweep_configs(m: int, group_size: int):
    """Candidate (kernel, config) pairs around the dispatcher's choice at M."""
    if m == 1:
        for bn, bk, warps, split in itertools.product(
                (32, 64, 128), (16, 32, 64), (1, 2, 4), (4, 8, 16, 32)):
            if bk * bn <= 4096:
                yield "splitk", W4A16Config(1, bn, bk, split, warps, 3)
    elif m <= SKINNY_MAX_M:
        for bn, bk, split in itertools.product((64, 128, 256), (32, 64, 128), (2, 4, 8, 16, 32)):
            yield "splitk", W4A16Config(16, bn, bk, split, 4, 3)
    else:
        pm = triton.next_power_of_2(m)
        for bm, bn, bk, warps, stages in itertools.product(
                sorted({min(pm, 64), min(pm, 128)}), (64, 128, 256), (64,), (4, 8), (3, 4)):
            yield "tiled", W4A16Config(bm, bn, bk, 1, warps, stages)
        for bn, split in itertools.product((64, 128), (2, 4, 8)):
            yield "splitk", W4A16Config(min(pm, 64), bn, 64, split, 4, 3)


def sweep_shape(name, k, n, m, device, gen, l2, reps) -> list[dict]:
    weights = random_awq(k, n, device, gen)
    x = torch.randn((m, k), generator=gen, device=device).to(torch.bfloat16)
    twin = w4a16_gemm_ref(x, *weights, group_size=GROUP_SIZE).float()
    n_w4 = num_copies(bytes_w4a16(m, k, n), l2)
    copies = [weights] + [random_awq(k, n, device, gen) for _ in range(n_w4 - 1)]
    rows = []
    for kind, cfg in sweep_configs(m, GROUP_SIZE):
        fn = w4a16_gemv_splitk if kind == "splitk" else w4a16_gemm_tiled
        try:
            y = fn(x, *weights, group_size=GROUP_SIZE, config=cfg).float()
        except Exception as exc:  # a config that does not compile (e.g. out of shared memory)
            rows.append({"shape": name, "M": m, "kind": kind, "config": cfg.__dict__,
                         "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
            continue
        ulps = ((y - twin).abs() / (2**-7 * twin.abs().clamp_min(1e-3))).max().item()
        calls = [lambda w=w, fn=fn, cfg=cfg: fn(x, *w, group_size=GROUP_SIZE, config=cfg)
                 for w in copies]
        calls = list(itertools.islice(itertools.cycle(calls), max(len(calls), CALLS_PER_GRAPH_MIN)))
        us = graph_us_per_call(calls, reps)
        rows.append({"shape": name, "M": m, "kind": kind, "config": cfg.__dict__, "us": us,
                     "gbs": bytes_w4a16(m, k, n) / (us * 1e-6) / 1e9, "max_ulps": ulps})
    return rows


def print_table(rows, copy_gbs):
    head = (f"{'shape':<18}{'M':>5}{'kernel':>8}{'ours us':>9}{'GB/s':>7}{'%copy':>7}{'kmaj us':>9}{'GB/s':>7}{'%copy':>7}"
            f"{'bf16 us':>9}{'GB/s':>7}{'x bf16':>8}{'eager':>8}{'ok':>4}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['shape']:<18}{r['M']:>5}{r['kernel']:>8}{r['ours_us']:>9.1f}{r['ours_gbs']:>7.0f}"
              f"{100 * r['ours_gbs'] / copy_gbs:>6.0f}%{r['kmajor_us']:>9.1f}{r['kmajor_gbs']:>7.0f}"
              f"{100 * r['kmajor_gbs'] / copy_gbs:>6.0f}%{r['bf16_us']:>9.1f}{r['bf16_gbs']:>7.0f}"
              f"{r['speedup_vs_bf16']:>8.2f}{r['ours_eager_us']:>8.1f}{'y' if r['correct'] else 'N':>4}")
    print(f"device copy bandwidth: {copy_gbs:.0f} GB/s (read + write)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="JSON path (default $OUT/bench_kernels.json)")
    parser.add_argument("--ms", default=",".join(map(str, MS)), help="comma-separated M values")
    parser.add_argument("--reps", type=int, default=50, help="graph replays per timing")
    parser.add_argument("--sweep", action="store_true", help="also time candidate configs")
    parser.add_argument("--sweep-ms", default="1,8,64,256", help="M values for --sweep")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU", file=sys.stderr)
        return 2
    out = Path(args.out or Path(os.environ.get("OUT", ".")) / "bench_kernels.json")
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    gen = torch.Generator(device=device).manual_seed(0)
    ms = [int(v) for v in args.ms.split(",") if v]

    copy_gbs = copy_bandwidth_gbs(device)
    rows = []
    for (name, (k, n)), m in itertools.product(SHAPES.items(), ms):
        rows.append(bench_shape(name, k, n, m, device, gen, props.L2_cache_size, args.reps))
        torch.cuda.empty_cache()
    result = {
        "device": props.name, "num_sms": props.multi_processor_count,
        "l2_bytes": props.L2_cache_size, "torch": torch.__version__, "triton": triton.__version__,
        "group_size": GROUP_SIZE, "copy_gbs": copy_gbs, "rows": rows,
    }
    if args.sweep:
        sweep = []
        for (name, (k, n)), m in itertools.product(SHAPES.items(),
                                                   [int(v) for v in args.sweep_ms.split(",") if v]):
            sweep_rows = sweep_shape(name, k, n, m, device, gen, props.L2_cache_size, 20)
            sweep.extend(sweep_rows)
            ok = [r for r in sweep_rows if "us" in r and r["max_ulps"] <= 2.0]
            best = min(ok, key=lambda r: r["us"]) if ok else None
            if best is not None:
                print(f"sweep {name:<18} M={m:<4} best {best['us']:8.1f} us "
                      f"{best['gbs']:6.0f} GB/s {best['config']}")
            torch.cuda.empty_cache()
        result["sweep"] = sweep
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print_table(rows, copy_gbs)
    print(f"wrote {out}")
    return 0 if all(r["correct"] and r["kmajor_max_ulps_vs_twin"] <= 2.0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
