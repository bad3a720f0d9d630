"""Structured training config: dataclasses registered with Hydra, validated with errors that name the fix.

Hydra composes `configs/train.yaml` (groups model/, data/, loss/, optim/, deepspeed/, reference/,
logger/, and experiments exp/*.yaml) over the `train_schema` registered here, so a misspelt key or a
wrongly typed value fails at composition. `to_train_config` then builds the dataclasses, whose
`__post_init__` checks the values and collects every problem into one ValueError.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

LLM_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _problems(checks: list[tuple[bool, str]]) -> list[str]:
    return [msg for ok, msg in checks if not ok]


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(LLM_LINEARS))  # LLM linears only


@dataclass
class ModelConfig:
    path: str = MISSING  # native InternVL checkpoint directory
    dtype: str = "bfloat16"  # parameter dtype: bfloat16 | float32 | float16
    attn_implementation: str = "sdpa"
    freeze_vision: bool = False
    freeze_projector: bool = False
    freeze_llm: bool = False
    gradient_checkpointing: bool = True  # ViT and LLM layers
    lora: LoraConfig = field(default_factory=LoraConfig)
    # When path does not exist: write a random tiny checkpoint there (tiny_cpu); image side in px.
    create_tiny_if_missing: bool = False
    tiny_image_size: int = 448


@dataclass
class DataSection:
    path: str = MISSING  # MMPR directory (with meta.json) or the meta.json file
    max_length: int = 8192
    max_dynamic_patch: int = 12
    use_thumbnail: bool = True
    video_frames: int = 8
    system_prompt: str = "default"  # "default" = InternVL2.5's; "" = no system turn; else the text
    num_workers: int = 2
    # Keep every encoded sample in memory after its first use (tokens + fp32 tiles, ~0.6 MB per 224-px
    # tile): for small datasets seen for many epochs, e.g. the demo's SFT (1000 samples, 24 epochs).
    cache_samples: bool = False
    strict: bool = False  # raise at the first bad record instead of counting it
    # When path does not exist: generate the synthetic task there (tiny_cpu).
    create_synthetic_if_missing: bool = False
    synthetic_num_train: int = 64


@dataclass
class LossSection:
    dpo_weight: float = 0.8
    bco_weight: float = 0.2
    sft_weight: float = 1.0
    beta: float = 0.1
    sft_mode: str = "sequence"  # sequence (paper) | token (InternVL / TRL token mean)
    logps_chunk_size: int = 256  # tokens per LM-head chunk


@dataclass
class OptimSection:
    lr: float = 1e-6
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    max_grad_norm: float = 1.0


@dataclass
class DeepSpeedSection:
    zero_stage: int = 1
    offload_optimizer: bool = False


@dataclass
class ReferenceSection:
    strategy: str = "frozen"  # frozen | cached | lora
    path: str | None = None  # reference checkpoint (default: model.path)
    cache_dir: str | None = None  # cached strategy: where log-probs are stored (default: run_dir/../ref_cache)


@dataclass
class LoggerSection:
    wandb: bool = True
    wandb_mode: str = "offline"  # offline | online | disabled
    project: str = "mpo"
    run_name: str | None = None
    log_every: int = 10  # optimizer steps between logged lines (step 1 is always logged)
    progress: bool = True
    peak_tflops: float | None = None  # per device, for MFU; None = guess from the GPU name


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataSection = field(default_factory=DataSection)
    loss: LossSection = field(default_factory=LossSection)
    optim: OptimSection = field(default_factory=OptimSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    reference: ReferenceSection = field(default_factory=ReferenceSection)
    logger: LoggerSection = field(default_factory=LoggerSection)
    name: str = "mpo"
    run_dir: str = MISSING  # set from hydra.run.dir by launch/train.py
    seed: int = 42
    micro_batch_size: int = 1  # pairs per device per micro-step
    global_batch_size: int = 256  # pairs per optimizer step (= micro x accumulation x world)
    num_epochs: float = 1.0
    max_steps: int = -1  # optimizer steps; > 0 overrides num_epochs
    save_every: int = 500  # optimizer steps between checkpoints (and one at the end)
    keep_last: int = 2  # checkpoints kept
    stop_after_steps: int = -1  # stop (no final export) after this step, as if killed: for resume tests
    export_final: bool = True
    device: str = "auto"  # auto | cpu | cuda

    def __post_init__(self):
        m, d, loss, o, r = self.model, self.data, self.loss, self.optim, self.reference
        problems = _problems([
            (m.dtype in ("bfloat16", "float32", "float16", "bf16", "fp32", "fp16"), f"model.dtype={m.dtype!r}: use bfloat16, float32 or float16"),
            (not (m.freeze_llm and m.lora.enabled), "model.freeze_llm and model.lora.enabled conflict: LoRA trains adapters on a frozen LLM already"),
            (not (m.freeze_vision and m.freeze_projector and m.freeze_llm), "everything is frozen: unfreeze something or enable model.lora"),
            (d.max_length >= 2, f"data.max_length={d.max_length} must be >= 2"),
            (d.max_dynamic_patch >= 1, f"data.max_dynamic_patch={d.max_dynamic_patch} must be >= 1"),
            (d.num_workers >= 0, f"data.num_workers={d.num_workers} must be >= 0"),
            (loss.beta > 0, f"loss.beta={loss.beta} must be > 0"),
            (min(loss.dpo_weight, loss.bco_weight, loss.sft_weight) >= 0, "loss weights must be >= 0"),
            (loss.sft_mode in ("sequence", "token"), f"loss.sft_mode={loss.sft_mode!r}: use sequence or token"),
            (loss.logps_chunk_size >= 1, "loss.logps_chunk_size must be >= 1"),
            (o.lr > 0, f"optim.lr={o.lr} must be > 0"),
            (0 <= o.warmup_ratio < 1, f"optim.warmup_ratio={o.warmup_ratio} must be in [0, 1)"),
            (0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]"),
            (o.max_grad_norm >= 0, "optim.max_grad_norm must be >= 0 (0 disables clipping)"),
            (self.deepspeed.zero_stage in (0, 1, 2, 3), f"deepspeed.zero_stage={self.deepspeed.zero_stage}: use 0, 1, 2 or 3"),
            (r.strategy in ("frozen", "cached", "lora"), f"reference.strategy={r.strategy!r}: use frozen, cached or lora"),
            (r.strategy != "lora" or m.lora.enabled, "reference.strategy=lora needs model.lora.enabled=true"),
            (not (m.lora.enabled and self.deepspeed.zero_stage == 3), "LoRA runs with deepspeed.zero_stage 0-2 (adapters are small; ZeRO-3 is for full fine-tuning)"),
            (self.logger.wandb_mode in ("offline", "online", "disabled"), f"logger.wandb_mode={self.logger.wandb_mode!r}"),
            (self.logger.log_every >= 1, "logger.log_every must be >= 1"),
            (self.micro_batch_size >= 1, "micro_batch_size must be >= 1"),
            (self.global_batch_size >= self.micro_batch_size, "global_batch_size must be >= micro_batch_size"),
            (self.num_epochs > 0 or self.max_steps > 0, "set num_epochs > 0 or max_steps > 0"),
            (self.save_every >= 1 and self.keep_last >= 1, "save_every and keep_last must be >= 1"),
            (self.device in ("auto", "cpu", "cuda"), f"device={self.device!r}: use auto, cpu or cuda"),
        ])
        if problems:
            raise ValueError("invalid training config:\n  - " + "\n  - ".join(problems))

    def gradient_accumulation(self, world_size: int) -> int:
        """Micro-steps per optimizer step on each rank; the global batch must divide evenly."""
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size={self.global_batch_size} is not divisible by micro_batch_size x world_size = "
                f"{self.micro_batch_size} x {world_size}; change one of them"
            )
        return self.global_batch_size // per_step


def register_configs() -> None:
    """Register the schema so `configs/train.yaml` can extend it (`defaults: [train_schema, ...]`)."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def to_train_config(cfg: DictConfig) -> TrainConfig:
    """Resolve a composed Hydra config into validated dataclasses."""
    obj = OmegaConf.to_object(cfg)
    if not isinstance(obj, TrainConfig):  # composed without the schema: build it explicitly
        obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg))
    return obj
