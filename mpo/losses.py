"""MPO loss math: preference (DPO), quality (BCO pair) and generation (SFT) terms.

Mixed Preference Optimization (InternVL2.5-MPO, arXiv 2411.10442) trains a policy π_θ against a
frozen reference π_0 on (prompt x, chosen y_c, rejected y_r) pairs with

    L = w_p·L_p + w_q·L_q + w_g·L_g,        defaults w_p = 0.8, w_q = 0.2, w_g = 1.0, β = 0.1

where, with sequence log-probs summed over response tokens (fp32),

    r_c = log π_θ(y_c|x) − log π_0(y_c|x),      r_r = log π_θ(y_r|x) − log π_0(y_r|x)

    L_p = −log σ(β·r_c − β·r_r)                              (DPO, sigmoid form)
    L_q = −log σ(β·r_c − δ) − log σ(−(β·r_r − δ))            (BCO pair, δ = reward shift)
    L_g = −log π_θ(y_c|x) / |y_c|                            (SFT, length-normalised per sequence)

δ is a running mean of the detached rewards β·r_c and β·r_r seen so far (current batch included),
kept by `RewardShift`. At initialisation (π_θ = π_0, δ = 0): L_p = ln 2 ≈ 0.693, L_q = 2·ln 2 ≈
1.386, so the preference part of the loss is 0.8·0.693 + 0.2·1.386 ≈ 0.832 plus the NLL term; a
loss of 0 at the first step means the reference is wrong (e.g. it shares weights with the policy
after the first update, or log-probs were not summed).

Everything here is pure tensor math: log-probs in, losses out. No model, no process group; the
training loop all-reduces what `reward_stats` returns and feeds `RewardShift`.

Typical micro-step::

    reward_sum, count = reward_stats(pc, pr, rc, rr, cfg.beta)
    stats = torch.stack([reward_sum, count]); dist.all_reduce(stats)   # sum over DP ranks
    shift.update(stats[0], stats[1])                                    # current batch included
    loss, metrics = mpo_loss(pc, pr, rc, rr, chosen_num_tokens, shift.mean, cfg)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "MPOLossConfig",
    "RewardShift",
    "bco_pair_loss",
    "dpo_loss",
    "generation_only_loss",
    "mpo_loss",
    "reward_stats",
    "sft_loss",
    "sft_loss_token_mean",
]

SFT_MODES = ("sequence", "token")


# --------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------


def _is_real_number(value: Any) -> bool:
    # bool is an int subclass; a `beta: true` typo in a config must not become 1.0.
    return isinstance(value, Real) and not isinstance(value, bool)


def _check_beta(beta: Any) -> float:
    if not _is_real_number(beta) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"beta must be a finite number > 0 (the paper uses 0.1), got {beta!r}")
    return float(beta)


def _check_logps(**named: torch.Tensor) -> None:
    """All tensors must be 1-D floating point tensors of one shape [B]."""
    shape = None
    first = None
    for name, tensor in named.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of shape [B], got {type(tensor).__name__}")
        if tensor.dim() != 1:
            raise ValueError(
                f"{name} must be 1-D with one summed log-prob per sequence, shape [B]; got shape "
                f"{tuple(tensor.shape)} (sum token log-probs over the sequence first)"
            )
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must be a floating point tensor, got dtype {tensor.dtype}")
        if tensor.numel() == 0:
            raise ValueError(f"{name} is empty; the batch must hold at least one pair")
        if shape is None:
            shape, first = tensor.shape, name
        elif tensor.shape != shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)} but {first} has shape {tuple(shape)}; "
                "all per-sequence inputs must have the same batch size"
            )


def _check_num_tokens(name: str, num_tokens: torch.Tensor, like: torch.Tensor, like_name: str) -> None:
    if not isinstance(num_tokens, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape [B], got {type(num_tokens).__name__}")
    if num_tokens.shape != like.shape:
        raise ValueError(
            f"{name} has shape {tuple(num_tokens.shape)} but {like_name} has shape "
            f"{tuple(like.shape)}; pass one token count per sequence"
        )


def _at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    # bf16/fp16 log-probs of long sequences lose whole nats; fp64 stays fp64 (gradient checks).
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _delta_tensor(delta: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if isinstance(delta, torch.Tensor):
        if delta.dim() != 0:
            raise ValueError(
                f"delta must be a float or a 0-d tensor, got a tensor of shape {tuple(delta.shape)}"
            )
        # δ is a running statistic, a constant for this step's gradient.
        return delta.detach().to(device=like.device, dtype=like.dtype)
    if not _is_real_number(delta) or not math.isfinite(delta):
        raise ValueError(f"delta must be a finite float (use RewardShift.mean), got {delta!r}")
    return torch.tensor(float(delta), device=like.device, dtype=like.dtype)


def _rewards(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """β·(log π_θ − log π_0) in at least fp32, shape [B]."""
    return beta * (_at_least_fp32(policy_logps) - _at_least_fp32(ref_logps))


def _pair_rewards(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked (β·r_c, β·r_r), each [B] in at least fp32."""
    _check_logps(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    beta = _check_beta(beta)
    return (
        _rewards(policy_chosen_logps, ref_chosen_logps, beta),
        _rewards(policy_rejected_logps, ref_rejected_logps, beta),
    )


# --------------------------------------------------------------------------------------------
# the three terms
# --------------------------------------------------------------------------------------------


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Sigmoid DPO (preference) loss per pair.

    L_p = −log σ(β·r_c − β·r_r),  r_c = log π_θ(y_c|x) − log π_0(y_c|x), r_r likewise.

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps:
            summed response log-probs in nats, shape [B] each.
        beta: inverse temperature β > 0 (0.1 in MPO).

    Returns:
        Per-pair loss in nats, shape [B], dtype at least fp32. Equals ln 2 when π_θ = π_0.
        Gradient: ∂L/∂log π_θ(y_c) = −β·σ(−z), ∂L/∂log π_θ(y_r) = +β·σ(−z), z = β(r_c − r_r).
    """
    chosen_rewards, rejected_rewards = _pair_rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    # logsigmoid is stable for large |z|; log(sigmoid(z)) underflows to -inf for z << 0.
    return -F.logsigmoid(chosen_rewards - rejected_rewards)


def bco_pair_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    delta: float | torch.Tensor,
) -> torch.Tensor:
    """BCO pair (quality) loss per pair: each response judged on its own against a shift δ.

    L_q = −log σ(β·r_c − δ) − log σ(−(β·r_r − δ))

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps:
            summed response log-probs in nats, shape [B] each.
        beta: inverse temperature β > 0.
        delta: reward shift δ in reward units (nats·β): a float or 0-d tensor, normally
            `RewardShift.mean`. It is detached: δ is a statistic, not a path for gradients.

    Returns:
        Per-pair loss in nats, shape [B], dtype at least fp32. Equals 2·ln 2 when π_θ = π_0 and
        δ = 0.
    """
    chosen_rewards, rejected_rewards = _pair_rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    shift = _delta_tensor(delta, chosen_rewards)
    return -F.logsigmoid(chosen_rewards - shift) - F.logsigmoid(-(rejected_rewards - shift))


def sft_loss(chosen_logps: torch.Tensor, chosen_num_tokens: torch.Tensor) -> torch.Tensor:
    """Length-normalised NLL of each chosen response (the paper's generation loss).

    L_g[i] = −log π_θ(y_c,i|x_i) / |y_c,i|

    Every sequence weighs the same in the batch mean, whatever its length. A sequence with no
    labelled token (|y_c| = 0, so its summed log-prob is 0) gets loss 0 rather than NaN: the count
    is clamped to 1, which avoids a host sync to check it.

    Args:
        chosen_logps: policy log-probs of the chosen responses summed over tokens, nats, [B].
        chosen_num_tokens: number of labelled tokens per chosen response, [B] (any numeric dtype).

    Returns:
        Per-sequence mean NLL in nats per token, shape [B], dtype at least fp32.
    """
    _check_logps(chosen_logps=chosen_logps)
    _check_num_tokens("chosen_num_tokens", chosen_num_tokens, chosen_logps, "chosen_logps")
    logps = _at_least_fp32(chosen_logps)
    counts = chosen_num_tokens.to(device=logps.device, dtype=logps.dtype).clamp(min=1)
    return -logps / counts


def sft_loss_token_mean(chosen_logps: torch.Tensor, chosen_num_tokens: torch.Tensor) -> torch.Tensor:
    """Token-mean NLL over the micro-batch (what InternVL's and TRL's trainers compute).

    L_g = −Σ_i log π_θ(y_c,i|x_i) / Σ_i |y_c,i|

    The alternative to `sft_loss`: long responses weigh more. Equal to `sft_loss(...).mean()` at
    batch size 1 (the InternVL recipe runs 1 pair per GPU). Note that it is a per-rank mean: the
    average over data-parallel ranks is not the global token mean when ranks hold different token
    counts.

    Args:
        chosen_logps: summed chosen log-probs, nats, [B].
        chosen_num_tokens: labelled tokens per chosen response, [B].

    Returns:
        0-d tensor, nats per token, dtype at least fp32 (0 if the batch has no labelled token).
    """
    _check_logps(chosen_logps=chosen_logps)
    _check_num_tokens("chosen_num_tokens", chosen_num_tokens, chosen_logps, "chosen_logps")
    logps = _at_least_fp32(chosen_logps)
    total = chosen_num_tokens.to(device=logps.device, dtype=logps.dtype).sum().clamp(min=1)
    return -logps.sum() / total


# --------------------------------------------------------------------------------------------
# reward shift δ
# --------------------------------------------------------------------------------------------


def reward_stats(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum and count of this micro-batch's detached rewards, to feed `RewardShift.update`.

    reward_sum = Σ_i (β·r_c,i + β·r_r,i),   count = 2·B   (chosen and rejected both count)

    Both are returned as 0-d fp32 tensors on the inputs' device so the caller can stack them and
    all-reduce (SUM) once across data-parallel ranks, with no host sync here.

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps:
            summed response log-probs, nats, shape [B] each.
        beta: inverse temperature β > 0.

    Returns:
        (reward_sum, count): 0-d fp32 tensors, detached.
    """
    with torch.no_grad():
        chosen_rewards, rejected_rewards = _pair_rewards(
            policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
        )
        reward_sum = (chosen_rewards.sum() + rejected_rewards.sum()).float()
        count = torch.tensor(
            2.0 * chosen_rewards.numel(), dtype=torch.float32, device=chosen_rewards.device
        )
    return reward_sum, count


def _to_float(name: str, value: float | torch.Tensor) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        return float(value.item())
    if not _is_real_number(value):
        raise ValueError(f"{name} must be a number or a 1-element tensor, got {value!r}")
    return float(value)


class RewardShift:
    """Running mean δ of the rewards β·r_c and β·r_r, for the BCO pair loss.

    Use, once per micro-step (the reference implementation's order):

    1. `reward_sum, count = reward_stats(...)` on this micro-batch: the detached β·r_c and β·r_r
       of every pair, both of them, so count = 2·B.
    2. All-reduce (SUM) reward_sum and count across data-parallel ranks, so every rank folds in
       the same numbers and keeps the same δ.
    3. `update(reward_sum, count)` BEFORE computing this step's BCO loss.
    4. Pass `.mean` as δ to `bco_pair_loss` / `mpo_loss`: the cumulative mean of all rewards seen
       so far, the current batch included.

    δ = 0 before any update. The state is plain Python numbers (mean: float, count: int) so
    `state_dict()` survives `torch.save` and JSON; save it with the checkpoint, or a resumed run
    restarts δ at 0 (InternVL's trainer loses it this way).

    Cost: `update` with tensor arguments reads them to the host (one sync per micro-step, after
    the all-reduce), negligible next to a forward/backward of a VLM.
    """

    def __init__(self) -> None:
        self._mean = 0.0
        self._count = 0

    @property
    def mean(self) -> float:
        """δ: cumulative mean reward (reward units, nats·β); 0.0 before the first update."""
        return self._mean

    @property
    def count(self) -> int:
        """Number of rewards folded in so far (summed over ranks)."""
        return self._count

    def update(self, reward_sum: float | torch.Tensor, count: float | int | torch.Tensor) -> float:
        """Fold in one (all-reduced) batch of rewards and return the new mean.

        mean ← (mean·n + reward_sum) / (n + count),  n ← n + count

        Written as mean += (reward_sum − count·mean) / (n + count) to stay accurate after
        millions of rewards.

        Args:
            reward_sum: sum of the batch's rewards (float or 1-element tensor), finite.
            count: number of rewards in it (a non-negative whole number; 0 with sum 0 is a no-op).

        Returns:
            The new mean (float).
        """
        total = _to_float("reward_sum", reward_sum)
        num = _to_float("count", count)
        if not math.isfinite(total):
            raise ValueError(
                f"reward_sum is {total}; a non-finite reward would poison δ for the rest of the "
                "run: check the log-probs (NaN/inf) before updating the reward shift"
            )
        if not math.isfinite(num) or num < 0 or num != int(num):
            raise ValueError(f"count must be a non-negative whole number, got {num}")
        num_rewards = int(num)
        if num_rewards == 0:
            if total != 0.0:
                raise ValueError(f"count is 0 but reward_sum is {total}; pass the matching count")
            return self._mean
        self._count += num_rewards
        self._mean += (total - num_rewards * self._mean) / self._count
        return self._mean

    def state_dict(self) -> dict[str, float | int]:
        """Plain-number state: {"mean": float, "count": int}."""
        return {"mean": float(self._mean), "count": int(self._count)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict()` output (also after a JSON round trip)."""
        if not isinstance(state, dict) or set(state) != {"mean", "count"}:
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"RewardShift state must have exactly keys 'mean' and 'count', got {keys}")
        mean, count = state["mean"], state["count"]
        if not _is_real_number(mean) or not math.isfinite(mean):
            raise ValueError(f"RewardShift state 'mean' must be a finite float, got {mean!r}")
        if not _is_real_number(count) or count < 0 or count != int(count):
            raise ValueError(f"RewardShift state 'count' must be a non-negative int, got {count!r}")
        if int(count) == 0 and mean != 0:
            raise ValueError(f"RewardShift state has count 0 but mean {mean}; the state is corrupt")
        self._mean = float(mean)
        self._count = int(count)

    def __repr__(self) -> str:
        return f"RewardShift(mean={self._mean!r}, count={self._count})"


# --------------------------------------------------------------------------------------------
# the combined objective
# --------------------------------------------------------------------------------------------


@dataclass
class MPOLossConfig:
    """Weights and temperature of the MPO objective (defaults: InternVL2.5-MPO)."""

    dpo_weight: float = 0.8
    """w_p, weight of the preference (sigmoid DPO) loss."""
    bco_weight: float = 0.2
    """w_q, weight of the quality (BCO pair) loss."""
    sft_weight: float = 1.0
    """w_g, weight of the generation (SFT) loss on the chosen response."""
    beta: float = 0.1
    """β, scale of the implicit reward β·(log π_θ − log π_0)."""
    sft_mode: str = "sequence"
    """"sequence": per-sequence length-normalised NLL (the paper); "token": micro-batch token mean
    (InternVL/TRL trainers). Equal at batch size 1."""

    def __post_init__(self) -> None:
        problems = []
        for name in ("dpo_weight", "bco_weight", "sft_weight"):
            value = getattr(self, name)
            if not _is_real_number(value) or not math.isfinite(value) or value < 0:
                problems.append(f"{name} must be a finite number >= 0, got {value!r}")
        weights = [getattr(self, n) for n in ("dpo_weight", "bco_weight", "sft_weight")]
        if not problems and all(w == 0 for w in weights):
            problems.append(
                "dpo_weight, bco_weight and sft_weight are all 0: the loss would be 0 and nothing "
                "trains; the MPO defaults are 0.8, 0.2, 1.0"
            )
        if not _is_real_number(self.beta) or not math.isfinite(self.beta) or self.beta <= 0:
            problems.append(f"beta must be a finite number > 0 (MPO uses 0.1), got {self.beta!r}")
        if self.sft_mode not in SFT_MODES:
            problems.append(f"sft_mode must be one of {SFT_MODES}, got {self.sft_mode!r}")
        if problems:
            raise ValueError("invalid MPOLossConfig: " + "; ".join(problems))


def _generation_term(chosen_logps: torch.Tensor, chosen_num_tokens: torch.Tensor, config: "MPOLossConfig"):
    if config.sft_mode == "sequence":
        return sft_loss(chosen_logps, chosen_num_tokens).mean()
    return sft_loss_token_mean(chosen_logps, chosen_num_tokens)


def generation_only_loss(
    policy_chosen_logps: torch.Tensor, chosen_num_tokens: torch.Tensor, config: "MPOLossConfig"
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`mpo_loss` when ``dpo_weight == bco_weight == 0``, from the chosen log-probs alone.

    The preference and quality terms then weigh nothing, so neither rejected responses nor reference
    log-probs are needed (the trainer's SFT-only path skips both). Equal to `mpo_loss`'s loss for such a
    config; metrics: loss, loss_sft, logps_chosen.
    """
    if not isinstance(config, MPOLossConfig):
        raise ValueError(f"config must be an MPOLossConfig, got {type(config).__name__}")
    if config.dpo_weight != 0 or config.bco_weight != 0:
        raise ValueError(f"generation_only_loss needs dpo_weight = bco_weight = 0, got {config.dpo_weight} and "
                         f"{config.bco_weight}: use mpo_loss")
    loss_sft = _generation_term(policy_chosen_logps, chosen_num_tokens, config)
    loss = config.sft_weight * loss_sft
    metrics = {"loss": loss.detach(), "loss_sft": loss_sft.detach(),
               "logps_chosen": _at_least_fp32(policy_chosen_logps).detach().mean()}
    return loss, metrics


def mpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_num_tokens: torch.Tensor,
    delta: float | torch.Tensor,
    config: MPOLossConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The MPO objective on one micro-batch: weighted sum of the batch means of the three terms.

    loss = w_p·mean_i L_p,i + w_q·mean_i L_q,i + w_g·L_g
    with L_g = mean_i(−logπ_θ(y_c,i)/|y_c,i|) ("sequence") or −Σ logπ_θ(y_c)/Σ|y_c| ("token").

    Args:
        policy_chosen_logps, policy_rejected_logps: policy log-probs summed over response tokens,
            nats, [B] (carry gradients).
        ref_chosen_logps, ref_rejected_logps: reference log-probs, nats, [B] (no gradient needed).
        chosen_num_tokens: labelled tokens per chosen response, [B].
        delta: reward shift δ (float or 0-d tensor), normally `RewardShift.mean` after updating it
            with this batch's `reward_stats`.
        config: `MPOLossConfig`.

    Returns:
        (loss, metrics): loss is a 0-d tensor (at least fp32) to back-propagate; metrics maps
        names to detached 0-d tensors on the inputs' device (no `.item()`, so logging them adds no
        host sync until the logger asks): loss, loss_dpo, loss_bco, loss_sft, rewards_chosen and
        rewards_rejected (batch mean of β·r), reward_accuracy (fraction of pairs with r_c > r_r),
        reward_margin (mean of β·r_c − β·r_r), delta, logps_chosen and logps_rejected (mean policy
        log-probs, nats).
    """
    if not isinstance(config, MPOLossConfig):
        raise ValueError(f"config must be an MPOLossConfig, got {type(config).__name__}")
    loss_dpo = dpo_loss(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, config.beta
    ).mean()
    loss_bco = bco_pair_loss(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        config.beta,
        delta,
    ).mean()
    loss_sft = _generation_term(policy_chosen_logps, chosen_num_tokens, config)
    loss = config.dpo_weight * loss_dpo + config.bco_weight * loss_bco + config.sft_weight * loss_sft

    with torch.no_grad():
        chosen_rewards = _rewards(policy_chosen_logps, ref_chosen_logps, config.beta)
        rejected_rewards = _rewards(policy_rejected_logps, ref_rejected_logps, config.beta)
        metrics = {
            "loss": loss.detach(),
            "loss_dpo": loss_dpo.detach(),
            "loss_bco": loss_bco.detach(),
            "loss_sft": loss_sft.detach(),
            "rewards_chosen": chosen_rewards.mean(),
            "rewards_rejected": rejected_rewards.mean(),
            "reward_accuracy": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype).mean(),
            "reward_margin": (chosen_rewards - rejected_rewards).mean(),
            "delta": _delta_tensor(delta, chosen_rewards),
            "logps_chosen": _at_least_fp32(policy_chosen_logps).mean(),
            "logps_rejected": _at_least_fp32(policy_rejected_logps).mean(),
        }
    return loss, metrics
