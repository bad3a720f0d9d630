"""MPO training steps on the InternVL2.5-4B shape with random weights: pairs/s, tokens/s, peak memory.

    python bench/bench_train.py --out $OUT/bench_train_1gpu.json                       # one GPU, ZeRO-2
    torchrun --nproc_per_node 2 bench/bench_train.py --zero 3 --out $OUT/bench_train_2gpu.json

One pair per GPU per step: one image of 7 tiles (1,792 image tokens), a 64-token prompt, chosen and
rejected of ~300 tokens (REFERENCE.md §9's setting). The full step is timed: policy forward and
backward, frozen reference forward, MPO loss, DeepSpeed optimizer step (AdamW, bf16, gradient
checkpointing on, as in the recipe). Two layouts run side by side in the same process:

- `mpo`: our path (vision tower once per pair, chunked LM head over response tokens only).
- `peer_layout`: what TRL / InternVL's trainer do: the image encoded for each sequence (chosen and
  rejected rows each carry their tiles), full-vocabulary logits, log-softmax over the whole sequence.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from mpo.config import DataSection, DeepSpeedSection, ModelConfig, OptimSection, TrainConfig  # noqa: E402
from mpo.data.collate import collate_pairs  # noqa: E402
from mpo.data.dataset import PreferenceSample  # noqa: E402
from mpo.losses import MPOLossConfig, mpo_loss  # noqa: E402
from mpo.model.shapes import SHAPES, internvl_config  # noqa: E402
from mpo.train.engine import build_engine, init_distributed, prepare_model, reference_engine  # noqa: E402
from mpo.train.logps import naive_sequence_logps  # noqa: E402
from mpo.train.policy import batch_logps, unwrap_internvl  # noqa: E402

IMAGE_TOKEN = 151667


def random_model(seed: int, shape: str, device: torch.device):
    from transformers import InternVLForConditionalGeneration

    config = internvl_config(shape, image_token_id=IMAGE_TOKEN, pad_token_id=151643, eos_token_id=151645,
                             vocab_size=151674)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = InternVLForConditionalGeneration(config)
    model = model.to_empty(device=device).to(torch.bfloat16)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.02, generator=gen)
            elif "norm" in name or "lambda" in name:
                p.fill_(1.0 if "norm" in name else 0.1)
            else:
                p.zero_()
    return model


def synthetic_pair(seed: int, shape: str, tiles: int = 7, prompt: int = 64, response: int = 300) -> PreferenceSample:
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(1000, 150000, (n,), generator=g).tolist()  # noqa: E731
    tpt = SHAPES[shape].tokens_per_tile
    prompt_ids = ids(prompt // 2) + [151665] + [IMAGE_TOKEN] * (tiles * tpt) + [151666] + ids(prompt // 2)
    return PreferenceSample(prompt_ids=prompt_ids, chosen_ids=ids(response) + [151645],
                            rejected_ids=ids(response - 20) + [151645],
                            pixel_values=torch.randn(tiles, 3, 448, 448, generator=g), num_image_tokens=tiles * tpt,
                            source="bench", file="-", line=0, index=seed)


def peer_logps(model, batch):
    """The peers' layout: every row carries its own tiles; full logits; full-sequence log-softmax."""
    internvl = unwrap_internvl(model)
    pixels = torch.cat([batch.pixel_values, batch.pixel_values])  # chosen rows' tiles, then rejected rows'
    out = internvl(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=pixels, use_cache=False)
    logps, tokens = naive_sequence_logps(out.logits[:, :-1], batch.labels[:, 1:])
    b = batch.num_pairs
    return logps[:b], logps[b:], tokens[:b]


def run_layout(name, engine, ref, samples, loss_cfg, env, steps, warmup):
    times, tokens = [], 0
    cuda = env.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        batch = collate_pairs([samples[(i * env.world_size + env.rank) % len(samples)]], 0).to(env.device, torch.bfloat16)
        sync()
        t0 = time.perf_counter()
        if name == "mpo":
            c, r, nc, _ = batch_logps(engine, batch, chunk_size=256)
            with torch.no_grad():
                rc, rr, _, _ = batch_logps(ref, batch, chunk_size=256)
        else:
            c, r, nc = peer_logps(engine, batch)
            with torch.no_grad():
                rc, rr, _ = peer_logps(ref, batch)
        loss, _ = mpo_loss(c, r, rc.float(), rr.float(), nc, 0.0, loss_cfg)
        engine.backward(loss)
        engine.step()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            tokens += batch.num_tokens
    step_s = statistics.median(times)
    per_gpu_tokens = tokens / steps
    return {"layout": name, "median_step_s": step_s, "pairs_per_s": env.world_size / step_s,
            "tokens_per_s": env.world_size * per_gpu_tokens / step_s, "tokens_per_pair": per_gpu_tokens,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None, "step_times_s": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zero", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--layout", default="mpo", choices=["mpo", "peer_layout"],
                        help="one layout per process, so the other's memory cannot linger")
    parser.add_argument("--shape", default="4b", help="model shape (tiny: a CPU smoke run with --device cpu)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench_train.json"))
    args = parser.parse_args()
    env = init_distributed(args.device)
    cfg = TrainConfig(model=ModelConfig(path="random-4b", gradient_checkpointing=True), data=DataSection(path="-"),
                      optim=OptimSection(lr=1e-6), deepspeed=DeepSpeedSection(zero_stage=args.zero),
                      run_dir="-", micro_batch_size=1, global_batch_size=env.world_size, max_steps=100)
    loss_cfg = MPOLossConfig()
    tiles = 7 if args.shape != "tiny" else 1
    samples = [synthetic_pair(i, args.shape, tiles=tiles) for i in range(8)]
    policy = prepare_model(random_model(0, args.shape, env.device), cfg)
    ref = reference_engine(random_model(0, args.shape, env.device), cfg, env)
    ref.eval()
    engine = build_engine(policy, cfg, total_steps=100, env=env)
    res = run_layout(args.layout, engine, ref, samples, loss_cfg, env, args.steps, args.warmup)
    res.update(zero_stage=args.zero, world_size=env.world_size, shape=args.shape,
               gpu=torch.cuda.get_device_name() if env.device.type == "cuda" else "cpu")
    if dist.is_initialized():
        dist.barrier()
    if env.rank == 0:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
        mem = "-" if res["peak_mem_gib"] is None else f"{res['peak_mem_gib']:.1f}"
        print(f"RESULT {res['layout']:<12} gpus={res['world_size']} zero={res['zero_stage']} "
              f"step_s={res['median_step_s']:.3f} pairs/s={res['pairs_per_s']:.2f} "
              f"tokens/s={res['tokens_per_s']:.0f} peak_gib={mem}")


if __name__ == "__main__":
    main()
