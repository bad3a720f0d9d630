"""Freeze flags, LoRA placement and optimizer groups of the trainer's model preparation."""

from __future__ import annotations

import pytest

from mpo.config import DataSection, LoraConfig, ModelConfig, TrainConfig
from mpo.model.load import load_model
from mpo.train.engine import param_groups, prepare_model


def cfg(**model_kw) -> TrainConfig:
    lora = model_kw.pop("lora", LoraConfig())
    return TrainConfig(model=ModelConfig(path="-", gradient_checkpointing=False, lora=lora, **model_kw),
                       data=DataSection(path="-"), run_dir="-")


def trainable(model, prefix):
    return {p.requires_grad for n, p in model.named_parameters() if prefix in n}


@pytest.mark.parametrize("flag,frozen", [("freeze_vision", "vision_tower"), ("freeze_projector", "multi_modal_projector"),
                                         ("freeze_llm", "language_model")])
def test_freeze_flags(tiny_model_dir, flag, frozen):
    model = prepare_model(load_model(tiny_model_dir, dtype="float32"), cfg(**{flag: True}))
    assert trainable(model, frozen) == {False}
    for other in {"vision_tower", "multi_modal_projector", "language_model"} - {frozen}:
        assert trainable(model, other) == {True}
    assert trainable(model, "lm_head") == ({False} if flag == "freeze_llm" else {True})


def test_lora_only_on_llm_linears(tiny_model_dir):
    model = prepare_model(load_model(tiny_model_dir, dtype="float32"), cfg(lora=LoraConfig(enabled=True, r=4)))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n and "language_model" in n for n in names)
    groups = param_groups(model, 0.05)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.05  # LoRA matrices are 2-D: no empty group


def test_param_groups_exclude_norms_and_biases(tiny_model_dir):
    model = load_model(tiny_model_dir, dtype="float32")
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"])
    n_decay = sum(p.numel() for p in decay["params"]) + sum(p.numel() for p in no_decay["params"])
    assert n_decay == sum(p.numel() for p in model.parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(model, 0.1)
