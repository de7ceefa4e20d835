"""Advantage estimators: the documented defaults, edge shapes (a one-token response, the
device of the inputs), registration flags and the errors users read (habit 12). Found
missing by mutation testing (docs/testing.md)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from posttrain.algos import (
    ADVANTAGE_ESTIMATORS,
    compute_advantages,
    group_mean_std,
    length_adaptive_lambda,
    policy_lambda,
    register_advantage,
    whiten_advantages,
)
from posttrain.errors import ConfigError, ShapeError

D = torch.float64


def t(x):
    return torch.tensor(x, dtype=D)


def test_gae_of_a_one_token_response_is_its_reward_minus_its_value():
    """T = 1: A_0 = δ_0 = r_0 + γ·V(s_1) − V(s_0) with V(s_1) = 0, so 1.0 − 0.25 = 0.75 and
    the return A + V = 1.0."""
    adv, ret = compute_advantages("gae", t([[1.0]]), torch.tensor([[True]]),
                                  values=t([[0.25]]), gamma=0.9, lam=0.5)
    assert_close(adv, t([[0.75]]), atol=1e-12, rtol=0)
    assert_close(ret, t([[1.0]]), atol=1e-12, rtol=0)


def test_gae_runs_on_the_device_of_its_inputs():
    """A per-sequence λ built from a float must be on the rewards' device; `meta` is a second
    device on any machine."""
    r = torch.zeros(2, 3, device="meta")
    adv, ret = compute_advantages("gae", r, torch.ones(2, 3, dtype=torch.bool, device="meta"),
                                  values=torch.zeros(2, 3, device="meta"), lam=0.9)
    assert adv.device.type == "meta" and ret.device.type == "meta"


def test_compute_advantages_defaults_are_lambda_1_and_eps_1e_6():
    """The documented defaults give the same result as passing them: GAE with λ = γ = 1 is
    the plain return minus V; GRPO divides by std + 1e-6."""
    r = t([[0.0, 1.0], [0.0, 3.0]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    v = t([[0.5, 0.25], [1.0, 2.0]])
    adv, _ = compute_advantages("gae", r, mask, values=v)
    # λ = γ = 1: A_t = Σ_{i≥t} r_i − V(s_t)
    assert_close(adv, t([[1.0 - 0.5, 1.0 - 0.25], [3.0 - 1.0, 3.0 - 2.0]]), atol=1e-12, rtol=0)
    ids = torch.tensor([0, 0])
    adv, _ = compute_advantages("grpo", r, mask, group_ids=ids)
    explicit, _ = compute_advantages("grpo", r, mask, group_ids=ids, eps=1e-6)
    assert_close(adv, explicit, atol=0, rtol=0)
    # R = 1, 3: mean 2, std √2; (1 − 2)/(√2 + 1e-6) on the last token
    assert_close(adv[0, 1], t(-1.0 / (2.0**0.5 + 1e-6)), atol=1e-12, rtol=0)


def test_policy_lambda_defaults_to_0_95_and_whitening_to_eps_1e_8():
    mask = torch.ones(1, 4, dtype=torch.bool)
    assert policy_lambda("fixed", mask) == 0.95
    adv = t([[1.0, 2.0, 3.0, 4.0]])
    assert_close(whiten_advantages(adv, mask, "global"),
                 whiten_advantages(adv, mask, "global", eps=1e-8), atol=0, rtol=0)


def test_length_adaptive_lambda_needs_a_positive_alpha():
    mask = torch.ones(1, 4, dtype=torch.bool)
    with pytest.raises(ConfigError) as err:
        length_adaptive_lambda(mask, alpha=0.0)
    assert str(err.value) == "length-adaptive GAE needs alpha > 0, got 0.0"
    # α = 0.5, l = 4: 1 − 1/2 = 0.5
    assert_close(length_adaptive_lambda(mask.to(D), alpha=0.5), t([0.5]), atol=1e-12, rtol=0)


def test_register_advantage_declares_what_the_estimator_needs(monkeypatch):
    monkeypatch.setattr(ADVANTAGE_ESTIMATORS, "_items", dict(ADVANTAGE_ESTIMATORS._items))
    monkeypatch.setattr(ADVANTAGE_ESTIMATORS, "_attrs", dict(ADVANTAGE_ESTIMATORS._attrs))

    def est(token_rewards, response_mask, **_):
        return token_rewards, None

    register_advantage("test_plain")(est)
    assert ADVANTAGE_ESTIMATORS.attr("test_plain", "needs_values") is False
    assert ADVANTAGE_ESTIMATORS.attr("test_plain", "needs_groups") is False
    register_advantage("test_critic", needs_values=True)(lambda *a, **k: (a[0], None))
    assert ADVANTAGE_ESTIMATORS.attr("test_critic", "needs_values") is True
    assert ADVANTAGE_ESTIMATORS.attr("test_critic", "needs_groups") is False


def message(fn):
    with pytest.raises(ShapeError) as err:
        fn()
    return str(err.value)


def test_errors_name_the_argument_and_its_reference():
    r = t([[0.0, 1.0], [0.0, 3.0]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    wide = torch.ones(2, 3, dtype=torch.bool)
    ids = torch.tensor([0, 0])
    three = torch.tensor([0, 0, 1])
    cases = [
        (lambda: compute_advantages("grpo", r[0], mask[0], group_ids=ids),
         "`token_rewards` must have 2 dimensions, got shape (2,)"),
        (lambda: compute_advantages("grpo", r.long(), mask, group_ids=ids),
         "`token_rewards` must be a floating-point tensor, got dtype torch.int64"),
        (lambda: compute_advantages("grpo", r, wide, group_ids=ids),
         "`response_mask` has shape (2, 3) but `token_rewards` has shape (2, 2); they must "
         "match"),
        (lambda: compute_advantages("gae", r, mask, values=wide.to(D)),
         "`values` has shape (2, 3) but `token_rewards` has shape (2, 2); they must match"),
        (lambda: compute_advantages("grpo", r, mask, group_ids=three),
         "`group_ids` has 3 entries but `token_rewards` has 2 rows; give one entry per "
         "sequence"),
        (lambda: compute_advantages("gae", r, mask, values=r, lam=t([0.9, 0.9, 0.9])),
         "`lam` has 3 entries but `token_rewards` has 2 rows; give one entry per sequence"),
        (lambda: group_mean_std(r, ids),
         "`scores` must have 1 dimensions, got shape (2, 2)"),
        (lambda: group_mean_std(ids, ids),
         "`scores` must be a floating-point tensor, got dtype torch.int64"),
        (lambda: group_mean_std(r[0], three),
         "`group_ids` has 3 entries but `scores` has 2 rows; give one entry per sequence"),
        (lambda: group_mean_std(r[0], ids, valid=three.bool()),
         "`valid` has shape (3,) but `scores` has shape (2,); they must match"),
        (lambda: length_adaptive_lambda(mask[0]),
         "`response_mask` must have 2 dimensions, got shape (2,)"),
        (lambda: whiten_advantages(r[0], mask, "global"),
         "`advantages` must have 2 dimensions, got shape (2,)"),
        (lambda: whiten_advantages(r.long(), mask, "global"),
         "`advantages` must be a floating-point tensor, got dtype torch.int64"),
        (lambda: whiten_advantages(r, wide, "global"),
         "`response_mask` has shape (2, 3) but `advantages` has shape (2, 2); they must match"),
        (lambda: whiten_advantages(r, mask, "group", group_ids=three),
         "`group_ids` has 3 entries but `advantages` has 2 rows; give one entry per sequence"),
    ]
    for fn, want in cases:
        assert message(fn) == want


# ------------------------------------------------------------------- dtypes, empty, ranks


def test_group_statistics_of_an_empty_batch_are_empty():
    """A micro-batch with no sample (B = 0) has no group and no smallest group: empty
    statistics, not an error from the minimum of no counts."""
    mean, std = group_mean_std(torch.zeros(0, dtype=D), torch.zeros(0, dtype=torch.long))
    assert mean.shape == (0,) and std.shape == (0,)
    assert mean.dtype == D and std.dtype == D


def test_a_per_sequence_lambda_is_used_in_the_rewards_dtype():
    """float32 rewards with a float64 λ tensor stay float32. r = [0, 1], V = 0, γ = 1, λ = 0.5:
    A_1 = δ_1 = 1, A_0 = δ_0 + γλ·A_1 = 0 + 0.5·1 = 0.5."""
    r = torch.tensor([[0.0, 1.0]])
    adv, ret = compute_advantages("gae", r, torch.ones(1, 2, dtype=torch.bool),
                                  values=torch.zeros(1, 2), lam=t([0.5]))
    assert adv.dtype == torch.float32 and ret.dtype == torch.float32
    assert adv.tolist() == [[0.5, 1.0]]


def test_length_adaptive_lambda_of_a_bool_mask_is_float32_whatever_the_default_dtype():
    """The documented float32 for a bool mask does not follow `torch.set_default_dtype`.
    α = 0.5, l = 4: λ = 1 − 1/(0.5·4) = 0.5."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        lam = length_adaptive_lambda(torch.ones(1, 4, dtype=torch.bool), alpha=0.5)
    finally:
        torch.set_default_dtype(previous)
    assert lam.dtype == torch.float32 and lam.tolist() == [0.5]


def test_global_whitening_uses_the_statistics_of_every_rank():
    """`reduce` = 2·x stands for two ranks holding the same [1, 2, 3]: the global batch is
    [1, 2, 3, 1, 2, 3], mean 2, Σ(x − 2)² = 4, unbiased var 4/5 = 0.8, so with ε = 0 the
    result is (x − 2)/√0.8 = [−√1.25, 0, √1.25] (one rank alone: var 1, [−1, 0, 1])."""
    adv = t([[1.0, 2.0, 3.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    out = whiten_advantages(adv, mask, "global", eps=0.0, reduce=lambda x: 2 * x)
    assert_close(out, t([[-(1.25**0.5), 0.0, 1.25**0.5]]), atol=1e-12, rtol=0)
