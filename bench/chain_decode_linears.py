"""Time a decode step's linears as they really run: a CUDA graph of every layer's qkv, o, gate_up, down.

    python bench/chain_decode_linears.py [--layers 12] [--ms 1,8] [--out $OUT/chain_decode_linears.json]

A single kernel timed alone hides what a decode step pays per launch (launch latency, the first
weight bytes' latency, the split-K hand-off). This replays the 4B shape's four decoder linears per
layer for `--layers` layers (distinct weights, 12 layers = 460 MB of int4, far above L2) in one graph
and reports microseconds per layer and the achieved weight bandwidth, for: bf16 `F.linear`, the
AWQ-layout kernel (`w4a16_gemm`), the K-major kernel, the K-major kernel with programmatic
dependent launch (each kernel streams its weights while the previous one finishes), and, as an
outside reference, torch's own int4 CUDA kernel (`torch._weight_int4pack_mm`, gpt-fast's
"tinygemm"; batch 1 only). The same variants are also timed per shape (each shape chained over
enough weight copies to exceed L2).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: E402

from bench.bench_kernels import GROUP_SIZE, copy_bandwidth_gbs, median_event_ms, num_copies, random_awq  # noqa: E402
from mpo.infer.kernels import w4a16_gemm  # noqa: E402
from mpo.infer.kernels.w4a16_kmajor import repack_kmajor, w4a16_kmajor_gemm  # noqa: E402
from mpo.quant.pack import unpack_awq_gemm  # noqa: E402

LINEARS = (("qkv", 2048, 2560), ("o", 2048, 2048), ("gate_up", 2048, 22016), ("down", 11008, 2048))


def graph_ms(calls) -> float:
    for c in calls:
        c()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    return median_event_ms(graph.replay, reps=20, warmup=3)


@triton.jit
def _tiny_kernel(x_ptr, y_ptr, PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    offs = tl.program_id(0) * 128 + tl.arange(0, 128)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs) + 1.0)


def tinygemm_weights(qweight, qzeros, scales):
    """An AutoAWQ linear in tinygemm's layout. tinygemm computes ``(q - 8) * scale + zero`` with a
    float zero, so AWQ's ``(q - z) * scale`` needs zero = (8 - z) * scale rounded to bf16: close to,
    not bit-exact with, our kernels (the relative error is reported)."""
    q_IO, zeros_GO = unpack_awq_gemm(qweight, qzeros)
    q = q_IO.t().contiguous()  # [N, K]
    packed = torch._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), 8)
    s = scales.float()
    sz = torch.stack([s, (8 - zeros_GO.float()) * s], dim=-1).to(torch.bfloat16).contiguous()  # [K/g, N, 2]
    return packed, sz


def tinygemm(x, w):
    return torch._weight_int4pack_mm(x, w[0], GROUP_SIZE, w[1])


def per_shape(dev, gen, copy_gbs, l2_bytes) -> list[dict]:
    """Each decode shape at M = 1, chained over enough distinct weight copies to exceed L2."""
    rows = []
    for name, k, n in LINEARS:
        nbytes = k * n // 2 + (k // GROUP_SIZE) * n * 3
        copies = num_copies(nbytes, l2_bytes)
        awq = [random_awq(k, n, dev, gen) for _ in range(copies)]
        x = torch.randn((1, k), generator=gen, device=dev).to(torch.bfloat16)
        km = [repack_kmajor(*w, GROUP_SIZE) for w in awq]
        tg = [tinygemm_weights(*w) for w in awq]
        ref = w4a16_kmajor_gemm(x, km[0]).float()
        rel_err = float((tinygemm(x, tg[0]).float() - ref).abs().max() / ref.abs().max())
        for variant, calls in (("kmajor", [lambda w=w: w4a16_kmajor_gemm(x, w) for w in km]),
                               ("torch_int4pack", [lambda w=w: tinygemm(x, w) for w in tg])):
            us = graph_ms(calls) * 1e3 / copies
            rows.append({"shape": name, "K": k, "N": n, "variant": variant, "us": us, "gbs": nbytes / us / 1e3,
                         "pct_copy": 100 * nbytes / us / 1e3 / copy_gbs,
                         **({"max_rel_err_vs_kmajor": rel_err} if variant == "torch_int4pack" else {})})
            print(f"{name:<8} {variant:<15} {us:6.2f} us {nbytes / us / 1e3:6.0f} GB/s", flush=True)
        del awq, km, tg
    return rows


def launch_floor_us(pdl: bool, calls: int = 200) -> float:
    """Microseconds per launch of a trivial 132-program kernel, chained in one CUDA graph."""
    a = torch.zeros(132 * 128, device="cuda")
    b = torch.zeros_like(a)
    extra = {"launch_pdl": True} if pdl else {}
    fns = [lambda s=s, d=d: _tiny_kernel[(132,)](s, d, PDL=pdl, **extra)
           for s, d in [(a, b), (b, a)] * (calls // 2)]
    return graph_ms(fns) * 1e3 / calls


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--ms", default="1,8")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    copy_gbs = copy_bandwidth_gbs(dev)
    floor = {"plain": launch_floor_us(False), "pdl": launch_floor_us(True)}
    print(f"trivial kernel chained in a graph: {floor['plain']:.2f} us per launch, with PDL {floor['pdl']:.2f} us")
    layers = [{name: random_awq(k, n, dev, gen) for name, k, n in LINEARS} for _ in range(args.layers)]
    kmajor = [{name: repack_kmajor(*w[name], GROUP_SIZE) for name, _, _ in LINEARS} for w in layers]
    int4_bytes = sum(k * n // 2 + (k // GROUP_SIZE) * n * 3 for _, k, n in LINEARS)  # + fp16 scale + u8 zero
    bf16_bytes = sum(k * n * 2 for _, k, n in LINEARS)
    results = {"device": torch.cuda.get_device_name(), "copy_gbs": copy_gbs, "layers": args.layers,
               "trivial_kernel_us": floor, "rows": []}
    for m in [int(v) for v in args.ms.split(",")]:
        xs = {k: torch.randn((m, k), generator=gen, device=dev).to(torch.bfloat16) for k in (2048, 11008)}
        # Same inputs, same outputs: the PDL and plain K-major kernels must agree bit for bit.
        w0 = kmajor[0]["gate_up"]
        same = torch.equal(w4a16_kmajor_gemm(xs[2048], w0), w4a16_kmajor_gemm(xs[2048], w0, pdl=2))
        tg_layers = [{name: tinygemm_weights(*w[name]) for name, _, _ in LINEARS} for w in layers] if m == 1 else []
        variants = {
            "awq_layout": lambda: [lambda w=w[name], k=k: w4a16_gemm(xs[k], *w, group_size=GROUP_SIZE)
                                   for w in layers for name, k, _ in LINEARS],
            "kmajor": lambda: [lambda w=w[name], k=k: w4a16_kmajor_gemm(xs[k], w)
                               for w in kmajor for name, k, _ in LINEARS],
            "kmajor_pdl_wait": lambda: [lambda w=w[name], k=k: w4a16_kmajor_gemm(xs[k], w, pdl=1)
                                        for w in kmajor for name, k, _ in LINEARS],
            "kmajor_pdl_prefetch": lambda: [lambda w=w[name], k=k: w4a16_kmajor_gemm(xs[k], w, pdl=2)
                                            for w in kmajor for name, k, _ in LINEARS],
        }
        if tg_layers:
            variants["torch_int4pack"] = lambda: [lambda w=w[name], k=k: tinygemm(xs[k], w)
                                                  for w in tg_layers for name, k, _ in LINEARS]
        for name, make in variants.items():
            try:
                ms = graph_ms(make())
            except Exception as exc:  # noqa: BLE001 (report and go on: e.g. PDL not capturable)
                results["rows"].append({"M": m, "variant": name, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
                print(f"M={m} {name}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                continue
            us = ms * 1e3 / args.layers
            row = {"M": m, "variant": name, "us_per_layer": us, "gbs": int4_bytes / us / 1e3,
                   "pct_copy": 100 * int4_bytes / us / 1e3 / copy_gbs}
            results["rows"].append(row)
            print(f"M={m} {name:<12} {us:7.1f} us/layer {row['gbs']:6.0f} GB/s {row['pct_copy']:4.0f}% of copy",
                  flush=True)
        results["rows"].append({"M": m, "pdl_equals_plain": same})
        print(f"M={m} PDL output == plain output: {same}")
        wb = [{name: torch.randn((n, k), generator=gen, device=dev).to(torch.bfloat16) for name, k, n in LINEARS}
              for _ in range(min(args.layers, 8))]
        ms = graph_ms([lambda w=w[name], k=k: F.linear(xs[k], w) for w in wb for name, k, _ in LINEARS])
        us = ms * 1e3 / len(wb)
        results["rows"].append({"M": m, "variant": "bf16_linear", "us_per_layer": us, "gbs": bf16_bytes / us / 1e3,
                                "pct_copy": 100 * bf16_bytes / us / 1e3 / copy_gbs})
        print(f"M={m} bf16_linear  {us:7.1f} us/layer {bf16_bytes / us / 1e3:6.0f} GB/s")
        del wb
    results["per_shape_m1"] = per_shape(dev, gen, copy_gbs, torch.cuda.get_device_properties(dev).L2_cache_size)
    print(f"copy bandwidth {copy_gbs:.0f} GB/s; int4 bytes per layer {int4_bytes / 1e6:.1f} MB")
    out = Path(args.out or Path(os.environ.get("OUT", ".")) / "chain_decode_linears.json")
    out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
