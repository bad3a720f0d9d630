"""End-to-end generation benchmark on InternVL2.5-4B's shape with random weights (one CUDA GPU).

    python bench/bench_infer.py                         # table + $OUT/bench_infer.json (or ./bench_infer.json)
    python bench/bench_infer.py --out results.json      # explicit output path
    python bench/bench_infer.py --batches 1 8 --skip-hf # quicker look at our engine only

Side by side, in one run, for batch sizes 1, 8 and 64 (prompt 512 random tokens, 256 new tokens,
end-of-sequence ignored):

- `transformers` generate, bf16, dynamic cache (greedy);
- our engine (`mpo.infer.fast.FastGenerator`), bf16: shared-prefix prefill, static cache, CUDA
  graphs, fused decode kernels;
- our engine on the same weights quantized to AWQ int4 (RTN, group 128, `mpo.quant`) through
  `WQLinear` and the W4A16 Triton kernels.

Prefill tok/s = batch * prompt / time of a call generating 1 token (prompt processing + first
token); decode tok/s = batch * (new - 1) / (time(new tokens) - time(1 token)). The same two calls
time every engine. It also measures device-to-device copy bandwidth and prints each engine's
batch-1 decode rate against the weight-read limit (bytes read per decode step / bandwidth).

The model is built on the meta device and materialised on the GPU in bf16 with random N(0, 0.02)
weights; no tokenizer or checkpoint files are needed. Needs torch, transformers, triton and this
repository; runs in ~4-6 minutes on one H100 (transformers at batch 1 is most of it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import InternVLForConditionalGeneration  # noqa: E402

from mpo.infer.engine import SamplingParams  # noqa: E402
from mpo.infer.fast import FastGenerator  # noqa: E402
from mpo.model.shapes import SHAPES, internvl_config  # noqa: E402

DECODER_LINEARS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


def build_model(shape: str, device: torch.device) -> InternVLForConditionalGeneration:
    """The shape's model in bf16 on `device` with random weights (built on meta, no CPU copy)."""
    vocab = SHAPES[shape].text.vocab_size
    config = internvl_config(shape, image_token_id=vocab - 1, pad_token_id=0, eos_token_id=None)
    with torch.device("meta"):
        model = InternVLForConditionalGeneration(config)
    model = model.to(torch.bfloat16).to_empty(device=device)  # dtype first: nothing allocated on meta
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.02, generator=gen)
            elif "norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=gen)
        # Non-persistent buffers are not parameters: rebuild the rotary tables to_empty left blank.
        rotary = model.model.language_model.rotary_emb
        inv_freq, _ = rotary.compute_default_rope_parameters(model.config.text_config)
        rotary.inv_freq = inv_freq.to(device)
        rotary.original_inv_freq = inv_freq.clone().to(device)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def quantize_rtn(model: nn.Module) -> int:
    """Replace every decoder linear by an AWQ int4 `WQLinear` (round-to-nearest, group 128)."""
    from mpo.quant.awq_linear import WQLinear
    from mpo.quant.pack import AWQLinearWeights

    count = 0
    for layer in model.model.language_model.layers:
        for parent_name, names in DECODER_LINEARS.items():
            parent = getattr(layer, parent_name)
            for name in names:
                linear = getattr(parent, name)
                weights = AWQLinearWeights.from_linear(linear, group_size=128)
                setattr(parent, name, WQLinear.from_awq_weights(weights))
                count += 1
    torch.cuda.empty_cache()
    return count


def copy_bandwidth(device: torch.device, num_bytes: int = 1 << 30, reps: int = 20) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written per second)."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3
    del src, dst
    return 2 * num_bytes * reps / seconds / 1e9


def decode_bytes_per_step(model: nn.Module) -> int:
    """Bytes a batch-1 decode step must read: the LLM's layers (weights, or packed int4 + scales +
    zeros), its final norm and the lm_head (the one embedding row read is negligible)."""
    lm = model.model.language_model
    tensors = list(lm.layers.parameters()) + list(lm.layers.buffers()) + list(lm.norm.parameters())
    tensors += list(model.lm_head.parameters())
    seen, total = set(), 0
    for t in tensors:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def random_prompts(batch: int, prompt_len: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 150_000, (batch, prompt_len), generator=gen)


def bench_transformers(model, batch: int, prompt_len: int, new_tokens: int) -> dict:
    ids = random_prompts(batch, prompt_len, seed=batch).to(model.device)

    def generate(n: int):
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                 do_sample=False, pad_token_id=0)
        # no eos_token_id anywhere: nothing can stop early
        assert out.shape == (batch, prompt_len + n), out.shape

    generate(2)  # warm-up (kernel selection, allocator)
    t_first = timed(lambda: generate(1))
    t_all = timed(lambda: generate(new_tokens))
    return _rates(batch, prompt_len, new_tokens, [t_first], [t_all])


def bench_ours(generator: FastGenerator, batch: int, prompt_len: int, new_tokens: int, reps: int) -> dict:
    ids = random_prompts(batch, prompt_len, seed=batch)
    prompts = [SimpleNamespace(input_ids=row, pixel_values=None) for row in ids.tolist()]
    first, full = SamplingParams(max_new_tokens=1), SamplingParams(max_new_tokens=new_tokens)
    generator.generate(prompts, first)  # warm-up: Triton compilation, prefill shapes
    out = generator.generate(prompts, full)  # warm-up: graph capture for (batch, capacity)
    assert all(len(s[0].token_ids) == new_tokens for s in out), "EOS must be ignored"
    t_first = [timed(lambda: generator.generate(prompts, first)) for _ in range(reps)]
    t_all = [timed(lambda: generator.generate(prompts, full)) for _ in range(reps)]
    return _rates(batch, prompt_len, new_tokens, t_first, t_all)


