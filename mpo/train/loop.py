"""The MPO training loop: policy forward → reference log-probs → MPO loss → DeepSpeed step.

    torchrun --nproc_per_node 8 launch/train.py +exp=4b_mpo
    python launch/train.py +exp=tiny_cpu hydra.run.dir=runs/tiny

Per micro-step: the policy's summed response log-probs (vision tower once per pair, chunked LM head),
the reference's (frozen copy, on-disk cache, or adapters disabled), the reward shift δ updated with
this batch's rewards summed across ranks (one all-reduce), then the weighted DPO + BCO + SFT loss.
Metrics stay on device and are reduced once per logging interval. A stop signal from SLURM (SIGTERM,
SIGUSR1/2) ends the run after the current optimizer step with a checkpoint and a requeue (preempt.py).
"""

from __future__ import annotations

import json
import math
import random
import signal
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from mpo.config import TrainConfig
from mpo.data.dataset import DataConfig, MMPRDataset
from mpo.data.rejects import RejectLog
from mpo.data.template import ChatTemplate
from mpo.losses import MPOLossConfig, RewardShift, generation_only_loss, mpo_loss, reward_stats
from mpo.model.load import load_model, load_processor, resolve_dtype
from mpo.model.tokenizer import INTERNVL25_SYSTEM_PROMPT
from mpo.train import checkpoint as ckpt
from mpo.train import preempt
from mpo.train.assets import ensure_assets
from mpo.train.data import PairBatches, rejects_path
from mpo.train.engine import build_engine, init_distributed, prepare_model, reference_engine
from mpo.train.metrics import MetricAccumulator, MetricsWriter, Throughput, guess_peak_tflops, peak_memory_gib, plot_curves, truncate_metrics
from mpo.train.policy import batch_logps, chosen_logps
from mpo.train.reference import CachedReference, FrozenReference, LoraReference, cache_fingerprint, compute_reference_table, load_or_compute_cache


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def system_prompt(setting: str) -> str | None:
    return INTERNVL25_SYSTEM_PROMPT if setting == "default" else (setting or None)


def build_dataset(cfg: TrainConfig, processor, tokens_per_tile: int, tile_size: int, rank: int, run_dir: Path) -> MMPRDataset:
    d = cfg.data
    template = ChatTemplate(processor.tokenizer, tokens_per_tile=tokens_per_tile, system_prompt=system_prompt(d.system_prompt))
    data_cfg = DataConfig(max_length=d.max_length, max_dynamic_patch=d.max_dynamic_patch, use_thumbnail=d.use_thumbnail,
                          tile_size=tile_size, video_frames=d.video_frames)
    # every rank scans the same files; only rank 0 writes scan-time rejects
    scan_log = RejectLog(run_dir / "rejects_scan.jsonl" if rank == 0 else None, strict=d.strict)
    dataset = MMPRDataset(d.path, template, data_cfg, rejects=scan_log, seed=cfg.seed, cache=d.cache_samples)
    scan_log.close()
    if len(dataset) == 0:
        raise ValueError(f"no usable record in {d.path}; run: python -m mpo.data.validate {d.path}")
    return dataset


def build_reference(cfg: TrainConfig, policy, dataset: MMPRDataset, env, dtype, run_dir: Path):
    r, chunk = cfg.reference, cfg.loss.logps_chunk_size
    if r.strategy == "lora":
        return LoraReference(policy, chunk_size=chunk)
    ref_path = r.path or cfg.model.path

    def frozen() -> FrozenReference:
        model = load_model(ref_path, dtype=dtype, attn_implementation=cfg.model.attn_implementation)
        return FrozenReference(reference_engine(model, cfg, env), chunk_size=chunk)

    if r.strategy == "frozen":
        return frozen()
    extra = {"max_length": cfg.data.max_length, "max_dynamic_patch": cfg.data.max_dynamic_patch,
             "thumbnail": cfg.data.use_thumbnail, "system": cfg.data.system_prompt, "dtype": str(dtype), "seed": cfg.seed}
    key = cache_fingerprint(ref_path, dataset, extra)
    cache_dir = Path(r.cache_dir) if r.cache_dir else run_dir.parent / "ref_cache"
    path = cache_dir / f"ref_logps-{key}.pt"
    _barrier()

    def compute():
        ref = frozen()
        table = compute_reference_table(ref, dataset, rank=env.rank, world_size=env.world_size, device=env.device, dtype=dtype)
        del ref
        return table

    chosen, rejected, hit = load_or_compute_cache(path, compute, rank=env.rank)
    _barrier()
    if env.rank == 0:
        print(f"[mpo] reference log-probs {'loaded from' if hit else 'cached to'} {path}", flush=True)
    return CachedReference(chosen, rejected)


