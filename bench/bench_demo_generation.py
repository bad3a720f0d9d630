"""The demo's generation workloads with one prompt per prefill against prompts prefilled together.

    python bench/bench_demo_generation.py MODEL_DIR QUESTIONS.jsonl IMAGE_ROOT [--num-questions 640] [--out F]

MODEL_DIR is a demo model (normally the SFT model of an `mpo demo` run, so answers stop as trained),
QUESTIONS.jsonl the demo's build questions (``task/questions/build_demo.jsonl``), IMAGE_ROOT the
task folder. Two workloads, each timed with `FastGenerator(prefill_prompts=1)` (the engine before
batched prefill) and with `prefill_prompts=32` (the CUDA default), in one run:

- pairs: calls of 32 questions x 8 samples at temperature 0.7 (what `mpo.build_pairs` does);
- eval: calls of 128 questions, greedy (what `mpo.evaluate` does in the demo).

Each variant runs once untimed (Triton compilation, graph capture), then timed. Prints a table and
writes JSON (also the share of samples whose tokens are identical between the two variants: on a GPU
batched GEMMs round differently, so a few sampled answers may diverge).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from data_pipeline.prompts import build_cot_prompt  # noqa: E402
from mpo.infer.engine import Engine, Request, SamplingParams  # noqa: E402
from mpo.infer.fast import FastGenerator  # noqa: E402

WORKLOADS = {  # name: (questions per call, sampling)
    "pairs": (32, SamplingParams(max_new_tokens=128, temperature=0.7, num_samples=8, seed=0)),
    "eval": (128, SamplingParams(max_new_tokens=128)),
}


def run(engine: Engine, requests: list[Request], per_call: int, params: SamplingParams) -> tuple[float, list]:
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = []
    for i in range(0, len(requests), per_call):
        out += engine.generate(requests[i:i + per_call], params)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, [[g.token_ids for g in samples] for samples in out]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("questions")
    parser.add_argument("image_root")
    parser.add_argument("--num-questions", type=int, default=640)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench_demo_generation.json"))
    args = parser.parse_args()

    engine = Engine.load(args.model, device=args.device, system_prompt=None, max_batch_rows=256)
    records = [json.loads(line) for line in Path(args.questions).read_text().splitlines()][:args.num_questions]
    requests = [Request(build_cot_prompt(r["question"]), images=[str(Path(args.image_root) / r["image"])],
                        max_dynamic_patch=1, seed=i) for i, r in enumerate(records)]
    variants = {"one_prompt_per_prefill": 1, "batched_prefill": 32}  # 32: the CUDA default
    results = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
               "model": args.model, "num_questions": len(requests), "workloads": {}}
    for name, (per_call, params) in WORKLOADS.items():
        row, tokens = {}, {}
        for variant, prompts in variants.items():
            engine.generator = FastGenerator(engine.model, stop_id=engine.stop_id, max_batch_rows=256,
                                             prefill_prompts=prompts)
            run(engine, requests[:per_call], per_call, params)  # warm-up: compile, capture
            stats_before = vars(engine.generator.stats).copy()
            seconds, tokens[variant] = run(engine, requests, per_call, params)
            stats = {k: v - stats_before[k] for k, v in vars(engine.generator.stats).items()}
            row[variant] = {"seconds": round(seconds, 3), "questions_per_s": round(len(requests) / seconds, 1),
                            "prefill_batches": stats["num_prefill_batches"], "prefills": stats["num_prefills"],
                            "decode_steps": stats["num_decode_steps"], "tokens": stats["num_generated_tokens"]}
        a, b = tokens.values()
        same = sum(x == y for sa, sb in zip(a, b) for x, y in zip(sa, sb))
        row["identical_samples"] = round(same / sum(len(s) for s in a), 4)
        row["speedup"] = round(row["one_prompt_per_prefill"]["seconds"] / row["batched_prefill"]["seconds"], 2)
        results["workloads"][name] = row
    print(f"{'workload':<8} {'variant':<24} {'s':>8} {'q/s':>8} {'prefill calls':>14} {'decode steps':>13}")
    for name, row in results["workloads"].items():
        for variant in variants:
            r = row[variant]
            print(f"{name:<8} {variant:<24} {r['seconds']:>8.2f} {r['questions_per_s']:>8.1f} "
                  f"{r['prefill_batches']:>14} {r['decode_steps']:>13}")
        print(f"{name:<8} speedup {row['speedup']}x, identical samples {row['identical_samples']:.1%}")
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
