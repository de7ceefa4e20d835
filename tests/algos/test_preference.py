"""Preference losses (ALGORITHMS.md sections 1 and 6): the Bradley-Terry reward-model loss and
the DPO family, with hand-derived values, autograd gradients and error handling."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from posttrain.algos.preference import DPO_VARIANTS, DPOOutput, bradley_terry_loss, dpo_loss
from posttrain.errors import ConfigError, ShapeError

D = torch.float64
LN2 = math.log(2.0)


def t(x):
    return torch.tensor(x, dtype=D)


def softplus(x: float) -> float:
    """-log σ(x) = log(1 + e^{-x}), for hand values."""
    return math.log1p(math.exp(-x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# --------------------------------------------------------------------------------------------
# Bradley-Terry: -log σ(R⁺ - R⁻ - m)


def test_bt_equal_scores_give_ln2():
    losses, _ = bradley_terry_loss(t([0.0, 1.5, -3.0]), t([0.0, 1.5, -3.0]))
    # σ(0) = 1/2 → -log(1/2) = ln 2
    assert_close(losses, t([LN2, LN2, LN2]), atol=1e-15, rtol=0)


def test_bt_hand_value():
    # R⁺ - R⁻ = ln 3 → σ(ln 3) = 3/(3 + 1) = 3/4 → loss = ln(4/3); reversed: σ(-ln 3) = 1/4 → ln 4
    chosen = t([math.log(3.0) + 0.5, 0.5])
    rejected = t([0.5, math.log(3.0) + 0.5])
    losses, _ = bradley_terry_loss(chosen, rejected)
    assert_close(losses, t([math.log(4.0 / 3.0), math.log(4.0)]), atol=1e-12, rtol=0)


def test_bt_margin_shifts_the_logit():
    # R⁺ - R⁻ = ln 3 + m with margin m → logit ln 3 → loss ln(4/3) again
    chosen = t([math.log(3.0) + 2.0, math.log(3.0) + 0.5])
    rejected = t([0.0, 0.0])
    losses, _ = bradley_terry_loss(chosen, rejected, margin=t([2.0, 0.5]))
    assert_close(losses, t([math.log(4.0 / 3.0)] * 2), atol=1e-12, rtol=0)
    # a float margin of 1 on a difference of 1 → -log σ(0) = ln 2
    losses, _ = bradley_terry_loss(t([1.0]), t([0.0]), margin=1.0)
    assert_close(losses, t([LN2]), atol=1e-15, rtol=0)
    # the margin makes a correct ranking cost more: -log σ(1 - 1) > -log σ(1)
    no_margin, _ = bradley_terry_loss(t([1.0]), t([0.0]))
    assert_close(no_margin, t([softplus(1.0)]), atol=1e-15, rtol=0)
    assert losses[0] > no_margin[0]


def test_bt_metrics_by_hand():
    chosen = t([1.0, 2.0, 3.0, 5.0])
    rejected = t([0.0, 2.0, 5.0, 2.0])
    # R⁺ - R⁻ = 1, 0, -2, 3: strict wins on pairs 0 and 3 (the tie does not count) → 1/2
    _, metrics = bradley_terry_loss(chosen, rejected)
    assert_close(metrics["rm/accuracy"], t(0.5), atol=0, rtol=0)
    assert_close(metrics["rm/margin"], t(0.5), atol=0, rtol=0)  # (1 + 0 - 2 + 3)/4
    assert_close(metrics["rm/chosen"], t(2.75), atol=0, rtol=0)  # 11/4
    assert_close(metrics["rm/rejected"], t(2.25), atol=0, rtol=0)  # 9/4
    # accuracy and margin are about R⁺ - R⁻, not the margin-shifted logit
    _, metrics = bradley_terry_loss(chosen, rejected, margin=10.0)
    assert_close(metrics["rm/accuracy"], t(0.5), atol=0, rtol=0)
    assert_close(metrics["rm/margin"], t(0.5), atol=0, rtol=0)


def test_bt_gradient_wrt_chosen_is_minus_one_minus_sigma():
    chosen = t([math.log(3.0), 0.7, -1.2]).requires_grad_(True)
    rejected = t([0.0, 1.9, -4.0]).requires_grad_(True)
    losses, metrics = bradley_terry_loss(chosen, rejected)
    losses.sum().backward()
    # d/dR⁺ [-log σ(d)] = -(1 - σ(d)), d = R⁺ - R⁻; for d = ln 3 that is -1/4
    d = [math.log(3.0), 0.7 - 1.9, -1.2 + 4.0]
    expected = t([-(1.0 - sigmoid(x)) for x in d])
    assert_close(expected[0], t(-0.25), atol=1e-15, rtol=0)
    assert_close(chosen.grad, expected, atol=1e-15, rtol=0)
    assert_close(rejected.grad, -expected, atol=1e-15, rtol=0)
    assert all(not v.requires_grad for v in metrics.values())


def test_bt_shape_errors_name_the_argument():
    with pytest.raises(ShapeError, match="`rejected_scores`"):
        bradley_terry_loss(t([1.0, 2.0]), t([1.0, 2.0, 3.0]))
    with pytest.raises(ShapeError, match="`chosen_scores`"):
        bradley_terry_loss(t([[1.0, 2.0]]), t([[1.0, 2.0]]))
    with pytest.raises(ShapeError, match="`chosen_scores`"):
        bradley_terry_loss(torch.tensor([1, 2]), torch.tensor([0, 1]))


# --------------------------------------------------------------------------------------------
# DPO: h = β⁺·(log π(y⁺) - log π_ref(y⁺)) - β⁻·(log π(y⁻) - log π_ref(y⁻))


def test_dpo_first_step_loss_is_ln2():
    # policy == reference: both log-ratios are 0 → h = 0 → -log σ(0) = ln 2
    pc, pr = t([-12.0, -30.5]), t([-15.0, -8.25])
    out = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=0.1)
    assert isinstance(out, DPOOutput)
    assert_close(out.losses, t([LN2, LN2]), atol=1e-15, rtol=0)
    assert_close(out.chosen_rewards, t([0.0, 0.0]), atol=0, rtol=0)
    assert_close(out.rejected_rewards, t([0.0, 0.0]), atol=0, rtol=0)
    assert_close(out.metrics["rewards/accuracy"], t(0.0), atol=0, rtol=0)  # ties do not count


def test_dpo_sigmoid_hand_value():
    # chosen log-ratio -10 - (-20) = 10, rejected log-ratio -15 - (-15) = 0, difference 10;
    # β = 0.1 → h = 1 → loss = -log σ(1) = ln(1 + e^{-1})
    out = dpo_loss(t([-10.0]), t([-15.0]), t([-20.0]), t([-15.0]), beta=0.1)
    assert_close(out.losses, t([math.log(1.0 + math.exp(-1.0))]), atol=1e-15, rtol=0)
    assert_close(out.chosen_rewards, t([1.0]), atol=1e-15, rtol=0)  # 0.1·10
    assert_close(out.rejected_rewards, t([0.0]), atol=0, rtol=0)
    # "sigmoid" is the default variant and β = 0.1 the default β
    default = dpo_loss(t([-10.0]), t([-15.0]), t([-20.0]), t([-15.0]))
    assert_close(default.losses, out.losses, atol=0, rtol=0)


def test_cdpo_label_smoothing_hand_value():
    # h = 1 as above, ε = 0.1: -(1-ε)·log σ(1) - ε·log σ(-1) = 0.9·ln(1 + e^{-1}) + 0.1·ln(1 + e)
    out = dpo_loss(t([-10.0]), t([-15.0]), t([-20.0]), t([-15.0]), beta=0.1, label_smoothing=0.1)
    expected = 0.9 * math.log(1.0 + math.exp(-1.0)) + 0.1 * math.log(1.0 + math.e)
    assert_close(out.losses, t([expected]), atol=1e-15, rtol=0)
    # with smoothing the loss no longer goes to 0 for a huge h: it tends to ε·h
    out = dpo_loss(t([0.0]), t([0.0]), t([-400.0]), t([0.0]), beta=0.1, label_smoothing=0.1)
    # h = 40: 0.9·log(1 + e^{-40}) + 0.1·log(1 + e^{40}) = 0.1·(40 + log(1 + e^{-40}))
    assert_close(out.losses, t([0.1 * 40.0 + math.log1p(math.exp(-40.0))]), atol=1e-15, rtol=0)


def test_ipo_hand_value():
    # IPO: (Δ - 1/(2β))² with Δ = difference of log-ratios; β = 0.1 → target 1/(2·0.1) = 5
    pc = t([-10.0, -20.0, -1.0])
    pr = t([-15.0, -15.0, -3.0])
    rc = t([-20.0, -25.0, -3.0])
    rr = t([-15.0, -15.0, -3.0])
    # Δ = 10 - 0 = 10 → 25;  Δ = 5 - 0 = 5 → 0;  Δ = 2 - 0 = 2 → 9
    out = dpo_loss(pc, pr, rc, rr, variant="ipo", beta=0.1)
    assert_close(out.losses, t([25.0, 0.0, 9.0]), atol=1e-12, rtol=0)
    # β = 0.5 → target 1: Δ = 10 → 81, 5 → 16, 2 → 1
    out = dpo_loss(pc, pr, rc, rr, variant="ipo", beta=0.5)
    assert_close(out.losses, t([81.0, 16.0, 1.0]), atol=1e-12, rtol=0)


def test_reference_free_drops_the_reference_terms():
    # log π_ref = 0: h = 0.2·((-3) - (-8)) = 1 → ln(1 + e^{-1})
    out = dpo_loss(t([-3.0]), t([-8.0]), None, None, beta=0.2, reference_free=True)
    assert_close(out.losses, t([math.log(1.0 + math.exp(-1.0))]), atol=1e-15, rtol=0)
    assert_close(out.chosen_rewards, t([-0.6]), atol=1e-15, rtol=0)  # 0.2·(-3)
    assert_close(out.rejected_rewards, t([-1.6]), atol=1e-15, rtol=0)  # 0.2·(-8)
    # references that are passed anyway are ignored
    ignored = dpo_loss(t([-3.0]), t([-8.0]), t([50.0]), t([-50.0]), beta=0.2, reference_free=True)
    assert_close(ignored.losses, out.losses, atol=0, rtol=0)


def test_asymmetric_beta_by_hand():
    # chosen log-ratio -5 - (-10) = 5, rejected log-ratio -2 - (-7) = 5
    # β⁺ = 0.2, β⁻ = 0.1: r⁺ = 1, r⁻ = 0.5, h = 0.5 → loss ln(1 + e^{-0.5})
    out = dpo_loss(
        t([-5.0]), t([-2.0]), t([-10.0]), t([-7.0]), beta=0.1, beta_chosen=0.2, beta_rejected=0.1
    )
    assert_close(out.chosen_rewards, t([1.0]), atol=1e-15, rtol=0)
    assert_close(out.rejected_rewards, t([0.5]), atol=1e-15, rtol=0)
    assert_close(out.losses, t([softplus(0.5)]), atol=1e-15, rtol=0)
    # the symmetric β = 0.1 would see h = 0.1·5 - 0.1·5 = 0 → ln 2
    sym = dpo_loss(t([-5.0]), t([-2.0]), t([-10.0]), t([-7.0]), beta=0.1)
    assert_close(sym.losses, t([LN2]), atol=1e-15, rtol=0)
    # beta_chosen alone overrides β for y⁺ only: r⁺ = 0.3·5 = 1.5, r⁻ = 0.1·5 = 0.5, h = 1
    one = dpo_loss(t([-5.0]), t([-2.0]), t([-10.0]), t([-7.0]), beta=0.1, beta_chosen=0.3)
    assert_close(one.losses, t([softplus(1.0)]), atol=1e-15, rtol=0)


def test_dpop_penalises_only_a_negative_chosen_reward():
    pc = t([-12.0, -8.0])
    pr = t([-20.0, -12.0])
    rc = t([-10.0, -10.0])
    rr = t([-10.0, -10.0])
    # pair 0: r⁺ = 0.1·(-2) = -0.2, r⁻ = 0.1·(-10) = -1 → h = 0.8, penalty λ·max(0, 0.2) = 0.4
    # pair 1: r⁺ = 0.1·2 = 0.2,  r⁻ = 0.1·(-2) = -0.2 → h = 0.4, penalty λ·max(0, -0.2) = 0
    out = dpo_loss(pc, pr, rc, rr, beta=0.1, dpop_lambda=2.0)
    assert_close(out.losses, t([softplus(0.8) + 0.4, softplus(0.4)]), atol=1e-12, rtol=0)
    base = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert_close(base.losses, t([softplus(0.8), softplus(0.4)]), atol=1e-12, rtol=0)


def test_dpo_sft_adds_alpha_times_chosen_nll():
    pc, pr, rc, rr = t([-10.0, -4.0]), t([-15.0, -6.0]), t([-20.0, -5.0]), t([-15.0, -5.0])
    nll = t([1.5, 3.0]).requires_grad_(True)
    # h = 0.1·(10 - 0) = 1 and 0.1·(1 - (-1)) = 0.2; + 0.5·NLL = 0.75 and 1.5
    out = dpo_loss(pc, pr, rc, rr, beta=0.1, sft_alpha=0.5, chosen_nll=nll)
    assert_close(out.losses, t([softplus(1.0) + 0.75, softplus(0.2) + 1.5]), atol=1e-12, rtol=0)
    out.losses.sum().backward()
    assert_close(nll.grad, t([0.5, 0.5]), atol=0, rtol=0)  # the SFT term keeps its gradient
    with pytest.raises(ConfigError, match="chosen_nll"):
        dpo_loss(pc, pr, rc, rr, beta=0.1, sft_alpha=0.5)


def test_dpo_sigmoid_gradient_by_autograd():
    gen = torch.Generator().manual_seed(0)
    beta = 0.1
    pc = (-torch.rand(5, generator=gen, dtype=D) * 40).requires_grad_(True)
    pr = (-torch.rand(5, generator=gen, dtype=D) * 40).requires_grad_(True)
    rc = (-torch.rand(5, generator=gen, dtype=D) * 40).requires_grad_(True)
    rr = (-torch.rand(5, generator=gen, dtype=D) * 40).requires_grad_(True)
    out = dpo_loss(pc, pr, rc, rr, beta=beta)
    out.losses.sum().backward()
    # d(-log σ(h))/dh = -σ(-h); dh/d log π(y⁺) = β, dh/d log π(y⁻) = -β
    h = [
        beta * ((a - b) - (c - d))
        for a, b, c, d in zip(pc.tolist(), rc.tolist(), pr.tolist(), rr.tolist(), strict=True)
    ]
    assert_close(out.losses, t([softplus(x) for x in h]), atol=1e-14, rtol=0)
    assert_close(pc.grad, t([-beta * sigmoid(-x) for x in h]), atol=1e-15, rtol=0)
    assert_close(pr.grad, t([beta * sigmoid(-x) for x in h]), atol=1e-15, rtol=0)
    # the reference is frozen: its log-probs are detached and get no gradient
    assert rc.grad is None and rr.grad is None
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    assert all(not v.requires_grad for v in out.metrics.values())


def test_dpo_metrics_by_hand():
    # β = 0.5; chosen log-ratios 4, -1, 1 → rewards 2, -0.5, 0.5;
    # rejected log-ratios 0, 1, 1 → rewards 0, 0.5, 0.5
    pc, rc = t([-6.0, -9.0, -2.0]), t([-10.0, -8.0, -3.0])
    pr, rr = t([-7.0, -4.0, -1.0]), t([-7.0, -5.0, -2.0])
    out = dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert_close(out.chosen_rewards, t([2.0, -0.5, 0.5]), atol=0, rtol=0)
    assert_close(out.rejected_rewards, t([0.0, 0.5, 0.5]), atol=0, rtol=0)
    m = out.metrics
    assert_close(m["rewards/chosen"], t(2.0 / 3.0), atol=1e-15, rtol=0)  # (2 - 0.5 + 0.5)/3
    assert_close(m["rewards/rejected"], t(1.0 / 3.0), atol=1e-15, rtol=0)  # (0 + 0.5 + 0.5)/3
    assert_close(m["rewards/margin"], t(1.0 / 3.0), atol=1e-15, rtol=0)  # (2 - 1 + 0)/3
    # strict wins: pair 0 only (pair 1 loses, pair 2 ties) → 1/3
    assert_close(m["rewards/accuracy"], t(1.0 / 3.0), atol=1e-15, rtol=0)
    # h = 2, -1, 0
    assert_close(out.losses, t([softplus(2.0), softplus(-1.0), LN2]), atol=1e-15, rtol=0)


def test_dpo_variant_registry():
    assert {"sigmoid", "ipo"} <= set(DPO_VARIANTS.names())
    with pytest.raises(ConfigError, match=r"unknown DPO variant 'hinge'"):
        dpo_loss(t([-1.0]), t([-2.0]), t([-1.0]), t([-2.0]), variant="hinge")


@pytest.mark.parametrize("beta", [0.0, -0.1])
def test_dpo_rejects_a_non_positive_beta(beta):
    with pytest.raises(ConfigError, match="beta"):
        dpo_loss(t([-1.0]), t([-2.0]), t([-1.0]), t([-2.0]), beta=beta)


@pytest.mark.parametrize("eps", [0.5, 0.7, -0.1])
def test_dpo_rejects_label_smoothing_outside_0_to_half(eps):
    with pytest.raises(ConfigError, match="label_smoothing"):
        dpo_loss(t([-1.0]), t([-2.0]), t([-1.0]), t([-2.0]), label_smoothing=eps)


def test_dpo_accepts_label_smoothing_zero_and_just_below_half():
    for eps in (0.0, 0.49):
        out = dpo_loss(t([-1.0]), t([-2.0]), t([-1.0]), t([-2.0]), label_smoothing=eps)
        # h = 0: -(1-ε)·log σ(0) - ε·log σ(0) = ln 2 for every ε
        assert_close(out.losses, t([LN2]), atol=1e-15, rtol=0)


@pytest.mark.parametrize("missing", ["ref_chosen_logp", "ref_rejected_logp", "both"])
def test_dpo_needs_references_unless_reference_free(missing):
    rc = None if missing in ("ref_chosen_logp", "both") else t([-1.0])
    rr = None if missing in ("ref_rejected_logp", "both") else t([-2.0])
    with pytest.raises(ConfigError, match="reference_free"):
        dpo_loss(t([-1.0]), t([-2.0]), rc, rr)


@pytest.mark.parametrize(
    "which", ["policy_rejected_logp", "ref_chosen_logp", "ref_rejected_logp", "chosen_nll"]
)
def test_dpo_shape_mismatch_names_the_argument(which):
    args = {
        "policy_rejected_logp": t([-2.0, -3.0]),
        "ref_chosen_logp": t([-1.0, -1.0]),
        "ref_rejected_logp": t([-2.0, -2.0]),
        "chosen_nll": t([1.0, 1.0]),
    }
    args[which] = t([-1.0, -2.0, -3.0])
    with pytest.raises(ShapeError, match=f"`{which}`"):
        dpo_loss(
            t([-1.0, -2.0]),
            args["policy_rejected_logp"],
            args["ref_chosen_logp"],
            args["ref_rejected_logp"],
            sft_alpha=0.1,
            chosen_nll=args["chosen_nll"],
        )


def test_dpo_rejects_a_non_vector_or_integer_policy_logp():
    with pytest.raises(ShapeError, match="`policy_chosen_logp`"):
        dpo_loss(t([[-1.0]]), t([[-2.0]]), t([[-1.0]]), t([[-2.0]]))
    with pytest.raises(ShapeError, match="`policy_chosen_logp`"):
        dpo_loss(torch.tensor([-1]), torch.tensor([-2]), torch.tensor([-1]), torch.tensor([-2]))


@pytest.mark.parametrize("betas", [(0.0, 0.1), (0.1, -0.1)])
def test_asymmetric_betas_must_be_positive(betas):
    x = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(ConfigError, match="beta_chosen and beta_rejected"):
        dpo_loss(x, x, x, x, beta_chosen=betas[0], beta_rejected=betas[1])