def total_optimizer_steps(cfg: TrainConfig, num_items: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.num_epochs * num_items / cfg.global_batch_size))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) a training run in `cfg.run_dir`; returns a summary dict.

    On SIGTERM/SIGUSR1/SIGUSR2 the run saves a checkpoint after the current optimizer step and
    stops; rank 0 then requeues the SLURM job (see mpo/train/preempt.py) and the summary says
    "preempted". Where the job is not requeued (not under SLURM, or cancelled), rank 0 exits with
    SystemExit and a message saying how to resume.
    """
    stop_flag = preempt.PreemptionFlag().install()  # before DataLoader workers fork: they inherit it
    try:
        return _train(cfg, stop_flag)
    finally:
        stop_flag.uninstall()


def _train(cfg: TrainConfig, stop_flag: preempt.PreemptionFlag) -> dict:
    env = init_distributed(cfg.device)
    run_dir = Path(cfg.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = run_dir / "checkpoints"
    if env.rank == 0:
        ensure_assets(cfg)
        ckpt_dir.mkdir(exist_ok=True)
        (run_dir / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2, default=str) + "\n")
    _barrier()
    seed_everything(cfg.seed + env.rank)

    dtype = resolve_dtype(cfg.model.dtype)
    processor = load_processor(cfg.model.path)
    model = load_model(cfg.model.path, dtype=dtype, attn_implementation=cfg.model.attn_implementation)
    tile = model.config.vision_config.image_size[0]
    dataset = build_dataset(cfg, processor, model.config.image_seq_length, tile, env.rank, run_dir)
    total_steps = total_optimizer_steps(cfg, len(dataset))
    accumulation = cfg.gradient_accumulation(env.world_size)
    num_params = sum(p.numel() for p in model.parameters())

    model = prepare_model(model, cfg)
    # SFT only (dpo_weight = bco_weight = 0): the loss needs neither the rejected responses nor the
    # reference, so both are skipped (a third of the forward work; mpo_loss's own SFT term is the twin).
    sft_only = cfg.loss.dpo_weight == 0 and cfg.loss.bco_weight == 0
    if sft_only and env.rank == 0:
        print("[mpo] SFT only (dpo_weight = bco_weight = 0): no reference model, chosen responses only", flush=True)
    reference = None
    if not sft_only and cfg.reference.strategy != "lora":
        reference = build_reference(cfg, model, dataset, env, dtype, run_dir)
    engine = build_engine(model, cfg, total_steps, env)
    if not sft_only and reference is None:
        reference = build_reference(cfg, engine.module.model, dataset, env, dtype, run_dir)

    shift, step, position = RewardShift(), 0, 0
    state = ckpt.load_checkpoint(engine, ckpt_dir)
    if state is not None:
        step = state["step"]
        shift.load_state_dict(state["reward_shift"])
        position = state["data_positions"][env.rank]
        ckpt.set_rng_state(state["rng"][env.rank])
        if env.rank == 0:
            truncate_metrics(run_dir / "metrics.jsonl", step)
            print(f"[mpo] resumed from {ckpt.latest_tag(ckpt_dir)} (step {step}, delta {shift.mean:.6f})", flush=True)
    elif env.rank == 0:
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)

    loss_cfg = MPOLossConfig(dpo_weight=cfg.loss.dpo_weight, bco_weight=cfg.loss.bco_weight,
                             sft_weight=cfg.loss.sft_weight, beta=cfg.loss.beta, sft_mode=cfg.loss.sft_mode)
    batches = PairBatches(dataset, micro_batch_size=cfg.micro_batch_size, seed=cfg.seed, rank=env.rank,
                          world_size=env.world_size, start=position, num_workers=cfg.data.num_workers,
                          rejects=RejectLog(rejects_path(run_dir, env.rank), strict=cfg.data.strict, append=state is not None))
    writer = None
    if env.rank == 0:
        writer = MetricsWriter(run_dir, total_steps=total_steps, start_step=step, config=asdict(cfg),
                               use_wandb=cfg.logger.wandb, wandb_mode=cfg.logger.wandb_mode, project=cfg.logger.project,
                               run_name=cfg.logger.run_name or cfg.name, progress=cfg.logger.progress)
    acc = MetricAccumulator()
    rates = Throughput(num_params, cfg.logger.peak_tflops or guess_peak_tflops(), env.world_size)
    engine.train()
    stopped_early = preempted = False
    while step < total_steps:
        for _ in range(accumulation):
            batch = batches.next()
            if sft_only:
                batch = batch.chosen_only().to(env.device, dtype)
                chosen, chosen_tokens = chosen_logps(engine, batch, chunk_size=cfg.loss.logps_chunk_size)
                loss, metrics = generation_only_loss(chosen, chosen_tokens, loss_cfg)
            else:
                batch = batch.to(env.device, dtype)
                chosen, rejected, chosen_tokens, _ = batch_logps(engine, batch, chunk_size=cfg.loss.logps_chunk_size)
                ref_chosen, ref_rejected = reference.logps(batch)
                # δ folds in this batch's rewards summed over all ranks (one all-reduce of two numbers)
                reward_sum, count = reward_stats(chosen, rejected, ref_chosen, ref_rejected, cfg.loss.beta)
                packed = torch.stack([reward_sum, count]).to(env.device)
                if env.world_size > 1:
                    dist.all_reduce(packed)
                shift.update(packed[0], packed[1])
                loss, metrics = mpo_loss(chosen, rejected, ref_chosen, ref_rejected, chosen_tokens, shift.mean,
                                         loss_cfg)
            engine.backward(loss)
            engine.step()
            acc.add(metrics, num_pairs=batch.num_pairs, num_tokens=batch.num_tokens)
        step += 1
        if step == 1 or step % cfg.logger.log_every == 0 or step == total_steps:
            logged = acc.reduce(env.world_size)
            if writer is not None:
                grad_norm = engine.get_global_grad_norm()
                logged.update(rates.rates(logged.pop("num_pairs"), logged.pop("num_tokens")))
                logged.update(lr=engine.get_lr()[0], grad_norm=None if grad_norm is None else float(grad_norm),
                              peak_mem_gib=peak_memory_gib(), delta=shift.mean,
                              rejected_records=batches.rejects.total)
                writer.write(step, logged)
        if writer is not None:
            writer.advance()
        preempted = step < total_steps and stop_flag.agreed(env.world_size, env.device)  # one tiny all-reduce
        if step % cfg.save_every == 0 or step == total_steps or preempted:
            client = {"step": step, "reward_shift": shift.state_dict(),
                      "data_positions": ckpt.gather_objects(batches.position, env.world_size),
                      "rng": ckpt.gather_objects(ckpt.rng_state(), env.world_size)}
            ckpt.save_checkpoint(engine, ckpt_dir, step, client, rank=env.rank, keep_last=cfg.keep_last)
        if preempted or (cfg.stop_after_steps > 0 and step >= cfg.stop_after_steps and step < total_steps):
            stopped_early = True
            break
    batches.rejects.close()
    if writer is not None:
        writer.close()
    final = None
    if not stopped_early and cfg.export_final:
        final = ckpt.export_hf(engine, processor, run_dir / "final", zero_stage=cfg.deepspeed.zero_stage,
                               rank=env.rank, lora=cfg.model.lora.enabled)
        if env.rank == 0:
            plot_curves(run_dir / "metrics.jsonl", run_dir / "loss_curve.png")
    _barrier()
    if preempted and env.rank == 0:  # last: SLURM kills the job soon after a requeue
        print(f"[mpo] preempted: saved checkpoint {ckpt.step_tag(step)}", flush=True)
        outcome = preempt.requeue_after_checkpoint(stop_flag)
        if outcome not in ("requeued", "already_requeued"):
            cause = signal.Signals(stop_flag.signum).name if stop_flag.is_set else "a stop signal to another rank"
            sys.exit(f"[mpo] stopped at step {step} by {cause}; checkpoint saved in {ckpt_dir}; "
                     f"not requeued ({outcome}): run the same command again to resume")
    return {"step": step, "total_steps": total_steps, "delta": shift.mean, "final": str(final) if final else None,
            "stopped_early": stopped_early, "preempted": preempted}
