"""Engine/trainer mismatch (ALGORITHMS.md §6c): every correction's weights on hand-computed
log-ratios, the identity when μ = π_old, padding that cannot leak, the metrics, and TIS
recovering the exact on-policy gradient from an engine's biased samples."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from posttrain.algos import IS_CORRECTIONS, correction_weights, mismatch_metrics
from posttrain.algos.objective import StepCounts, policy_objective

D = torch.float64
L3, LH = math.log(3.0), math.log(0.5)


def t(x):
    return torch.tensor(x, dtype=D)


# row 0: r = π_old/μ = [3, 0.5]; row 1: r = [3, 3]; row 2: r = [1.5, pad]
OLD = t([[L3, LH], [L3, L3], [math.log(1.5), 0.0]])
MU = torch.zeros(3, 2, dtype=D)
MASK = torch.tensor([[True, True], [True, True], [True, False]])


def weights(name, **params):
    return correction_weights(name, OLD, MU, MASK, params=params)


def test_token_tis_caps_each_ratio_at_c():
    assert_close(weights("tis"), t([[2.0, 0.5], [2.0, 2.0], [1.5, 0.0]]), atol=1e-12, rtol=0)
    assert_close(weights("tis", is_cap=5.0), t([[3.0, 0.5], [3.0, 3.0], [1.5, 0.0]]),
                 atol=1e-12, rtol=0)


def test_sequence_is_caps_the_product_of_the_ratios():
    """Row products: 3·0.5 = 1.5; 3·3 = 9 → C = 2; 1.5."""
    assert_close(weights("seq_is"), t([[1.5, 1.5], [2.0, 2.0], [1.5, 0.0]]), atol=1e-12, rtol=0)


def test_icepop_keeps_ratios_inside_the_bounds_and_zeroes_the_rest():
    """[0.5, 2] inclusive: 3 → 0, 0.5 → 0.5, 1.5 → 1.5."""
    assert_close(weights("icepop"), t([[0.0, 0.5], [0.0, 0.0], [1.5, 0.0]]), atol=1e-12, rtol=0)


def test_sequence_mask_drops_a_sequence_by_its_geometric_mean_ratio():
    """Geometric means: √1.5 ≈ 1.22 (kept), 3 (dropped), 1.5 (kept; one token)."""
    assert_close(weights("seq_mask"), t([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0]]), atol=0, rtol=0)


def test_opsm_drops_only_negative_advantage_sequences_that_drifted_past_delta():
    """mean_t(log μ − log π_θ): row 0 0.02 > δ = 0.01 and Â < 0 → dropped; row 1 the same
    drift with Â > 0 → kept; row 2 drift 0.005 ≤ δ → kept."""
    logp = t([[-0.02, -0.02], [-0.02, -0.02], [-0.005, 7.0]])
    adv = t([[-1.0, -1.0], [1.0, 1.0], [-1.0, float("nan")]])
    w = correction_weights("opsm", OLD, MU, MASK, logp=logp, advantages=adv,
                           params={"opsm_delta": 0.01})
    assert_close(w, t([[0.0, 0.0], [1.0, 1.0], [1.0, 0.0]]), atol=0, rtol=0)
    with pytest.raises(ValueError, match="opsm correction needs logp and advantages"):
        correction_weights("opsm", OLD, MU, MASK)


def test_every_correction_is_the_identity_when_the_engine_is_the_trainer():
    old = t([[-0.3, -2.0], [-1.1, -0.7]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    adv = t([[-1.0, -1.0], [2.0, 2.0]])
    for name in IS_CORRECTIONS.names():
        w = correction_weights(name, old, old.clone(), mask, logp=old, advantages=adv)
        assert_close(w, torch.ones(2, 2, dtype=D), atol=0, rtol=0, msg=name)


def test_padding_cannot_leak_into_a_weight():
    """Infinite log-probs on padding give finite weights everywhere and 0 on the pad."""
    old = t([[-1.0, float("inf")]])
    mu = t([[-1.0, float("-inf")]])
    mask = torch.tensor([[True, False]])
    for name in ("tis", "seq_is", "icepop", "seq_mask"):
        w = correction_weights(name, old, mu, mask)
        assert_close(w, t([[1.0, 0.0]]), atol=0, rtol=0, msg=name)


def test_mismatch_metrics_by_hand():
    """Tokens with r = 3, 0.5, 3, 3, 1.5: k3 = (r − 1) − log r; |log r|; outside [0.5, 2]:
    the three 3s (0.5 is inside, inclusive)."""
    m = mismatch_metrics(OLD, MU, MASK)
    rs = [3.0, 0.5, 3.0, 3.0, 1.5]
    assert_close(m["mismatch/k3"], t(sum(r - 1 - math.log(r) for r in rs) / 5), atol=1e-12,
                 rtol=0)
    assert_close(m["mismatch/abs_logp_mean"], t(sum(abs(math.log(r)) for r in rs) / 5),
                 atol=1e-12, rtol=0)
    assert_close(m["mismatch/abs_logp_max"], t(L3), atol=1e-12, rtol=0)
    assert_close(m["mismatch/outside"], t(3 / 5), atol=1e-12, rtol=0)
    same = mismatch_metrics(OLD, OLD.clone(), MASK)
    assert all(float(v) == 0 for v in same.values())


def policy_gradient(theta, actions, adv, mu_logp, correction):
    """∇θ of the clipped surrogate at π_θ = π_old on one-token rows (token-mean), weighted."""
    theta = theta.clone().requires_grad_(True)
    logp = torch.log_softmax(theta, -1)[actions][:, None]
    old = logp.detach()
    mask = torch.ones_like(old, dtype=torch.bool)
    n = float(len(actions))
    w = correction_weights(correction, old, mu_logp[actions][:, None], mask,
                           params={"is_cap": 2.0})
    loss, _ = policy_objective(logp, old, adv[actions][:, None], mask,
                               StepCounts(tokens=n, seqs=n, rows=n), aggregation="token-mean",
                               token_weight=w)
    loss.backward()
    return -theta.grad


def test_tis_recovers_the_on_policy_gradient_from_an_engines_samples():
    """A 3-action bandit. The trainer's π = softmax(θ) = [0.25, 0.25, 0.5]; the engine samples
    from μ = [0.5, 0.25, 0.25], so an exact 'batch' of its samples is the actions 0, 0, 1, 2.
    The on-policy gradient Σ_a π(a)·A(a)·∇log π(a); uncorrected, the batch weights a by μ(a)
    instead; TIS (π/μ = 0.5, 1, 2, all within C = 2) gives back exactly the on-policy one."""
    theta = t([0.0, 0.0, math.log(2.0)])
    adv = t([1.0, -2.0, 0.5])
    mu_logp = torch.log(t([0.5, 0.25, 0.25]))
    pi = torch.softmax(theta, -1)
    exact = torch.zeros(3, dtype=D)
    for a in range(3):  # ∇log π(a) = e_a − π
        exact += pi[a] * adv[a] * (torch.eye(3, dtype=D)[a] - pi)
    batch = torch.tensor([0, 0, 1, 2])
    naive = policy_gradient(theta, batch, adv, mu_logp, "none")
    tis = policy_gradient(theta, batch, adv, mu_logp, "tis")
    assert_close(tis, exact, atol=1e-12, rtol=0)
    assert float((naive - exact).norm()) > 0.1


def test_the_sequence_rules_divide_by_the_rows_own_length():
    """A one-token row with r = 3: its geometric mean is 3 (dropped by seq_mask), not √3."""
    w = correction_weights("seq_mask", t([[L3, 0.0]]), t([[0.0, 0.0]]),
                           torch.tensor([[True, False]]))
    assert_close(w, t([[0.0, 0.0]]), atol=0, rtol=0)


def test_opsm_needs_both_the_policy_and_the_advantages():
    with pytest.raises(ValueError, match="opsm correction needs logp and advantages"):
        correction_weights("opsm", OLD, MU, MASK, logp=OLD)


def test_metrics_bounds_are_inclusive_defaults_0_5_and_2_and_an_empty_mask_gives_0():
    """r = 2 is inside [0.5, 2], r = 2.5 outside (a default upper bound of 3 would keep it)."""
    m = mismatch_metrics(t([[math.log(2.0), math.log(2.5)]]), t([[0.0, 0.0]]),
                         torch.ones(1, 2, dtype=torch.bool))
    assert_close(m["mismatch/outside"], t(0.5), atol=1e-12, rtol=0)
    empty = mismatch_metrics(OLD, MU, torch.zeros(3, 2, dtype=torch.bool))
    assert float(empty["mismatch/abs_logp_max"]) == 0.0


def test_errors_name_the_argument_and_its_reference():
    from posttrain.errors import ShapeError

    mask = torch.ones(1, 2, dtype=torch.bool)
    cases = [
        (lambda f: f(t([0.0, 0.0]), t([0.0, 0.0]), mask[0]),
         "`old_logp` must have 2 dimensions, got shape (2,)"),
        (lambda f: f(torch.zeros(1, 2, dtype=torch.long), t([[0.0, 0.0]]), mask),
         "`old_logp` must be a floating-point tensor, got dtype torch.int64"),
        (lambda f: f(t([[0.0, 0.0]]), t([[0.0]]), mask),
         "`behavior_logp` has shape (1, 1) but `old_logp` has shape (1, 2); they must match"),
        (lambda f: f(t([[0.0, 0.0]]), t([[0.0, 0.0]]), torch.ones(1, 3, dtype=torch.bool)),
         "`mask` has shape (1, 3) but `old_logp` has shape (1, 2); they must match"),
    ]
    fns = [lambda o, b, m: correction_weights("tis", o, b, m), mismatch_metrics]
    for fn in fns:
        for call, want in cases:
            with pytest.raises(ShapeError) as err:
                call(fn)
            assert str(err.value) == want
