"""Distributed setup, model preparation (freezing, LoRA, checkpointing), optimizer, schedule, DeepSpeed.

Single-process runs (plain `python launch/train.py`) get a one-rank process group, so the same
DeepSpeed path serves 1 CPU and N GPUs. Under `srun` (one task per GPU, no torchrun) the ranks come
from SLURM's environment (`slurm_dist_env`).
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from mpo.config import TrainConfig
from mpo.model.load import resolve_dtype
from mpo.train.policy import PreferenceLogps


@dataclass
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scontrol_hostnames(nodelist: str) -> list[str]:
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()


def slurm_dist_env(environ: Mapping[str, str],
                   expand_nodelist: Callable[[str], list[str]] = _scontrol_hostnames) -> dict[str, str]:
    """torch.distributed variables for a process started by `srun` (one task per GPU, no torchrun).

    Returns {} when RANK is already set (torchrun, or a caller), when the step has one task (the
    one-process group with a free port serves it), or when this process is not a task of an srun
    step: a batch script's own shell has SLURM_PROCID=0 and the allocation's SLURM_NTASKS, but no
    SLURM_STEP_ID, and deriving WORLD_SIZE there would wait forever for ranks never started.
    Otherwise RANK/WORLD_SIZE/LOCAL_RANK come from SLURM_PROCID, the step's task count
    (SLURM_STEP_NUM_TASKS, else SLURM_NTASKS) and SLURM_LOCALID; MASTER_ADDR (unless set) is
    127.0.0.1 on a one-node job, else the first host of SLURM_JOB_NODELIST as `expand_nodelist`
    (default `scontrol show hostnames`) lists it; MASTER_PORT (unless set) is 20000 + job id % 20000,
    the same on every rank without communication, and different for jobs sharing a node.
    """
    if "RANK" in environ or "SLURM_PROCID" not in environ or "SLURM_STEP_ID" not in environ:
        return {}
    num_tasks = environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS")
    if not num_tasks or int(num_tasks) == 1:
        return {}
    rank, world_size = int(environ["SLURM_PROCID"]), int(num_tasks)
    if not 0 <= rank < world_size:
        raise ValueError(f"SLURM_PROCID={rank} is outside the step's {world_size} tasks; launch one task per GPU with srun")
    out = {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": environ.get("SLURM_LOCALID", "0")}
    if "MASTER_ADDR" in environ:
        out["MASTER_ADDR"] = environ["MASTER_ADDR"]
    elif environ.get("SLURM_JOB_NUM_NODES", environ.get("SLURM_NNODES")) == "1":
        out["MASTER_ADDR"] = "127.0.0.1"  # all ranks are local: no name resolution needed (containers)
    else:
        nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
        if not nodelist:
            raise ValueError("SLURM_JOB_NODELIST is not set: set MASTER_ADDR to the first node's address")
        out["MASTER_ADDR"] = expand_nodelist(nodelist)[0]
    if "MASTER_PORT" in environ:
        out["MASTER_PORT"] = environ["MASTER_PORT"]
    else:
        job_id = environ.get("SLURM_JOB_ID", "")
        if not job_id.isdigit():
            raise ValueError(f"SLURM_JOB_ID={job_id!r} is not a number: set MASTER_PORT for the process group")
        out["MASTER_PORT"] = str(20000 + int(job_id) % 20000)
    return out


def init_distributed(device_pref: str = "auto") -> DistEnv:
    """Initialise torch.distributed for DeepSpeed (NCCL on GPU, gloo on CPU)."""
    use_cuda = torch.cuda.is_available() and device_pref != "cpu"
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA device is visible; use device=cpu or auto")
    if not use_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.update(slurm_dist_env(os.environ))  # srun tasks: ranks from SLURM (no-op otherwise)
    if "RANK" not in os.environ:  # plain `python launch/train.py`: a one-process group
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    import deepspeed

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo", auto_mpi_discovery=False)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return DistEnv(torch.distributed.get_rank(), local_rank, torch.distributed.get_world_size(), device)


def prepare_model(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """Apply freeze flags, gradient checkpointing and (optionally) LoRA on the LLM's linears."""
    m = cfg.model
    inner = model.model
    for module, frozen in ((inner.vision_tower, m.freeze_vision), (inner.multi_modal_projector, m.freeze_projector),
                           (inner.language_model, m.freeze_llm), (model.lm_head, m.freeze_llm)):
        for p in module.parameters():
            p.requires_grad_(not frozen)
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if m.lora.enabled:
        from peft import LoraConfig, get_peft_model

        # regex: only the LLM's linears (the vision tower has q/k/v_proj too)
        targets = r".*language_model.*\.(" + "|".join(m.lora.target_modules) + r")$"
        model = get_peft_model(model, LoraConfig(r=m.lora.r, lora_alpha=m.lora.alpha, lora_dropout=m.lora.dropout,
                                                 target_modules=targets, bias="none"))
    return model


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms, embeddings' position tables and layer scales."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "position_embeddings" in name or "cls_token" in name or "lambda_" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    if not decay and not no_decay:
        raise ValueError("no trainable parameters: check the freeze flags")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]  # DeepSpeed drops empty groups; the schedule must match


def cosine_with_warmup(total_steps: int, warmup_ratio: float, min_lr_ratio: float):
    """LR multiplier per optimizer step: linear warmup, then cosine down to min_lr_ratio."""
    warmup = math.ceil(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def deepspeed_config(cfg: TrainConfig, world_size: int, use_cuda: bool) -> dict:
    """DeepSpeed config dict from the training config (bf16 on GPU when the model dtype asks for it)."""
    accumulation = cfg.gradient_accumulation(world_size)
    dtype = resolve_dtype(cfg.model.dtype)
    zero = {"stage": cfg.deepspeed.zero_stage, "overlap_comm": use_cuda, "contiguous_gradients": True,
            "reduce_bucket_size": 5e7, "stage3_gather_16bit_weights_on_model_save": True}
    if cfg.deepspeed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_cuda}
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": cfg.micro_batch_size * accumulation * world_size,
        "gradient_clipping": cfg.optim.max_grad_norm,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }


def build_engine(model: nn.Module, cfg: TrainConfig, total_steps: int, env: DistEnv):
    """Wrap `model` (as `PreferenceLogps`) with DeepSpeed, AdamW and the cosine schedule. Returns the engine."""
    import deepspeed

    o = cfg.optim
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(total_steps, o.warmup_ratio, o.min_lr_ratio))
    ds_config = deepspeed_config(cfg, env.world_size, env.device.type == "cuda")
    engine, _, _, _ = deepspeed.initialize(model=PreferenceLogps(model), optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    return engine


def reference_engine(model: nn.Module, cfg: TrainConfig, env: DistEnv):
    """A frozen reference: partitioned by a DeepSpeed inference engine under ZeRO-3, else a plain replica."""
    model.to(env.device)
    if cfg.deepspeed.zero_stage != 3:
        return model
    import deepspeed

    ds_config = deepspeed_config(cfg, env.world_size, env.device.type == "cuda")
    ds_config["zero_optimization"] = {"stage": 3, "stage3_param_persistence_threshold": 1e4}
    engine, *_ = deepspeed.initialize(model=PreferenceLogps(model), config=ds_config)
    engine.eval()
    return engine