def _rates(batch: int, prompt_len: int, new_tokens: int, t_first: list[float], t_all: list[float]) -> dict:
    first, full = statistics.median(t_first), statistics.median(t_all)
    decode_seconds = max(full - first, 1e-9)
    return {
        "batch": batch,
        "prefill_tok_s": batch * prompt_len / first,
        "decode_tok_s": batch * (new_tokens - 1) / decode_seconds,
        "ms_per_decode_step": 1e3 * decode_seconds / (new_tokens - 1),
        "seconds_first_token": first,
        "seconds_total": full,
    }


def print_table(rows: list[dict], limits: dict) -> None:
    print(f"\n{'engine':<22}{'batch':>6}{'prefill tok/s':>15}{'decode tok/s':>14}{'ms/step':>9}{'% of limit':>12}")
    for r in rows:
        share = ""
        if r["batch"] == 1 and r["engine"] in limits:
            share = f"{100 * r['decode_tok_s'] / limits[r['engine']]:.0f}%"
        print(f"{r['engine']:<22}{r['batch']:>6}{r['prefill_tok_s']:>15,.0f}{r['decode_tok_s']:>14,.0f}"
              f"{r['ms_per_decode_step']:>9.2f}{share:>12}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="4b", choices=sorted(SHAPES), help="model shape (default 4b)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64], help="batch sizes (default 1 8 64)")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions of our engine (median)")
    parser.add_argument("--skip-hf", action="store_true", help="leave out transformers generate")
    parser.add_argument("--skip-awq", action="store_true", help="leave out the AWQ column")
    parser.add_argument("--out", default=None, help="JSON path (default $OUT/bench_infer.json or ./bench_infer.json)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    if args.new_tokens < 2:
        parser.error("--new-tokens must be >= 2 (decode rate = tokens after the first)")
    out_path = Path(args.out) if args.out else Path(os.environ.get("OUT", ".")) / "bench_infer.json"
    device = torch.device("cuda")
    started = time.perf_counter()

    bandwidth = copy_bandwidth(device)
    print(f"device: {torch.cuda.get_device_name(device)}; copy bandwidth {bandwidth:,.0f} GB/s")
    model = build_model(args.shape, device)
    llm_params = sum(p.numel() for p in model.model.language_model.parameters()) + model.lm_head.weight.numel()
    print(f"built {args.shape} with random weights in {time.perf_counter() - started:.0f}s "
          f"(LLM + lm_head: {llm_params / 1e9:.2f}B parameters)")
    bytes_bf16 = decode_bytes_per_step(model)
    limits = {"transformers bf16": bandwidth * 1e9 / bytes_bf16, "ours bf16": bandwidth * 1e9 / bytes_bf16}
    rows, notes = [], []

    if not args.skip_hf:
        for batch in args.batches:
            rows.append({"engine": "transformers bf16", **bench_transformers(model, batch, args.prompt_len,
                                                                             args.new_tokens)})
            print(f"transformers bf16 batch {batch}: {rows[-1]['decode_tok_s']:,.0f} decode tok/s")

    generator = FastGenerator(model, stop_id=None, max_batch_rows=max(args.batches), max_cached_batches=8)
    print(f"ours: cuda graphs {generator.use_graphs}, fused kernels {generator.use_fused}")
    for batch in args.batches:
        rows.append({"engine": "ours bf16", **bench_ours(generator, batch, args.prompt_len, args.new_tokens,
                                                         args.reps)})
        print(f"ours bf16 batch {batch}: {rows[-1]['decode_tok_s']:,.0f} decode tok/s")
    del generator
    torch.cuda.empty_cache()

    bytes_awq = None
    if args.skip_awq:
        notes.append("AWQ column skipped (--skip-awq)")
    else:
        try:
            import mpo.quant.awq_linear  # noqa: F401
        except ImportError as err:
            notes.append(f"AWQ column skipped: mpo.quant.awq_linear not importable ({err})")
        else:
            tick = time.perf_counter()
            count = quantize_rtn(model)
            print(f"quantized {count} decoder linears to int4 (RTN, g128) in {time.perf_counter() - tick:.0f}s")
            bytes_awq = decode_bytes_per_step(model)
            limits["ours AWQ int4"] = bandwidth * 1e9 / bytes_awq
            generator = FastGenerator(model, stop_id=None, max_batch_rows=max(args.batches), max_cached_batches=8)
            for batch in args.batches:
                rows.append({"engine": "ours AWQ int4", **bench_ours(generator, batch, args.prompt_len,
                                                                     args.new_tokens, args.reps)})
                print(f"ours AWQ int4 batch {batch}: {rows[-1]['decode_tok_s']:,.0f} decode tok/s")
    for note in notes:
        print(note)

    print_table(rows, limits)
    print(f"\nweight-read limits at {bandwidth:,.0f} GB/s: bf16 {limits['ours bf16']:,.0f} tok/s "
          f"({bytes_bf16 / 1e9:.2f} GB/step)" + (f", int4 {limits['ours AWQ int4']:,.0f} tok/s "
                                                 f"({bytes_awq / 1e9:.2f} GB/step)" if bytes_awq else ""))
    result = {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "shape": args.shape,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "copy_bandwidth_GBps": bandwidth,
        "decode_bytes_per_step": {"bf16": bytes_bf16, "awq_int4": bytes_awq},
        "batch1_weight_read_limit_tok_s": limits,
        "rows": rows,
        "notes": notes,
        "seconds": time.perf_counter() - started,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out_path} ({result['seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
