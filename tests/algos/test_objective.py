"""The RL objective as a pure function: every term by hand, split invariance, padding.

The example (float64): two responses, the second one token long (its second position is
padding). π_old = 1 on every token (log 0), so the ratios are π_θ itself:

    ratio    = [[1.5, 0.5], [1.1, pad]]      A = [[1, 1], [-1, pad]]
    clipped surrogate, ε = 0.2:  (0,0) −min(1.5, 1.2) = −1.2    (0,1) −min(0.5, 0.8) = −0.5
                                 (1,0) −min(−1.1, −1.1) = 1.1
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from posttrain.algos.objective import (
    StepCounts,
    lm_objective,
    loss_arguments,
    policy_objective,
    value_objective,
)
from posttrain.algos.policy_loss import POLICY_LOSSES

D = torch.float64
MASK = torch.tensor([[True, True], [True, False]])
COUNTS = StepCounts(tokens=3, seqs=2, rows=2, norm_len=2)
PAD = (1, 1)


def inputs(pad_logp=-95.0, pad_adv=float("nan"), pad_ref=0.0, pad_entropy=float("inf")):
    logp = torch.tensor([[math.log(1.5), math.log(0.5)], [math.log(1.1), pad_logp]], dtype=D,
                        requires_grad=True)
    old = torch.zeros(2, 2, dtype=D)
    adv = torch.tensor([[1.0, 1.0], [-1.0, pad_adv]], dtype=D)
    ref = torch.tensor([[0.0, 0.0], [0.0, pad_ref]], dtype=D)
    entropy = torch.tensor([[1.0, 2.0], [3.0, pad_entropy]], dtype=D)
    return logp, old, adv, ref, entropy


SURROGATE = [-1.2, -0.5, 1.1]  # the three real tokens, in order (derived in the docstring)


def k3(logp, ref):
    log_rho = ref - logp
    return math.expm1(log_rho) - log_rho


def test_the_surrogate_under_each_aggregation():
    logp, old, adv, _, _ = inputs()
    for mode, expected in [
        ("token-mean", sum(SURROGATE) / 3),
        ("seq-mean-token-mean", ((-1.2 - 0.5) / 2 + 1.1) / 2),
        ("seq-mean-token-sum-norm", ((-1.2 - 0.5) / 2 + 1.1 / 2) / 2),  # / max length 2
    ]:
        loss, m = policy_objective(logp, old, adv, MASK, COUNTS, aggregation=mode,
                                   loss_params={"clip_low": 0.2, "clip_high": 0.2})
        assert_close(loss, torch.tensor(expected, dtype=D), atol=1e-12, rtol=0, msg=mode)
        assert_close(m["loss/surrogate"], loss.detach(), atol=1e-12, rtol=0)
        # one of three tokens clipped: (0,0)
        assert_close(m["policy/clipfrac"], torch.tensor(1 / 3, dtype=D), atol=1e-12, rtol=0)


def test_kl_in_loss_uses_the_estimator_in_the_right_direction():
    """β·k(π_θ ‖ π_ref) with log ρ = log π_ref − log π_θ. Swapping the arguments, or ignoring
    the estimator, changes the value, so each is caught."""
    logp, old, adv, ref, _ = inputs()
    beta = 0.1
    lp = [math.log(1.5), math.log(0.5), math.log(1.1)]
    expected = {"k1": sum(p - 0.0 for p in lp) / 3,
                "k2": sum(0.5 * (0.0 - p) ** 2 for p in lp) / 3,
                "k3": sum(k3(p, 0.0) for p in lp) / 3}
    swapped_k3 = sum(k3(0.0, p) for p in lp) / 3
    assert abs(expected["k3"] - swapped_k3) > 1e-3  # the example tells the directions apart
    base, _ = policy_objective(logp, old, adv, MASK, COUNTS, aggregation="token-mean")
    for est, kl in expected.items():
        loss, m = policy_objective(logp, old, adv, MASK, COUNTS, aggregation="token-mean",
                                   ref_logp=ref, kl_coef=beta, kl_estimator=est)
        assert_close(loss - base, torch.tensor(beta * kl, dtype=D), atol=1e-12, rtol=0, msg=est)
        assert_close(m["loss/kl"], torch.tensor(beta * kl, dtype=D), atol=1e-12, rtol=0)
        assert_close(m["kl/ref_loss"], torch.tensor(kl, dtype=D), atol=1e-12, rtol=0)
    # the gradient of β·mean(k3) w.r.t. log π_θ is β·(1 − ρ)/n per token (ρ = π_ref/π_θ)
    logp.grad = None
    loss, _ = policy_objective(logp, old, torch.zeros_like(adv), MASK, COUNTS,
                               aggregation="token-mean", ref_logp=ref, kl_coef=beta)
    loss.backward()
    want = [beta * (1 - math.exp(-p)) / 3 for p in lp]
    assert_close(logp.grad[MASK], torch.tensor(want, dtype=D), atol=1e-12, rtol=0)
    assert logp.grad[PAD] == 0


def test_k3_kl_in_loss_is_finite_through_padding():
    """The defect: on a pad position log π_ref = 0 and log π = −95, so expm1(95) = inf and
    inf · 0 = NaN reached the loss and the gradient. Padding is selected away now."""
    logp, old, adv, ref, entropy = inputs(pad_logp=-95.0)
    loss, _ = policy_objective(logp, old, adv, MASK, COUNTS, aggregation="token-mean",
                               ref_logp=ref, kl_coef=0.1, kl_estimator="k3", entropy=entropy,
                               entropy_coef=0.01)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    clean_logp, old, adv, ref, entropy = inputs(pad_logp=0.0, pad_adv=0.0, pad_entropy=0.0)
    clean, _ = policy_objective(clean_logp, old, adv, MASK, COUNTS, aggregation="token-mean",
                                ref_logp=ref, kl_coef=0.1, kl_estimator="k3",
                                entropy=entropy, entropy_coef=0.01)
    clean.backward()
    assert_close(loss, clean, atol=0, rtol=0)
    assert_close(logp.grad, clean_logp.grad, atol=0, rtol=0)


def test_entropy_bonus_and_positive_example_nll():
    logp, old, adv, _, entropy = inputs()
    base, _ = policy_objective(logp, old, adv, MASK, COUNTS, aggregation="token-mean")
    # −c·token-mean(H) = −0.01 · (1 + 2 + 3)/3
    loss, m = policy_objective(logp, old, adv, MASK, COUNTS, aggregation="token-mean",
                               entropy=entropy, entropy_coef=0.01)
    assert_close(loss - base, torch.tensor(-0.01 * 2.0, dtype=D), atol=1e-12, rtol=0)
    assert_close(m["policy/entropy"], torch.tensor(2.0, dtype=D), atol=1e-12, rtol=0)
    # μ · token-mean NLL over the correct responses (row 0: two tokens)
    positive = torch.tensor([[True, True], [False, False]])
    counts = COUNTS._replace(positive_tokens=2)
    loss, m = policy_objective(logp, old, adv, MASK, counts, aggregation="token-mean",
                               positive_mask=positive, positive_lm_coef=0.1)
    nll = -(math.log(1.5) + math.log(0.5)) / 2
    assert_close(loss - base, torch.tensor(0.1 * nll, dtype=D), atol=1e-12, rtol=0)
    assert_close(m["loss/positive_lm"], torch.tensor(0.1 * nll, dtype=D), atol=1e-12, rtol=0)
    # an entropy without a coefficient is measured, not trained
    loss, _ = policy_objective(logp, old, adv, MASK, COUNTS, aggregation="token-mean",
                               entropy=entropy)
    assert_close(loss, base, atol=0, rtol=0)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean",
                                  "seq-mean-token-sum-norm"])
def test_micro_batches_with_the_steps_counts_add_up_to_the_whole_step(mode):
    torch.manual_seed(0)
    b, t = 5, 4
    logp = torch.randn(b, t, dtype=D).clamp(max=-0.01).requires_grad_()
    old = logp.detach() + 0.1 * torch.randn(b, t, dtype=D)
    adv = torch.randn(b, t, dtype=D)
    ref = logp.detach() + 0.2 * torch.randn(b, t, dtype=D)
    ent = torch.rand(b, t, dtype=D).requires_grad_()
    mask = torch.rand(b, t) > 0.3
    mask[3] = False  # an empty row: counted by rows (Dr. GRPO), not by seqs
    counts = StepCounts(tokens=float(mask.sum()), seqs=float((mask.sum(1) > 0).sum()),
                        rows=float(b), norm_len=t, positive_tokens=float(mask[:2].sum()))
    positive = mask.clone()
    positive[2:] = False
    kw = dict(aggregation=mode, kl_coef=0.05, kl_estimator="k3", entropy_coef=0.01,
              positive_lm_coef=0.1, loss_params={"clip_low": 0.2, "clip_high": 0.28})

    def run(rows):
        return policy_objective(logp[rows], old[rows], adv[rows], mask[rows], counts,
                                ref_logp=ref[rows], entropy=ent[rows],
                                positive_mask=positive[rows], **kw)

    whole, wm = run(slice(None))
    (g_whole,) = torch.autograd.grad(whole, logp)
    parts = [run(slice(0, 2)), run(slice(2, 5))]
    split = parts[0][0] + parts[1][0]
    (g_split,) = torch.autograd.grad(split, logp)
    assert_close(split, whole, atol=1e-12, rtol=0)
    assert_close(g_split, g_whole, atol=1e-12, rtol=0)
    for key in ("policy/entropy", "kl/ref_loss", "policy/clipfrac", "loss/policy"):
        assert_close(parts[0][1][key] + parts[1][1][key], wm[key], atol=1e-12, rtol=0,
                     msg=key)


def test_the_loss_gets_only_the_numbers_it_declares(monkeypatch):
    params = {"clip_low": 0.1, "clip_high": 0.3, "dual_clip": None, "tau_pos": 1.0}
    assert loss_arguments("clipped", params) == {"clip_low": 0.1, "clip_high": 0.3,
                                                 "dual_clip": None}
    # the registration is undone after the test, so the suite can run twice in one process
    monkeypatch.setattr(POLICY_LOSSES, "_items", dict(POLICY_LOSSES._items))
    monkeypatch.setattr(POLICY_LOSSES, "_attrs", dict(POLICY_LOSSES._attrs))

    @POLICY_LOSSES.register("test_objective_takes_anything")
    def anything(logp, old_logp, advantages, response_mask, **numbers):
        return -advantages * logp, {}

    assert loss_arguments("test_objective_takes_anything", params) == params


def test_value_objective_has_its_own_aggregation():
    values = torch.tensor([[1.0, 2.0], [3.0, float("nan")]], dtype=D, requires_grad=True)
    old = torch.tensor([[1.0, 2.0], [3.0, 0.0]], dtype=D)
    returns = torch.tensor([[1.5, 1.0], [3.0, float("inf")]], dtype=D)
    # ½·(V − Ret)² per token (no clip bites: V = V_old): 0.125, 0.5, 0
    for mode, expected in [("token-mean", (0.125 + 0.5 + 0.0) / 3),
                           ("seq-mean-token-mean", ((0.125 + 0.5) / 2 + 0.0) / 2)]:
        loss, m = value_objective(values, old, returns, MASK, COUNTS, clip_range=0.2,
                                  aggregation=mode)
        assert_close(loss, torch.tensor(expected, dtype=D), atol=1e-12, rtol=0, msg=mode)
        assert_close(m["loss/value"], loss.detach(), atol=0, rtol=0)
        (grad,) = torch.autograd.grad(loss, values)
        assert torch.isfinite(grad).all() and grad[PAD] == 0


def test_lm_objective_is_a_token_mean_over_the_steps_targets():
    logp = torch.tensor([[-1.0, -2.0], [-3.0, float("-inf")]], dtype=D)
    loss, m = lm_objective(logp, MASK, num_tokens=6, coef=0.5)  # 6: the step has 3 more
    assert_close(loss, torch.tensor(0.5 * 6.0 / 6, dtype=D), atol=1e-12, rtol=0)
    assert_close(m["loss/ptx"], loss, atol=0, rtol=0)
