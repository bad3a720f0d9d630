"""MPO loss math against hand-worked values and independent formulas."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mpo.losses import (
    MPOLossConfig,
    RewardShift,
    bco_pair_loss,
    dpo_loss,
    generation_only_loss,
    mpo_loss,
    reward_stats,
    sft_loss,
    sft_loss_token_mean,
)

LN2 = math.log(2.0)


def softplus_ref(x: float) -> float:
    """−log σ(−x) = log(1 + exp(x)), written directly (independent of F.logsigmoid)."""
    return math.log(1.0 + math.exp(x))


def t(*values: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


# --------------------------------------------------------------------------------------------
# hand-worked values
# --------------------------------------------------------------------------------------------


def test_dpo_hand_worked():
    # r_c = -10 - (-12) = 2, r_r = -20 - (-19) = -1, β = 0.5 -> z = 0.5·(2 - (-1)) = 1.5
    # L = -log σ(1.5) = log(1 + e^-1.5) = 0.201413...
    loss = dpo_loss(t(-10.0), t(-20.0), t(-12.0), t(-19.0), beta=0.5)
    assert loss.shape == (1,)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1.5)), rel=1e-6)
    assert loss.item() == pytest.approx(0.2014132779827524, rel=1e-6)


def test_dpo_batch_against_independent_formula():
    pc, pr = t(-5.0, -30.0, -7.5), t(-6.0, -10.0, -7.5)
    rc, rr = t(-5.5, -25.0, -8.0), t(-6.5, -12.0, -7.0)
    beta = 0.1
    loss = dpo_loss(pc, pr, rc, rr, beta)
    for i in range(3):
        z = beta * ((pc[i] - rc[i]) - (pr[i] - rr[i])).item()
        assert loss[i].item() == pytest.approx(softplus_ref(-z), rel=1e-6)


def test_dpo_is_stable_for_large_margins():
    # z = -1000: log(1+e^1000) overflows when computed naively; logsigmoid gives 1000 exactly.
    loss = dpo_loss(t(0.0), t(0.0), t(5000.0), t(-5000.0), beta=0.1)
    assert torch.isfinite(loss).all()
    assert loss.item() == pytest.approx(1000.0, rel=1e-6)
    assert dpo_loss(t(0.0), t(0.0), t(-5000.0), t(5000.0), beta=0.1).item() == pytest.approx(0, abs=1e-30)


def test_bco_hand_worked():
    # β r_c = 0.5·2 = 1, β r_r = 0.5·(-1) = -0.5, δ = 0.25
    # L = log(1+e^{-(1-0.25)}) + log(1+e^{(-0.5-0.25)}) = log(1+e^-0.75) + log(1+e^-0.75)
    expected = 2 * math.log(1 + math.exp(-0.75))
    loss = bco_pair_loss(t(-10.0), t(-20.0), t(-12.0), t(-19.0), beta=0.5, delta=0.25)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    as_tensor = bco_pair_loss(t(-10.0), t(-20.0), t(-12.0), t(-19.0), 0.5, torch.tensor(0.25))
    assert as_tensor.item() == pytest.approx(expected, rel=1e-6)


def test_bco_batch_against_independent_formula():
    pc, pr = t(-5.0, -30.0), t(-6.0, -10.0)
    rc, rr = t(-5.5, -25.0), t(-6.5, -12.0)
    beta, delta = 0.2, -0.3
    loss = bco_pair_loss(pc, pr, rc, rr, beta, delta)
    for i in range(2):
        bc = beta * (pc[i] - rc[i]).item()
        br = beta * (pr[i] - rr[i]).item()
        expected = softplus_ref(-(bc - delta)) + softplus_ref(br - delta)
        assert loss[i].item() == pytest.approx(expected, rel=1e-6)


def test_bco_delta_gets_no_gradient():
    delta = torch.tensor(0.3, requires_grad=True)
    pc = t(-1.0).requires_grad_()
    bco_pair_loss(pc, t(-2.0), t(-1.5), t(-2.5), 0.1, delta).sum().backward()
    assert delta.grad is None
    assert pc.grad is not None


def test_sft_sequence_and_token_mean():
    logps, counts = t(-6.0, -2.0), torch.tensor([3, 1])
    # per sequence: 6/3 = 2, 2/1 = 2 ; token mean: 8/4 = 2 (equal here by construction)
    assert sft_loss(logps, counts).tolist() == pytest.approx([2.0, 2.0])
    assert sft_loss_token_mean(logps, counts).item() == pytest.approx(2.0)
    logps, counts = t(-6.0, -9.0), torch.tensor([2, 9])
    # per sequence: [3, 1] (batch mean 2); token mean: 15/11
    assert sft_loss(logps, counts).tolist() == pytest.approx([3.0, 1.0])
    assert sft_loss_token_mean(logps, counts).item() == pytest.approx(15 / 11)


def test_sft_modes_agree_at_batch_size_one():
    logps, counts = t(-13.0), torch.tensor([5])
    assert sft_loss(logps, counts).mean().item() == pytest.approx(sft_loss_token_mean(logps, counts).item())


def test_sft_zero_tokens_gives_zero_not_nan():
    loss = sft_loss(t(0.0, -4.0), torch.tensor([0, 2]))
    assert loss.tolist() == [0.0, 2.0]
    assert sft_loss_token_mean(t(0.0), torch.tensor([0])).item() == 0.0


def test_bf16_inputs_are_upcast():
    pc = torch.tensor([-300.5], dtype=torch.bfloat16)
    loss = dpo_loss(pc, pc, pc, pc, 0.1)
    assert loss.dtype == torch.float32
    assert sft_loss(pc, torch.tensor([10])).dtype == torch.float32


# --------------------------------------------------------------------------------------------
# value at initialisation
# --------------------------------------------------------------------------------------------


def test_values_at_initialisation():
    policy_chosen = t(-12.0, -40.0, -3.0)
    policy_rejected = t(-15.0, -22.0, -8.0)
    counts = torch.tensor([4, 10, 2])
    dpo = dpo_loss(policy_chosen, policy_rejected, policy_chosen.clone(), policy_rejected.clone(), 0.1)
    bco = bco_pair_loss(
        policy_chosen, policy_rejected, policy_chosen.clone(), policy_rejected.clone(), 0.1, 0.0
    )
    assert dpo.tolist() == pytest.approx([LN2] * 3, rel=1e-6)
    assert bco.tolist() == pytest.approx([2 * LN2] * 3, rel=1e-6)

    loss, metrics = mpo_loss(
        policy_chosen,
        policy_rejected,
        policy_chosen.clone(),
        policy_rejected.clone(),
        counts,
        0.0,
        MPOLossConfig(),
    )
    nll = (12 / 4 + 40 / 10 + 3 / 2) / 3  # = 8.5/3
    assert loss.item() == pytest.approx(0.8 * LN2 + 0.2 * 2 * LN2 + nll, rel=1e-6)
    assert (0.8 * LN2 + 0.2 * 2 * LN2) == pytest.approx(0.832, abs=1e-3)
    assert metrics["loss_dpo"].item() == pytest.approx(LN2, rel=1e-6)
    assert metrics["loss_bco"].item() == pytest.approx(2 * LN2, rel=1e-6)
    assert metrics["loss_sft"].item() == pytest.approx(nll, rel=1e-6)
    assert metrics["reward_accuracy"].item() == 0.0  # ties are not "correct"
    assert metrics["reward_margin"].item() == 0.0


# --------------------------------------------------------------------------------------------
# combined loss and metrics
# --------------------------------------------------------------------------------------------


def test_mpo_loss_combines_weighted_means_and_reports_metrics():
    pc, pr = t(-10.0, -4.0), t(-20.0, -3.0)
    rc, rr = t(-12.0, -5.0), t(-19.0, -3.5)
    counts = torch.tensor([5, 2])
    beta, delta = 0.5, 0.1
    config = MPOLossConfig(dpo_weight=0.7, bco_weight=0.3, sft_weight=0.5, beta=beta)
    loss, metrics = mpo_loss(pc, pr, rc, rr, counts, delta, config)

    bc = [beta * 2.0, beta * 1.0]  # β r_c
    br = [beta * -1.0, beta * 0.5]  # β r_r
    dpo = [softplus_ref(-(c - r)) for c, r in zip(bc, br)]
    bco = [softplus_ref(-(c - delta)) + softplus_ref(r - delta) for c, r in zip(bc, br)]
    sft = [10 / 5, 4 / 2]
    expected = 0.7 * np.mean(dpo) + 0.3 * np.mean(bco) + 0.5 * np.mean(sft)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(expected, rel=1e-6)

    expected_metrics = {
        "loss": expected,
        "loss_dpo": np.mean(dpo),
        "loss_bco": np.mean(bco),
        "loss_sft": np.mean(sft),
        "rewards_chosen": np.mean(bc),
        "rewards_rejected": np.mean(br),
        "reward_accuracy": 1.0,
        "reward_margin": np.mean(np.array(bc) - np.array(br)),
        "delta": delta,
        "logps_chosen": -7.0,
        "logps_rejected": -11.5,
    }
    assert set(metrics) == set(expected_metrics)
    for name, value in expected_metrics.items():
        tensor = metrics[name]
        assert isinstance(tensor, torch.Tensor) and tensor.dim() == 0, name
        assert not tensor.requires_grad, name
        assert tensor.item() == pytest.approx(value, rel=1e-6), name


def test_mpo_loss_token_mode_and_accuracy():
    pc, pr = t(-10.0, -4.0), t(-20.0, -3.0)
    rc, rr = t(-9.0, -5.0), t(-19.0, -3.5)
    counts = torch.tensor([5, 3])
    config = MPOLossConfig(dpo_weight=0.0, bco_weight=0.0, sft_weight=1.0, sft_mode="token")
    loss, metrics = mpo_loss(pc, pr, rc, rr, counts, 0.0, config)
    assert loss.item() == pytest.approx(14 / 8)
    # pair 0: r_c = -1, r_r = -1 (tie); pair 1: r_c = 1 > r_r = 0.5
    assert metrics["reward_accuracy"].item() == pytest.approx(0.5)


def test_mpo_loss_gradient_flows_only_through_policy():
    pc = t(-10.0, -4.0).requires_grad_()
    pr = t(-20.0, -3.0).requires_grad_()
    rc = t(-12.0, -5.0).requires_grad_()
    loss, _ = mpo_loss(pc, pr, rc, t(-19.0, -3.5), torch.tensor([5, 2]), 0.0, MPOLossConfig())
    loss.backward()
    assert pc.grad is not None and pr.grad is not None
    assert torch.all(pc.grad < 0)  # raising log π(chosen) lowers the loss
    assert torch.all(pr.grad > 0)


# --------------------------------------------------------------------------------------------
# gradients against analytic formulas
# --------------------------------------------------------------------------------------------


def test_dpo_gradient_matches_analytic_formula():
    pc = torch.tensor([-10.0, -3.0, -50.0], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-11.0, -1.0, -40.0], dtype=torch.float64, requires_grad=True)
    rc = torch.tensor([-10.5, -3.2, -52.0], dtype=torch.float64)
    rr = torch.tensor([-10.0, -1.5, -41.0], dtype=torch.float64)
    beta = 0.3
    dpo_loss(pc, pr, rc, rr, beta).sum().backward()
    z = beta * ((pc - rc) - (pr - rr)).detach()
    sigma_neg_z = 1.0 / (1.0 + torch.exp(z))  # σ(−z)
    torch.testing.assert_close(pc.grad, -beta * sigma_neg_z)
    torch.testing.assert_close(pr.grad, beta * sigma_neg_z)


def test_bco_gradient_matches_analytic_formula():
    pc = torch.tensor([-10.0, -3.0], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-11.0, -1.0], dtype=torch.float64, requires_grad=True)
    rc = torch.tensor([-10.5, -3.2], dtype=torch.float64)
    rr = torch.tensor([-10.0, -1.5], dtype=torch.float64)
    beta, delta = 0.3, 0.05
    bco_pair_loss(pc, pr, rc, rr, beta, delta).sum().backward()
    a = beta * (pc - rc).detach() - delta
    b = beta * (pr - rr).detach() - delta
    # d/da [-log σ(a)] = -σ(-a) ; d/db [-log σ(-b)] = σ(b)
    torch.testing.assert_close(pc.grad, -beta / (1 + torch.exp(a)))
    torch.testing.assert_close(pr.grad, beta / (1 + torch.exp(-b)))


def test_mpo_loss_gradcheck_fp64():
    rc = torch.tensor([-10.5, -3.2], dtype=torch.float64)
    rr = torch.tensor([-10.0, -1.5], dtype=torch.float64)
    counts = torch.tensor([7, 3])
    config = MPOLossConfig()

    def fn(pc, pr):
        return mpo_loss(pc, pr, rc, rr, counts, 0.02, config)[0]

    pc = torch.tensor([-10.0, -3.0], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-11.0, -1.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (pc, pr))


# --------------------------------------------------------------------------------------------
# reward shift
# --------------------------------------------------------------------------------------------


def test_reward_stats_hand_worked():
    # β r_c = 0.5·[2, 1] ; β r_r = 0.5·[-1, 0.5] -> sum = 1.25, count = 4
    reward_sum, count = reward_stats(t(-10.0, -4.0), t(-20.0, -3.0), t(-12.0, -5.0), t(-19.0, -3.5), 0.5)
    assert reward_sum.dim() == 0 and count.dim() == 0
    assert reward_sum.dtype == torch.float32 and count.dtype == torch.float32
    assert reward_sum.item() == pytest.approx(1.25)
    assert count.item() == 4.0
    assert not reward_sum.requires_grad


def test_reward_shift_starts_at_zero():
    shift = RewardShift()
    assert shift.mean == 0.0 and shift.count == 0
    assert isinstance(shift.mean, float)


def test_reward_shift_matches_numpy_cumulative_mean():
    rng = np.random.default_rng(0)
    batches = [rng.normal(loc=0.3, scale=2.0, size=n) for n in (2, 4, 2, 6, 2, 8)]
    shift = RewardShift()
    seen = []
    for i, batch in enumerate(batches):
        # alternate float and tensor arguments, as callers may pass either
        if i % 2:
            returned = shift.update(torch.tensor(batch.sum()), torch.tensor(float(len(batch))))
        else:
            returned = shift.update(float(batch.sum()), len(batch))
        seen.append(batch)
        expected = np.concatenate(seen).mean()
        assert shift.mean == pytest.approx(expected, rel=1e-12, abs=1e-12)
        assert returned == shift.mean
        assert shift.count == sum(len(b) for b in seen)


def test_reward_shift_includes_current_batch_hand_worked():
    shift = RewardShift()
    shift.update(3.0, 2)  # rewards 1, 2 -> mean 1.5
    assert shift.mean == 1.5
    shift.update(-2.0, 2)  # rewards -1, -1 -> (3 - 2) / 4
    assert shift.mean == 0.25
    shift.update(0.0, 0)  # empty batch: no-op
    assert shift.mean == 0.25 and shift.count == 4


def test_reward_shift_state_dict_round_trip(tmp_path):
    shift = RewardShift()
    shift.update(3.7, 4)
    shift.update(-1.1, 2)
    state = shift.state_dict()
    assert type(state["mean"]) is float and type(state["count"]) is int

    via_json = RewardShift()
    via_json.load_state_dict(json.loads(json.dumps(state)))
    path = tmp_path / "shift.pt"
    torch.save(state, path)
    via_torch = RewardShift()
    via_torch.load_state_dict(torch.load(path, weights_only=True))
    for restored in (via_json, via_torch):
        assert restored.mean == shift.mean and restored.count == shift.count
        # and it continues exactly as the original would
        restored.update(0.9, 2)
    shift.update(0.9, 2)
    assert via_json.mean == shift.mean == via_torch.mean


@pytest.mark.parametrize(
    "reward_sum, count",
    [(float("nan"), 2), (float("inf"), 2), (1.0, -2), (1.0, 2.5), (1.0, 0), ("1", 2), (torch.ones(2), 2)],
)
def test_reward_shift_rejects_bad_updates(reward_sum, count):
    shift = RewardShift()
    with pytest.raises(ValueError):
        shift.update(reward_sum, count)
    assert shift.mean == 0.0 and shift.count == 0  # state untouched


@pytest.mark.parametrize(
    "state",
    [{"mean": 1.0}, {"mean": 1.0, "count": 2, "x": 0}, {"mean": float("nan"), "count": 2},
     {"mean": 1.0, "count": -1}, {"mean": 1.0, "count": 0}, {"mean": "a", "count": 1}, [1.0, 2]],
)
def test_reward_shift_rejects_bad_state(state):
    with pytest.raises(ValueError):
        RewardShift().load_state_dict(state)


# --------------------------------------------------------------------------------------------
# two fake data-parallel ranks
# --------------------------------------------------------------------------------------------


def test_two_fake_ranks_match_the_global_batch():
    gen = torch.Generator().manual_seed(3)
    batch = 6
    pc = -20 * torch.rand(batch, generator=gen, dtype=torch.float64)
    pr = -20 * torch.rand(batch, generator=gen, dtype=torch.float64)
    rc = pc + torch.randn(batch, generator=gen, dtype=torch.float64)
    rr = pr + torch.randn(batch, generator=gen, dtype=torch.float64)
    counts = torch.randint(1, 30, (batch,), generator=gen)
    config = MPOLossConfig()

    # a previous step already moved δ, identically on every rank
    history = [(0.8, 12)]

    global_shift = RewardShift()
    for s, n in history:
        global_shift.update(s, n)
    global_shift.update(*reward_stats(pc, pr, rc, rr, config.beta))
    global_loss, global_metrics = mpo_loss(pc, pr, rc, rr, counts, global_shift.mean, config)

    halves = [slice(0, batch // 2), slice(batch // 2, batch)]
    stats = [reward_stats(pc[h], pr[h], rc[h], rr[h], config.beta) for h in halves]
    reduced_sum = stats[0][0] + stats[1][0]  # what all_reduce(SUM) gives every rank
    reduced_count = stats[0][1] + stats[1][1]
    rank_losses = []
    rank_shifts = []
    for h in halves:
        shift = RewardShift()
        for s, n in history:
            shift.update(s, n)
        shift.update(reduced_sum, reduced_count)
        rank_shifts.append(shift.mean)
        loss, _ = mpo_loss(pc[h], pr[h], rc[h], rr[h], counts[h], shift.mean, config)
        rank_losses.append(loss)

    assert rank_shifts[0] == rank_shifts[1]
    assert rank_shifts[0] == pytest.approx(global_shift.mean, rel=1e-6)
    # the independent δ: mean over history and every β·r of the batch
    all_rewards = torch.cat([config.beta * (pc - rc), config.beta * (pr - rr)])
    expected_delta = (0.8 + all_rewards.sum().item()) / (12 + 2 * batch)
    assert global_shift.mean == pytest.approx(expected_delta, rel=1e-6)
    assert global_metrics["delta"].item() == pytest.approx(expected_delta, rel=1e-6)
    # DDP averages gradients, i.e. the mean of the per-rank losses
    assert ((rank_losses[0] + rank_losses[1]) / 2).item() == pytest.approx(global_loss.item(), rel=1e-9)


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dpo_weight": -0.1},
        {"bco_weight": float("nan")},
        {"sft_weight": float("inf")},
        {"sft_weight": "1.0"},
        {"dpo_weight": True},
        {"beta": 0.0},
        {"beta": -0.1},
        {"beta": None},
        {"sft_mode": "tokens"},
        {"dpo_weight": 0.0, "bco_weight": 0.0, "sft_weight": 0.0},
    ],
)
def test_bad_config_raises(kwargs):
    with pytest.raises(ValueError) as info:
        MPOLossConfig(**kwargs)
    for field in kwargs:
        assert field in str(info.value)


def test_bad_config_reports_every_problem():
    with pytest.raises(ValueError) as info:
        MPOLossConfig(beta=-1.0, sft_mode="x", dpo_weight=-1.0)
    message = str(info.value)
    assert "beta" in message and "sft_mode" in message and "dpo_weight" in message


def test_defaults():
    config = MPOLossConfig()
    assert (config.dpo_weight, config.bco_weight, config.sft_weight, config.beta) == (0.8, 0.2, 1.0, 0.1)
    assert config.sft_mode == "sequence"


def test_shape_mismatch_raises():
    two, three = t(-1.0, -2.0), t(-1.0, -2.0, -3.0)
    with pytest.raises(ValueError, match="same batch size"):
        dpo_loss(two, two, two, three, 0.1)
    with pytest.raises(ValueError, match="same batch size"):
        bco_pair_loss(two, three, two, two, 0.1, 0.0)
    with pytest.raises(ValueError, match="1-D"):
        dpo_loss(two.view(2, 1), two.view(2, 1), two.view(2, 1), two.view(2, 1), 0.1)
    with pytest.raises(ValueError, match="chosen_num_tokens"):
        sft_loss(two, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="chosen_num_tokens"):
        sft_loss_token_mean(two, torch.tensor([1]))
    with pytest.raises(ValueError, match="chosen_num_tokens"):
        mpo_loss(two, two, two, two, torch.tensor([1]), 0.0, MPOLossConfig())
    with pytest.raises(ValueError, match="same batch size"):
        reward_stats(two, two, three, two, 0.1)


def test_other_bad_inputs_raise():
    x = t(-1.0, -2.0)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(x, x, x, x, 0.0)
    with pytest.raises(ValueError, match="delta"):
        bco_pair_loss(x, x, x, x, 0.1, torch.zeros(2))
    with pytest.raises(ValueError, match="delta"):
        bco_pair_loss(x, x, x, x, 0.1, float("nan"))
    with pytest.raises(ValueError, match="floating point"):
        dpo_loss(torch.tensor([1, 2]), x, x, x, 0.1)
    with pytest.raises(ValueError, match="empty"):
        dpo_loss(t(), t(), t(), t(), 0.1)
    with pytest.raises(ValueError, match="MPOLossConfig"):
        mpo_loss(x, x, x, x, torch.tensor([1, 1]), 0.0, {"beta": 0.1})


@pytest.mark.parametrize("mode", ["sequence", "token"])
def test_generation_only_loss_equals_mpo_loss_without_preference_terms(mode):
    torch.manual_seed(0)
    pc = (-torch.rand(6, dtype=torch.float64) * 30).requires_grad_()
    counts = torch.tensor([3, 7, 1, 12, 5, 2])
    config = MPOLossConfig(dpo_weight=0.0, bco_weight=0.0, sft_weight=0.7, sft_mode=mode)
    # The full objective, with arbitrary rejected / reference log-probs that must not matter.
    full, full_metrics = mpo_loss(pc, -torch.rand(6, dtype=torch.float64) * 30, -torch.rand(6) * 30,
                                  -torch.rand(6) * 30, counts, 0.3, config)
    (grad_full,) = torch.autograd.grad(full, pc)
    fast, metrics = generation_only_loss(pc, counts, config)
    (grad_fast,) = torch.autograd.grad(fast, pc)
    assert fast.item() == pytest.approx(full.item(), rel=1e-12)
    torch.testing.assert_close(grad_fast, grad_full)
    assert set(metrics) == {"loss", "loss_sft", "logps_chosen"}
    for key in metrics:
        assert metrics[key].item() == pytest.approx(full_metrics[key].item(), rel=1e-12)


def test_generation_only_loss_refuses_preference_weights():
    with pytest.raises(ValueError, match="needs dpo_weight = bco_weight = 0"):
        generation_only_loss(t(-1.0), torch.tensor([1]), MPOLossConfig())
    with pytest.raises(ValueError, match="must be an MPOLossConfig"):
        generation_only_loss(t(-1.0), torch.tensor([1]), {"sft_weight": 1.0})
