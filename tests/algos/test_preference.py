"""Preference losses (ALGORITHMS.md sections 1 and 6): the Bradley-Terry reward-model loss, the
DPO family (DPO, cDPO, IPO, SimPO, ORPO, DPO-P, DPO+SFT) and KTO, with hand-derived values,
autograd gradients, plain-Python loop references and error handling."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from posttrain.algos.preference import (
    DPO_VARIANTS,
    DPOOutput,
    bradley_terry_loss,
    dpo_loss,
    kto_kl_estimate,
    kto_loss,
    log_odds,
)
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


def test_bt_per_pair_margins_against_a_plain_loop():
    # TRL's `margin` column: one m_i per pair, −log σ(R⁺_i − R⁻_i − m_i)
    gen = torch.Generator().manual_seed(3)
    chosen = torch.randn(6, generator=gen, dtype=D) * 2
    rejected = torch.randn(6, generator=gen, dtype=D) * 2
    margin = torch.rand(6, generator=gen, dtype=D) * 3
    losses, _ = bradley_terry_loss(chosen, rejected, margin)
    expected = [softplus(c - r - m) for c, r, m in
                zip(chosen.tolist(), rejected.tolist(), margin.tolist(), strict=True)]
    assert_close(losses, t(expected), atol=1e-14, rtol=0)
    with pytest.raises(ShapeError, match="`margin`"):
        bradley_terry_loss(chosen, rejected, margin[:3])


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


def test_ipo_uses_the_asymmetric_beta_logit():
    # The numbers. Chosen log-ratio -9 - (-10) = 1, rejected -10.5 - (-10) = -0.5;
    # β⁺ = 0.3, β⁻ = 0.1, β = 0.1 → h = 0.3·1 - 0.1·(-0.5) = 0.35, h/β = 3.5, 1/(2β) = 5:
    # spec (h/β - 1/(2β))² = (3.5 - 5)² = 2.25. The unscaled Δ = 1.5 would give
    # (1.5 - 5)² = 12.25, the value the defect produced.
    pc = t([-9.0]).requires_grad_(True)
    pr = t([-10.5]).requires_grad_(True)
    out = dpo_loss(pc, pr, t([-10.0]), t([-10.0]), variant="ipo", beta=0.1, beta_chosen=0.3,
                   beta_rejected=0.1)
    assert_close(out.losses, t([2.25]), atol=1e-12, rtol=0)
    assert_close(out.chosen_rewards, t([0.3]), atol=1e-15, rtol=0)
    assert_close(out.rejected_rewards, t([-0.05]), atol=1e-15, rtol=0)
    out.losses.sum().backward()
    # dL/dlog π(y⁺) = 2·(h/β - 1/(2β))·β⁺/β = 2·(-1.5)·3 = -9; dL/dlog π(y⁻) = -2·(-1.5)·1 = 3
    assert_close(pc.grad, t([-9.0]), atol=1e-12, rtol=0)
    assert_close(pr.grad, t([3.0]), atol=1e-12, rtol=0)


def test_ipo_gradient_by_autograd():
    gen = torch.Generator().manual_seed(1)
    beta, b_pos, b_neg = 0.2, 0.5, 0.1
    pc = (-torch.rand(6, generator=gen, dtype=D) * 20).requires_grad_(True)
    pr = (-torch.rand(6, generator=gen, dtype=D) * 20).requires_grad_(True)
    rc = -torch.rand(6, generator=gen, dtype=D) * 20
    rr = -torch.rand(6, generator=gen, dtype=D) * 20
    out = dpo_loss(pc, pr, rc, rr, variant="ipo", beta=beta, beta_chosen=b_pos,
                   beta_rejected=b_neg)
    out.losses.sum().backward()
    # L = (h/β - 1/(2β))², h = β⁺·(pc - rc) - β⁻·(pr - rr):
    # dL/dpc = 2·(h/β - 1/(2β))·β⁺/β, dL/dpr = -2·(h/β - 1/(2β))·β⁻/β
    u = [(b_pos * (a - b) - b_neg * (c - d)) / beta - 1 / (2 * beta)
         for a, b, c, d in zip(pc.tolist(), rc.tolist(), pr.tolist(), rr.tolist(), strict=True)]
    assert_close(out.losses, t([x * x for x in u]), atol=1e-12, rtol=0)
    assert_close(pc.grad, t([2 * x * b_pos / beta for x in u]), atol=1e-12, rtol=0)
    assert_close(pr.grad, t([-2 * x * b_neg / beta for x in u]), atol=1e-12, rtol=0)


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


def test_dpop_gradient_by_hand():
    pc = t([-12.0, -8.0]).requires_grad_(True)
    pr = t([-20.0, -12.0]).requires_grad_(True)
    rc, rr = t([-10.0, -10.0]), t([-10.0, -10.0])
    out = dpo_loss(pc, pr, rc, rr, beta=0.1, dpop_lambda=2.0)
    out.losses.sum().backward()
    # pair 0: h = 0.8 and r⁺ = -0.2 < 0, so the penalty λ·(-β·(pc - rc)) is active:
    #   dL/dpc = -β·σ(-h) - λ·β = -0.1·σ(-0.8) - 0.2;   dL/dpr = β·σ(-h) = 0.1·σ(-0.8)
    # pair 1: h = 0.4 and r⁺ = 0.2 > 0: no penalty gradient
    #   dL/dpc = -0.1·σ(-0.4);                           dL/dpr = 0.1·σ(-0.4)
    assert_close(pc.grad, t([-0.1 * sigmoid(-0.8) - 0.2, -0.1 * sigmoid(-0.4)]),
                 atol=1e-15, rtol=0)
    assert_close(pr.grad, t([0.1 * sigmoid(-0.8), 0.1 * sigmoid(-0.4)]), atol=1e-15, rtol=0)


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
    assert {"sigmoid", "ipo", "simpo", "orpo"} <= set(DPO_VARIANTS.names())
    # what each variant declares, so the trainer loads a reference model only when needed
    assert DPO_VARIANTS.attr("sigmoid", "needs_reference") and DPO_VARIANTS.attr(
        "ipo", "needs_reference")
    for name in ("simpo", "orpo"):
        assert not DPO_VARIANTS.attr(name, "needs_reference")
        assert DPO_VARIANTS.attr(name, "needs_lengths")
    with pytest.raises(ValueError, match="already registered"):
        DPO_VARIANTS.register("simpo")(lambda *a, **k: None)
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


# --------------------------------------------------------------------------------------------
# SimPO: −log σ(β·log π(y⁺)/|y⁺| − β·log π(y⁻)/|y⁻| − γ), no reference


def test_simpo_hand_values_and_gradient():
    # pair 0: chosen -6 over 3 tokens → mean -2; rejected -12 over 4 → mean -3;
    #   β = 2, γ = 1: logit 2·(-2) - 2·(-3) - 1 = 1 → loss ln(1 + e^{-1})
    # pair 1: chosen -1 over 1 → -1; rejected -2 over 2 → -1: logit -2 + 2 - 1 = -1 → ln(1 + e)
    pc = t([-6.0, -1.0]).requires_grad_(True)
    pr = t([-12.0, -2.0]).requires_grad_(True)
    out = dpo_loss(pc, pr, None, None, variant="simpo", beta=2.0, simpo_gamma=1.0,
                   chosen_tokens=torch.tensor([3, 1]), rejected_tokens=torch.tensor([4, 2]))
    assert_close(out.losses, t([softplus(1.0), softplus(-1.0)]), atol=1e-15, rtol=0)
    assert_close(out.chosen_rewards, t([-4.0, -2.0]), atol=1e-15, rtol=0)  # β·mean log π
    assert_close(out.rejected_rewards, t([-6.0, -2.0]), atol=1e-15, rtol=0)
    # margin: (2 + 0)/2 = 1; accuracy: pair 0 wins, pair 1 ties → 1/2
    assert_close(out.metrics["rewards/margin"], t(1.0), atol=1e-15, rtol=0)
    assert_close(out.metrics["rewards/accuracy"], t(0.5), atol=0, rtol=0)
    out.losses.sum().backward()
    # dL/dlog π(y⁺) = -σ(-logit)·β/|y⁺|, dL/dlog π(y⁻) = σ(-logit)·β/|y⁻|
    assert_close(pc.grad, t([-sigmoid(-1.0) * 2 / 3, -sigmoid(1.0) * 2 / 1]), atol=1e-15, rtol=0)
    assert_close(pr.grad, t([sigmoid(-1.0) * 2 / 4, sigmoid(1.0) * 2 / 2]), atol=1e-15, rtol=0)


def test_simpo_ignores_the_reference_and_normalises_length():
    args = dict(variant="simpo", beta=2.5, simpo_gamma=1.25, chosen_tokens=t([2.0]),
                rejected_tokens=t([8.0]))
    # the same mean log-prob per token (-1) for a short and a long response: logit = -γ
    out = dpo_loss(t([-2.0]), t([-8.0]), None, None, **args)
    assert_close(out.losses, t([softplus(-1.25)]), atol=1e-15, rtol=0)
    # reference log-probs, if passed, change nothing
    with_ref = dpo_loss(t([-2.0]), t([-8.0]), t([40.0]), t([-40.0]), **args)
    assert_close(with_ref.losses, out.losses, atol=0, rtol=0)
    with pytest.raises(ConfigError, match="chosen_tokens"):
        dpo_loss(t([-2.0]), t([-8.0]), None, None, variant="simpo")
    with pytest.raises(ShapeError, match="`rejected_tokens`"):
        dpo_loss(t([-2.0]), t([-8.0]), None, None, variant="simpo", chosen_tokens=t([1.0]),
                 rejected_tokens=t([1.0, 2.0]))
    with pytest.raises(ConfigError, match="dpop_lambda"):
        dpo_loss(t([-2.0]), t([-8.0]), None, None, dpop_lambda=1.0, **args)


# --------------------------------------------------------------------------------------------
# ORPO: NLL(y⁺) − λ·log σ(log odds(y⁺) − log odds(y⁻)), p = exp(mean-token log π)


def test_orpo_hand_values_and_gradient():
    # pair 0: chosen 2·ln(1/2) over 2 tokens → p = 1/2, odds 1, log odds 0, NLL ln 2;
    #         rejected 3·ln(1/4) over 3 → p = 1/4, odds (1/4)/(3/4) = 1/3, log odds -ln 3;
    #         ratio ln 3 → -log σ(ln 3) = ln(4/3); λ = 0.1 → ln 2 + 0.1·ln(4/3)
    # pair 1: chosen ln(3/4) over 1 → p = 3/4, odds 3, log odds ln 3, NLL ln(4/3);
    #         rejected 2·ln(1/2) over 2 → log odds 0; ratio ln 3 → ln(4/3) + 0.1·ln(4/3)
    half, quarter, three_q = math.log(0.5), math.log(0.25), math.log(0.75)
    pc = t([2 * half, three_q]).requires_grad_(True)
    pr = t([3 * quarter, 2 * half]).requires_grad_(True)
    out = dpo_loss(pc, pr, None, None, variant="orpo", orpo_lambda=0.1,
                   chosen_tokens=t([2.0, 1.0]), rejected_tokens=t([3.0, 2.0]))
    ln43 = math.log(4.0 / 3.0)
    assert_close(out.losses, t([LN2 + 0.1 * ln43, ln43 + 0.1 * ln43]), atol=1e-14, rtol=0)
    assert_close(out.chosen_rewards, t([0.0, math.log(3.0)]), atol=1e-14, rtol=0)  # log odds
    assert_close(out.rejected_rewards, t([-math.log(3.0), 0.0]), atol=1e-14, rtol=0)
    assert_close(out.metrics["orpo/nll"], t((LN2 + ln43) / 2), atol=1e-14, rtol=0)
    assert_close(out.metrics["orpo/log_odds_ratio"], t(math.log(3.0)), atol=1e-14, rtol=0)
    out.losses.sum().backward()
    # m = log π/|y|; d log odds/dm = 1/(1 - p); σ(-ratio) = σ(-ln 3) = 1/4
    # pair 0: dL/dm⁺ = -1 - λ·(1/4)·1/(1 - 1/2) = -1.05 → dL/dlog π(y⁺) = -1.05/2
    #         dL/dm⁻ = λ·(1/4)·1/(1 - 1/4) = 1/30 → dL/dlog π(y⁻) = 1/90
    # pair 1: dL/dm⁺ = -1 - 0.1·(1/4)·4 = -1.1 (over 1 token); dL/dm⁻ = 0.1·(1/4)·2 = 0.05 → /2
    assert_close(pc.grad, t([-0.525, -1.1]), atol=1e-14, rtol=0)
    assert_close(pr.grad, t([1.0 / 90.0, 0.025]), atol=1e-14, rtol=0)


def test_log_odds_is_stable_near_p_one_and_p_zero():
    # float64 against math.log(-math.expm1(m)) = log(1 - e^m), computed without torch
    ms = [-1e-12, -1e-6, -0.3, -math.log(2.0), -0.9, -5.0, -50.0, -700.0]
    expected = [m - math.log(-math.expm1(m)) for m in ms]
    assert_close(log_odds(t(ms)), t(expected), atol=1e-12, rtol=1e-12)
    # float32, a mean log-prob that rounds p to exactly 1: the naive log(p/(1-p)) is inf;
    # capped at -ε, the odds stay finite (about log(1/ε) ≈ 15.9) and so does the gradient
    m = torch.tensor([-1e-9, 0.0, -3.0], dtype=torch.float32, requires_grad=True)
    naive = torch.log(torch.exp(m) / (1 - torch.exp(m)))
    assert torch.isinf(naive[0]) and torch.isinf(naive[1])
    lo = log_odds(m)
    assert torch.isfinite(lo).all() and 15.0 < float(lo[0].detach()) < 16.5
    lo.sum().backward()
    assert torch.isfinite(m.grad).all()
    assert_close(lo[2], torch.tensor(-3.0 - math.log(-math.expm1(-3.0))), atol=1e-6, rtol=0)


def test_simpo_and_orpo_against_a_plain_loop():
    gen = torch.Generator().manual_seed(5)
    n = 7
    n_c = torch.randint(1, 12, (n,), generator=gen)
    n_r = torch.randint(1, 12, (n,), generator=gen)
    pc = -torch.rand(n, generator=gen, dtype=D) * 3 * n_c
    pr = -torch.rand(n, generator=gen, dtype=D) * 3 * n_r
    beta, gamma, lam = 2.0, 1.1, 0.25
    simpo = dpo_loss(pc, pr, None, None, variant="simpo", beta=beta, simpo_gamma=gamma,
                     chosen_tokens=n_c, rejected_tokens=n_r)
    orpo = dpo_loss(pc, pr, None, None, variant="orpo", orpo_lambda=lam, chosen_tokens=n_c,
                    rejected_tokens=n_r)
    want_simpo, want_orpo = [], []
    for a, b, la, lb in zip(pc.tolist(), pr.tolist(), n_c.tolist(), n_r.tolist(), strict=True):
        want_simpo.append(softplus(beta * a / la - beta * b / lb - gamma))
        pa, pb = math.exp(a / la), math.exp(b / lb)
        ratio = math.log(pa / (1 - pa)) - math.log(pb / (1 - pb))
        want_orpo.append(-a / la + lam * softplus(ratio))
    assert_close(simpo.losses, t(want_simpo), atol=1e-12, rtol=0)
    assert_close(orpo.losses, t(want_orpo), atol=1e-12, rtol=0)


# --------------------------------------------------------------------------------------------
# KTO: desirable λ_D·(1 − σ(β(r − z))), undesirable λ_U·(1 − σ(β(z − r))), z = max(0, KL)


def test_kto_hand_values():
    # β = 0.1, KL estimate 2 → z = 2.
    # 0 desirable,   r = 12 - 0 = 12:  β(r - z) = 1    → λ_D·(1 - σ(1))
    # 1 undesirable, r = -8:           β(z - r) = 1    → λ_U·(1 - σ(1))
    # 2 desirable,   r = 2:            β(r - z) = 0    → λ_D·(1 - 1/2)
    # 3 undesirable, r = 12:           β(z - r) = -1   → λ_U·(1 - σ(-1))
    policy = t([2.0, -18.0, -3.0, 0.0])
    ref = t([-10.0, -10.0, -5.0, -12.0])
    desirable = torch.tensor([True, False, True, False])
    out = kto_loss(policy, ref, desirable, 2.0, beta=0.1, desirable_weight=2.0,
                   undesirable_weight=0.5)
    expected = [2 * (1 - sigmoid(1.0)), 0.5 * (1 - sigmoid(1.0)), 2 * 0.5,
                0.5 * (1 - sigmoid(-1.0))]
    assert_close(out.losses, t(expected), atol=1e-15, rtol=0)
    assert_close(out.rewards, t([1.2, -0.8, 0.2, 1.2]), atol=1e-15, rtol=0)  # β·r
    assert_close(out.metrics["kto/rewards_desirable"], t(0.7), atol=1e-15, rtol=0)  # (1.2+0.2)/2
    assert_close(out.metrics["kto/rewards_undesirable"], t(0.2), atol=1e-15, rtol=0)  # (-0.8+1.2)/2
    assert_close(out.metrics["kto/kl"], t(2.0), atol=0, rtol=0)
    # a negative KL estimate is clamped: z = 0, so example 0 sees β·12 = 1.2
    neg = kto_loss(policy, ref, desirable, -3.0, beta=0.1)
    assert_close(neg.losses[0], t(1 - sigmoid(1.2)), atol=1e-15, rtol=0)
    assert_close(neg.losses[1], t(1 - sigmoid(0.8)), atol=1e-15, rtol=0)  # β(0 - (-8))


def test_kto_gradient_and_detached_reference_point():
    policy = t([2.0, -18.0]).requires_grad_(True)
    ref = t([-10.0, -10.0]).requires_grad_(True)
    kl = t(2.0).requires_grad_(True)
    out = kto_loss(policy, ref, torch.tensor([True, False]), kl, beta=0.1)
    out.losses.sum().backward()
    # d/dr [1 - σ(β(r - z))] = -β·σ(1)·(1 - σ(1)); d/dr [1 - σ(β(z - r))] = +β·σ(1)·(1 - σ(1))
    g = 0.1 * sigmoid(1.0) * (1 - sigmoid(1.0))
    assert_close(policy.grad, t([-g, g]), atol=1e-15, rtol=0)
    # neither the reference nor z carries gradient
    assert ref.grad is None and kl.grad is None
    assert not out.rewards.requires_grad


def test_kto_against_a_plain_loop():
    gen = torch.Generator().manual_seed(7)
    n = 9
    policy = -torch.rand(n, generator=gen, dtype=D) * 30
    ref = -torch.rand(n, generator=gen, dtype=D) * 30
    desirable = torch.rand(n, generator=gen) < 0.5
    kl_policy = -torch.rand(n, generator=gen, dtype=D) * 30
    kl_ref = -torch.rand(n, generator=gen, dtype=D) * 30
    kl = kto_kl_estimate(kl_policy, kl_ref)
    kl_plain = sum(a - b for a, b in zip(kl_policy.tolist(), kl_ref.tolist(), strict=True)) / n
    assert_close(kl, t(kl_plain), atol=1e-12, rtol=0)
    beta, wd, wu = 0.3, 1.5, 0.7
    out = kto_loss(policy, ref, desirable, kl, beta=beta, desirable_weight=wd,
                   undesirable_weight=wu)
    z = max(0.0, kl_plain)
    want = []
    for p, r, good in zip(policy.tolist(), ref.tolist(), desirable.tolist(), strict=True):
        want.append(wd * (1 - sigmoid(beta * (p - r - z))) if good
                    else wu * (1 - sigmoid(beta * (z - (p - r)))))
    assert_close(out.losses, t(want), atol=1e-12, rtol=0)


def test_kto_errors():
    x = t([-1.0, -2.0])
    with pytest.raises(ShapeError, match="`desirable`"):
        kto_loss(x, x, torch.tensor([1, 0]), 0.0)
    with pytest.raises(ShapeError, match="`ref_logp`"):
        kto_loss(x, t([-1.0]), torch.tensor([True, False]), 0.0)
    with pytest.raises(ConfigError, match="beta"):
        kto_loss(x, x, torch.tensor([True, False]), 0.0, beta=0.0)
    # a batch with one class only: the other class's mean reward is reported as 0
    out = kto_loss(x, x - 1.0, torch.tensor([True, True]), 0.0, beta=0.5)
    assert_close(out.metrics["kto/rewards_desirable"], t(0.5), atol=0, rtol=0)
    assert_close(out.metrics["kto/rewards_undesirable"], t(0.0), atol=0, rtol=0)
