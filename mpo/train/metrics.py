"""Training metrics: accumulated on device, reduced once per logging interval, written on rank 0.

Sinks: `metrics.jsonl` in the run directory (one object per logged step), wandb (offline by
default), a tqdm progress bar with ETA, and `loss_curve.png` at the end.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from pathlib import Path

import torch
import torch.distributed as dist

# Dense bf16 peak per device (TFLOP/s) for the MFU estimate.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0}


def guess_peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def peak_memory_gib() -> float:
    """Peak accelerator memory allocated (GiB) on GPU; peak resident memory of this process on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


class MetricAccumulator:
    """Sums of per-micro-step metrics kept on device; `reduce` averages across steps and ranks."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.num_pairs = 0
        self.num_tokens = 0

    def add(self, metrics: dict[str, torch.Tensor], *, num_pairs: int, num_tokens: int) -> None:
        for key, value in metrics.items():
            value = value.detach().float()
            self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()
        self.count += 1
        self.num_pairs += num_pairs
        self.num_tokens += num_tokens

    def reduce(self, world_size: int) -> dict[str, float]:
        """Mean of each metric over micro-steps and ranks; pair and token counts summed. One sync."""
        keys = sorted(self.sums)
        device = self.sums[keys[0]].device
        packed = torch.stack([self.sums[k] for k in keys] + [torch.tensor(float(self.count), device=device),
                                                              torch.tensor(float(self.num_pairs), device=device),
                                                              torch.tensor(float(self.num_tokens), device=device)])
        if world_size > 1:
            dist.all_reduce(packed)
        values = packed.tolist()  # the one host sync of the interval
        count, pairs, tokens = values[-3:]
        out = {k: v / count for k, v in zip(keys, values[:-3])}
        out["num_pairs"], out["num_tokens"] = int(pairs), int(tokens)
        self.__init__()
        return out


class MetricsWriter:
    """Rank-0 sinks: metrics.jsonl, wandb, progress bar."""

    def __init__(self, run_dir: Path, *, total_steps: int, start_step: int, config: dict, use_wandb: bool,
                 wandb_mode: str, project: str, run_name: str | None, progress: bool):
        self.path = run_dir / "metrics.jsonl"
        self.total_steps = total_steps
        self._wandb = None
        if use_wandb and wandb_mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self._wandb = wandb.init(project=project, name=run_name, dir=str(run_dir), mode=wandb_mode,
                                     config=config, resume="allow", id=_wandb_id(run_dir))
        self._bar = None
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="mpo", unit="step", dynamic_ncols=True)

    def write(self, step: int, metrics: dict) -> None:
        record = {"step": step, **{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}}
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['reward_accuracy']:.2f}")

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._wandb.finish()


def _wandb_id(run_dir: Path) -> str:
    """A stable wandb run id per run directory, so a resumed run continues the same wandb run."""
    marker = run_dir / ".wandb_id"
    if marker.is_file():
        return marker.read_text().strip()
    import uuid

    run_id = uuid.uuid4().hex[:12]
    marker.write_text(run_id)
    return run_id


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop lines logged after `last_step` (they were lost with the crash that the resume undoes)."""
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= last_step]
    path.write_text("".join(ln + "\n" for ln in lines))


def plot_curves(metrics_path: Path, out_path: Path) -> Path | None:
    """Loss components and reward accuracy against step, as a PNG."""
    if not metrics_path.is_file():
        return None
    rows = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()]
    if not rows:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    steps = [r["step"] for r in rows]
    for key in ("loss", "loss_dpo", "loss_bco", "loss_sft"):
        ax1.plot(steps, [r.get(key) for r in rows], label=key)
    ax1.set_xlabel("step")
    ax1.set_title("losses")
    ax1.legend()
    ax2.plot(steps, [r.get("reward_accuracy") for r in rows], label="reward accuracy")
    ax2.plot(steps, [r.get("reward_margin") for r in rows], label="reward margin")
    ax2.set_xlabel("step")
    ax2.set_title("rewards")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    return out_path


class Throughput:
    """Wall-clock rates over a logging interval and an MFU estimate (6·N·tokens / time / peak)."""

    def __init__(self, num_params: int, peak_tflops: float | None, world_size: int):
        self.num_params, self.peak_tflops, self.world_size = num_params, peak_tflops, world_size
        self.t0 = time.perf_counter()

    def rates(self, num_pairs: int, num_tokens: int) -> dict:
        now = time.perf_counter()
        dt, self.t0 = max(now - self.t0, 1e-9), now
        out = {"pairs_per_s": num_pairs / dt, "tokens_per_s": num_tokens / dt}
        # forward+backward of the policy (6N per token) plus the reference forward (2N per token)
        flops = 8 * self.num_params * num_tokens
        out["mfu"] = flops / dt / (self.peak_tflops * 1e12 * self.world_size) if self.peak_tflops else None
        return out
