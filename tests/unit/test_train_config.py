"""Every shipped config composes; validation names the problem; DeepSpeed config and schedule."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mpo.config import TrainConfig, register_configs, to_train_config
from mpo.train.engine import cosine_with_warmup, deepspeed_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
EXPS = sorted(p.stem for p in (CONFIGS / "exp").glob("*.yaml"))
GROUPS = {g.name: sorted(p.stem for p in g.glob("*.yaml")) for g in CONFIGS.iterdir() if g.is_dir() and g.name != "exp"}
PATHS = ["model.path=/m", "data.path=/d"]

register_configs()


def build(overrides):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*overrides, "run_dir=/r"])
    return to_train_config(cfg)


def test_expected_experiments_shipped():
    assert {"tiny_cpu", "1b_mpo", "4b_mpo", "8b_mpo"} <= set(EXPS)


@pytest.mark.parametrize("exp", EXPS)
def test_every_experiment_composes(exp):
    cfg = build([f"+exp={exp}", *PATHS])
    assert isinstance(cfg, TrainConfig) and cfg.name == exp


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_group_option_composes(group, option):
    extra = ["model.lora.enabled=true"] if (group, option) == ("reference", "lora") else []
    if (group, option) in (("deepspeed", "zero3"), ("deepspeed", "zero3_offload")):
        extra = []
    build([f"{group}={option}", *PATHS, *extra])


def test_4b_recipe_values():
    cfg = build(["+exp=4b_mpo", *PATHS])
    assert (cfg.loss.dpo_weight, cfg.loss.bco_weight, cfg.loss.sft_weight, cfg.loss.beta) == (0.8, 0.2, 1.0, 0.1)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.warmup_ratio) == (1e-6, 0.05, 0.03)
    assert (cfg.global_batch_size, cfg.micro_batch_size, cfg.num_epochs) == (256, 1, 1)
    assert (cfg.data.max_length, cfg.data.max_dynamic_patch, cfg.data.use_thumbnail) == (8192, 12, True)
    assert cfg.deepspeed.zero_stage == 1 and cfg.model.dtype == "bfloat16" and cfg.model.gradient_checkpointing
    assert not (cfg.model.freeze_vision or cfg.model.freeze_projector or cfg.model.freeze_llm)
    assert cfg.gradient_accumulation(8) == 32


def test_errors_are_clear():
    with pytest.raises(ValueError) as err:
        build(["+exp=tiny_cpu", "loss.beta=-1", "optim.lr=0", "reference=lora"])
    msg = str(err.value)
    assert "loss.beta=-1" in msg and "optim.lr=0" in msg and "model.lora.enabled" in msg
    with pytest.raises(Exception, match="not_a_key"):
        build(["+exp=tiny_cpu", "loss.not_a_key=1"])  # a typo fails loudly
    with pytest.raises(Exception):
        build(["+exp=tiny_cpu", "loss.beta=abc"])  # wrong type fails at composition
    cfg = build(["+exp=tiny_cpu"])
    with pytest.raises(ValueError, match="not divisible"):
        cfg.gradient_accumulation(3)
    with pytest.raises(Exception, match="missing mandatory value"):
        OmegaConf.to_object(OmegaConf.structured(TrainConfig))  # required paths


def test_deepspeed_config_and_schedule():
    cfg = build(["+exp=4b_mpo", *PATHS, "deepspeed=zero3_offload"])
    ds = deepspeed_config(cfg, world_size=8, use_cuda=True)
    assert ds["train_batch_size"] == 256 and ds["gradient_accumulation_steps"] == 32
    assert ds["bf16"]["enabled"] and ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    f = cosine_with_warmup(100, 0.1, 0.0)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)
