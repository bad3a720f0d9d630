"""The demo report's figures: SFT loss, MPO curves and held-out accuracy per stage (PNG, no display needed)."""

from __future__ import annotations

from pathlib import Path

# The object-oriented API draws without pyplot, so no global backend switch and no display needed.
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["plot_accuracy", "plot_mpo", "plot_sft"]


def plot_sft(rows: list[dict], path: Path) -> None:
    """SFT loss per logged step (rows of the trainer's metrics.jsonl)."""
    fig = Figure(figsize=(5, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot([r["step"] for r in rows], [r.get("loss_sft") for r in rows])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("NLL per response token")
    ax.set_title("SFT loss")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_mpo(rows: list[dict], path: Path) -> None:
    """MPO losses, implicit rewards and reward accuracy per logged step."""
    fig = Figure(figsize=(13, 3.8))
    FigureCanvasAgg(fig)
    losses, rewards, acc = fig.subplots(1, 3)
    steps = [r["step"] for r in rows]
    for key, label in (("loss", "total"), ("loss_dpo", "DPO (preference)"), ("loss_bco", "BCO (quality)"),
                       ("loss_sft", "SFT (generation)")):
        losses.plot(steps, [r.get(key) for r in rows], label=label)
    losses.set_title("MPO losses")
    for key, label in (("rewards_chosen", "chosen β·Δlogp"), ("rewards_rejected", "rejected β·Δlogp"),
                       ("reward_margin", "margin"), ("delta", "reward shift δ")):
        rewards.plot(steps, [r.get(key) for r in rows], label=label)
    rewards.axhline(0.0, color="grey", linewidth=0.5)
    rewards.set_title("implicit rewards")
    acc.plot(steps, [r.get("reward_accuracy") for r in rows])
    acc.set_ylim(0, 1)
    acc.set_title("reward accuracy (chosen > rejected)")
    for ax in (losses, rewards, acc):
        ax.set_xlabel("optimizer step")
    losses.legend(fontsize=8)
    rewards.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_accuracy(overall: dict[str, float], labels: dict[str, str], path: Path) -> None:
    """Held-out accuracy per stage, one bar per entry of ``labels`` (stage -> label), in its order."""
    fig = Figure(figsize=(5, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    names = list(labels)
    bars = ax.bar([labels[n] for n in names], [overall[n] for n in names], color=["#888", "#2a7", "#27a"])
    for bar, name in zip(bars, names):
        ax.annotate(f"{overall[name]:.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_ylim(0, 100)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
