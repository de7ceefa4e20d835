"""Padding is selected away, never multiplied away (STYLE habit 14: 0 · inf = NaN).

Every masked function of `posttrain.algos` is run twice: once on clean inputs (finite garbage
in the padding) and once with NaN, +inf or -inf planted in the padding positions of every
tensor input. The outputs, and the gradients of every floating-point input, must be exactly
equal. A product with a 0/1 mask fails this test: NaN · 0 = NaN and inf · 0 = NaN, in the value
and, through the chain rule, in the gradient.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from posttrain.algos import (
    ADVANTAGE_ESTIMATORS,
    AGGREGATION_MODES,
    POLICY_LOSSES,
    add_score_at_last_token,
    aggregate_loss,
    compute_advantages,
    entropy_loss,
    explained_variance,
    group_mean_std,
    kl_estimate,
    kl_penalized_rewards,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    nll_loss,
    value_loss,
    whiten_advantages,
)

D = torch.float64
POISONS = [float("nan"), float("inf"), float("-inf")]

GEN = torch.Generator().manual_seed(0)
B, T = 6, 5
# ragged rows, a hole in row 2, an all-padding row 4
MASK = torch.tensor(
    [
        [1, 1, 1, 1, 1],
        [1, 1, 0, 0, 0],
        [1, 0, 1, 1, 0],
        [1, 0, 0, 0, 0],
        [0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0],
    ],
    dtype=torch.bool,
)
ROWS = MASK.any(-1)  # (B,) the rows with at least one counted token
GROUP_IDS = torch.tensor([0, 0, 1, 1, 1, 0])


def rand(*shape, scale=1.0, shift=0.0):
    return torch.randn(*shape, generator=GEN, dtype=D) * scale + shift


LOGP = rand(B, T, scale=0.5, shift=-1.5)
OLD = LOGP.detach() + rand(B, T, scale=0.3)


def _flatten(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [x for o in out for x in _flatten(o)]
    if isinstance(out, dict):
        return [x for k in sorted(out) for x in _flatten(out[k])]
    if out is None:
        return []
    raise TypeError(type(out))


def _run(fn, inputs, grads):
    """Call fn(**inputs) with fresh leaves for the names in `grads`; return outputs and grads."""
    leaves = {k: (v.detach().clone().requires_grad_(True) if k in grads else v)
              for k, v in inputs.items()}
    outs = _flatten(fn(**leaves))
    diff = [o for o in outs if o.requires_grad]
    if diff:
        # a fixed random weighting, so that every output entry's gradient path is exercised
        total = sum((o * torch.linspace(0.5, 1.5, o.numel(), dtype=o.dtype).view(o.shape)).sum()
                    for o in diff)
        total.backward()
    return [o.detach() for o in outs], [leaves[k].grad for k in grads]


def assert_padding_is_selected(fn, inputs, padding, grads=()):
    """`padding[name]` is a bool tensor (inputs[name]'s shape), True on the padding entries."""
    clean_out, clean_grad = _run(fn, inputs, grads)
    for g in clean_grad:
        assert g is not None
    for value in POISONS:
        dirty = dict(inputs)
        for name, pad in padding.items():
            dirty[name] = torch.where(pad, torch.full_like(inputs[name], value), inputs[name])
        out, grad = _run(fn, dirty, grads)
        assert len(out) == len(clean_out)
        for a, b in zip(out, clean_out, strict=True):
            assert_close(a, b, atol=0, rtol=0, equal_nan=True, msg=f"value, poison {value}")
        for a, b in zip(grad, clean_grad, strict=True):
            assert_close(a, b, atol=0, rtol=0, equal_nan=True, msg=f"gradient, poison {value}")


PAD = ~MASK
POSTTRAIN_ESTIMATORS = {"gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"}


# ------------------------------------------------------------------------------ masked reductions

@pytest.mark.parametrize("dim", [None, 1, 0])
def test_masked_sum_and_mean(dim):
    x = rand(B, T)
    assert_padding_is_selected(lambda x, mask: masked_sum(x, mask, dim), {"x": x, "mask": MASK},
                               {"x": PAD}, grads=("x",))
    assert_padding_is_selected(lambda x, mask: masked_mean(x, mask, dim), {"x": x, "mask": MASK},
                               {"x": PAD}, grads=("x",))


@pytest.mark.parametrize("unbiased", [True, False])
def test_masked_var(unbiased):
    assert_padding_is_selected(lambda x, mask: masked_var(x, mask, unbiased),
                               {"x": rand(B, T), "mask": MASK}, {"x": PAD}, grads=("x",))


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten(shift_mean):
    assert_padding_is_selected(lambda x, mask: masked_whiten(x, mask, shift_mean=shift_mean),
                               {"x": rand(B, T), "mask": MASK}, {"x": PAD}, grads=("x",))


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_aggregate_loss(mode):
    assert_padding_is_selected(lambda loss_mat, mask: aggregate_loss(loss_mat, mask, mode),
                               {"loss_mat": rand(B, T), "mask": MASK}, {"loss_mat": PAD},
                               grads=("loss_mat",))


# ------------------------------------------------------------------------------ losses

POLICY_KWARGS = {
    "clipped": {"clip_low": 0.2, "clip_high": 0.28, "dual_clip": 3.0},
    "unclipped": {},
    "gspo": {"clip_low": 0.05, "clip_high": 0.1},
    "gspo_token": {"clip_low": 0.05, "clip_high": 0.1},
    "cispo": {"clip_low": 0.2, "clip_high": 0.28},
    "sapo": {"tau_pos": 1.0, "tau_neg": 1.05},
}


@pytest.mark.parametrize("name", sorted(POLICY_KWARGS))
def test_policy_losses(name):
    fn = POLICY_LOSSES.get(name)
    kw = POLICY_KWARGS[name]
    inputs = {"logp": LOGP, "old_logp": OLD, "advantages": rand(B, T), "response_mask": MASK}

    def call(logp, old_logp, advantages, response_mask):
        return fn(logp, old_logp, advantages, response_mask, **kw)

    assert_padding_is_selected(call, inputs, {"logp": PAD, "old_logp": PAD, "advantages": PAD},
                               grads=("logp",))


def test_every_built_in_policy_loss_is_covered():
    # (other tests may register losses of their own; those are not posttrain's)
    built_in = {n for n in POLICY_LOSSES.names()
                if POLICY_LOSSES.get(n).__module__.startswith("posttrain.")}
    assert built_in == set(POLICY_KWARGS)


@pytest.mark.parametrize("clip_range", [0.2, None])
def test_value_loss(clip_range):
    inputs = {"values": rand(B, T), "old_values": rand(B, T), "returns": rand(B, T),
              "response_mask": MASK}
    assert_padding_is_selected(
        lambda values, old_values, returns, response_mask: value_loss(
            values, old_values, returns, response_mask, clip_range),
        inputs, {"values": PAD, "old_values": PAD, "returns": PAD}, grads=("values",))


def test_explained_variance():
    assert_padding_is_selected(explained_variance,
                               {"values": rand(B, T), "returns": rand(B, T), "response_mask": MASK},
                               {"values": PAD, "returns": PAD}, grads=("values", "returns"))


def test_entropy_and_nll_losses():
    assert_padding_is_selected(entropy_loss, {"entropy": rand(B, T).abs(), "response_mask": MASK},
                               {"entropy": PAD}, grads=("entropy",))
    assert_padding_is_selected(nll_loss, {"logp": LOGP, "loss_mask": MASK}, {"logp": PAD},
                               grads=("logp",))


# ------------------------------------------------------------------------------ KL

@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimate_with_a_mask(estimator):
    assert_padding_is_selected(
        lambda logp, ref_logp, mask: kl_estimate(logp, ref_logp, estimator, mask=mask),
        {"logp": LOGP, "ref_logp": OLD, "mask": MASK}, {"logp": PAD, "ref_logp": PAD},
        grads=("logp", "ref_logp"))


def test_kl_penalized_rewards():
    # the scores of rows with no token are padding too
    assert_padding_is_selected(
        lambda scores, kl, response_mask: kl_penalized_rewards(scores, kl, response_mask, 0.1),
        {"scores": rand(B), "kl": rand(B, T), "response_mask": MASK},
        {"scores": ~ROWS, "kl": PAD}, grads=("scores", "kl"))


def test_add_score_at_last_token():
    # A row with no token gets no score, so its score is padding; `rewards` is passed through
    # unchanged off the mask (the caller's padding stays the caller's), so only the counted
    # positions and the scores of empty rows are poisoned here.
    assert_padding_is_selected(
        add_score_at_last_token,
        {"rewards": rand(B, T), "scores": rand(B), "response_mask": MASK},
        {"scores": ~ROWS}, grads=("rewards", "scores"))
    rewards = rand(B, T)
    out = add_score_at_last_token(rewards, rand(B), MASK)
    assert torch.equal(out[PAD], rewards[PAD])


# ------------------------------------------------------------------------------ advantages

# the second layout has a group (rows 4, 5) with a single valid row: no advantage there
@pytest.mark.parametrize("group_ids", [GROUP_IDS, torch.tensor([0, 0, 1, 1, 2, 2])])
@pytest.mark.parametrize("name", sorted(n for n in ADVANTAGE_ESTIMATORS.names()
                                        if n in POSTTRAIN_ESTIMATORS))
def test_advantage_estimators(name, group_ids):
    est = ADVANTAGE_ESTIMATORS.get(name)
    inputs = {"token_rewards": rand(B, T), "response_mask": MASK}
    padding = {"token_rewards": PAD}
    grads = ["token_rewards"]
    if est.needs_values:
        inputs["values"] = rand(B, T)
        padding["values"] = PAD
        grads.append("values")

    def call(token_rewards, response_mask, values=None):
        return compute_advantages(name, token_rewards, response_mask, values=values,
                                  group_ids=group_ids if est.needs_groups else None,
                                  gamma=0.9, lam=0.8, critic_lam=1.0)

    assert_padding_is_selected(call, inputs, padding, grads=tuple(grads))


def test_every_built_in_estimator_is_covered():
    built_in = {n for n in ADVANTAGE_ESTIMATORS.names()
                if ADVANTAGE_ESTIMATORS.get(n).__module__.startswith("posttrain.")}
    assert built_in == POSTTRAIN_ESTIMATORS


@pytest.mark.parametrize("mode", ["none", "group", "global"])
def test_whiten_advantages(mode):
    assert_padding_is_selected(
        lambda advantages, response_mask: whiten_advantages(
            advantages, response_mask, mode, group_ids=GROUP_IDS),
        {"advantages": rand(B, T), "response_mask": MASK}, {"advantages": PAD},
        grads=("advantages",))


def test_group_mean_std_with_valid_rows():
    assert_padding_is_selected(
        lambda scores: group_mean_std(scores, GROUP_IDS, valid=ROWS),
        {"scores": rand(B)}, {"scores": ~ROWS}, grads=("scores",))
