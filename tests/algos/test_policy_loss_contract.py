"""The policy and value losses' contract beyond the worked examples of test_policy_loss.py and
test_policy_loss_6b.py: a clip range of 0 is legal (the ratio is held at 1 on that side),
GSPO counts a sequence of one token, every loss refuses a tensor of the wrong rank or dtype
by name, and a shape mismatch names both the argument at fault and the one it is compared
with, in full.

Found missing by mutation testing (docs/testing.md, `scripts/mutation.sh policy_loss`).
Values are float64 and hand-computed; the arithmetic is in the comments.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from posttrain.algos import (
    cispo_policy_loss,
    clipped_policy_loss,
    entropy_loss,
    gspo_policy_loss,
    gspo_token_policy_loss,
    nll_loss,
    positive_example_mask,
    sapo_policy_loss,
    unclipped_policy_loss,
    value_loss,
)
from posttrain.algos.policy_loss import explained_variance
from posttrain.errors import ShapeError

D = torch.float64


def t(x):
    return torch.tensor(x, dtype=D)


def message(fn):
    with pytest.raises(ShapeError) as err:
        fn()
    return str(err.value)


def mismatch(name, ref_name, shape, ref_shape):
    return f"`{name}` has shape {shape} but `{ref_name}` has shape {ref_shape}; they must match"


# --------------------------------------------------------------------------------------------
# clip ranges of 0


def test_a_clip_range_of_zero_is_legal_and_holds_the_ratio_at_one_on_its_side():
    # log-ratios ±1 with A = 1: ratio e or 1/e.
    # ε_low = 0, ε_high = 0.2: clip(r, 1, 1.2); ℓ = -min(r·A, clip(r)·A)
    #   r = e:   -min(e, 1.2) = -1.2;   r = 1/e: -min(1/e, 1) = -1/e
    old = t([[-1.0, -1.0]])
    logp = old + t([[1.0, -1.0]])
    adv = t([[1.0, 1.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, _ = clipped_policy_loss(logp, old, adv, mask, clip_low=0.0, clip_high=0.2)
    assert_close(loss, t([[-1.2, -math.exp(-1.0)]]), atol=1e-15, rtol=0)
    # ε_high = 0 as well: r = e is held at 1: -min(e, 1) = -1
    loss, metrics = clipped_policy_loss(logp, old, adv, mask, clip_low=0.0, clip_high=0.0)
    assert_close(loss, t([[-1.0, -math.exp(-1.0)]]), atol=1e-15, rtol=0)
    assert_close(metrics["policy/clipfrac"], t(0.5), atol=0, rtol=0)
    # the other losses with clip ranges accept 0 too; CISPO's weight is then exactly 1 above
    loss, _ = cispo_policy_loss(logp, old, adv, mask, clip_low=0.0, clip_high=0.0)
    assert_close(loss, -logp, atol=1e-15, rtol=0)  # ŵ = clip(r, 1, 1) = 1: -A·log π
    # GSPO: the row's mean log-ratio is 0, s = 1, inside even a zero range: ℓ = -A = -1
    for fn in (gspo_policy_loss, gspo_token_policy_loss):
        loss, _ = fn(logp, old, adv, mask, clip_low=0.0, clip_high=0.0)
        assert_close(loss, t([[-1.0, -1.0]]), atol=1e-15, rtol=0)


# --------------------------------------------------------------------------------------------
# GSPO: a sequence of one counted token is a sequence


def test_gspo_counts_a_sequence_of_one_token():
    # row 0: one counted token, log-ratio ln 2 → s = 2; row 1: two tokens, mean ln ½ → s = ½.
    # ε = 0.2: both clipped.  seq_ratio_mean = (2 + ½)/2 = 1.25; clipfrac 2/2.
    ln2 = math.log(2.0)
    old = t([[-1.0, -1.0], [-1.0, -1.0]])
    logp = old + t([[ln2, 5.0], [-ln2 + 0.1, -ln2 - 0.1]])
    adv = t([[1.0, 1.0], [-1.0, -1.0]])
    mask = torch.tensor([[True, False], [True, True]])
    for fn in (gspo_policy_loss, gspo_token_policy_loss):
        loss, metrics = fn(logp, old, adv, mask, clip_low=0.2, clip_high=0.2)
        assert_close(metrics["policy/seq_ratio_mean"], t(1.25), atol=1e-12, rtol=0)
        assert_close(metrics["policy/clipfrac"], t(1.0), atol=0, rtol=0)
        # row 0: -min(2·1, 1.2·1) = -1.2; row 1: -min(½·(-1), 0.8·(-1)) = 0.8
        assert_close(loss, t([[-1.2, 0.0], [0.8, 0.8]]), atol=1e-12, rtol=0)


# --------------------------------------------------------------------------------------------
# rank and dtype, by name

LOSSES = [clipped_policy_loss, unclipped_policy_loss, gspo_policy_loss, gspo_token_policy_loss,
          cispo_policy_loss, sapo_policy_loss]


@pytest.mark.parametrize(("fn", "name"), [
    (lambda x: entropy_loss(x, torch.ones(3, dtype=torch.bool)), "entropy"),
    (lambda x: nll_loss(x, torch.ones(3, dtype=torch.bool)), "logp"),
    (lambda x: value_loss(x, x, x, torch.ones(3, dtype=torch.bool)), "values"),
    (lambda x: explained_variance(x, x, torch.ones(3, dtype=torch.bool)), "values"),
    (lambda x: positive_example_mask(x > 0, t([1.0, 0.0, 2.0])), "response_mask"),
])
def test_a_one_dimensional_input_is_refused_by_name(fn, name):
    x = t([0.5, 1.0, 2.0])
    assert message(lambda: fn(x)) == f"`{name}` must have 2 dimensions, got shape (3,)"


def test_integer_values_are_refused_by_name():
    v = torch.ones(1, 2, dtype=torch.long)
    assert message(lambda: value_loss(v, v, v, v > 0)) == \
        "`values` must be a floating-point tensor, got dtype torch.int64"


# --------------------------------------------------------------------------------------------
# shape mismatches name both arguments


X = t([[0.5, 1.0], [2.0, 0.25]])  # (2, 2)
BAD = t([[0.5, 1.0, 0.0], [2.0, 0.25, 0.0]])  # (2, 3)
M = torch.ones(2, 2, dtype=torch.bool)


@pytest.mark.parametrize("fn", LOSSES)
@pytest.mark.parametrize("which", ["old_logp", "advantages", "response_mask"])
def test_policy_loss_mismatches_name_both_arguments(fn, which):
    args = {"old_logp": X, "advantages": X, "response_mask": M}
    args[which] = BAD if which != "response_mask" else BAD > 0
    assert message(lambda: fn(X, **args)) == mismatch(which, "logp", (2, 3), (2, 2))


@pytest.mark.parametrize("which", ["old_values", "returns", "response_mask"])
def test_value_loss_mismatches_name_both_arguments(which):
    args = {"old_values": X, "returns": X, "response_mask": M}
    args[which] = BAD if which != "response_mask" else BAD > 0
    assert message(lambda: value_loss(X, **args)) == mismatch(which, "values", (2, 3), (2, 2))


def test_the_small_losses_mismatches_name_both_arguments():
    assert message(lambda: entropy_loss(X, BAD > 0)) == \
        mismatch("response_mask", "entropy", (2, 3), (2, 2))
    assert message(lambda: nll_loss(X, BAD > 0)) == mismatch("loss_mask", "logp", (2, 3), (2, 2))
    assert message(lambda: explained_variance(X, BAD, M)) == \
        mismatch("returns", "values", (2, 3), (2, 2))
    assert message(lambda: explained_variance(X, X, BAD > 0)) == \
        mismatch("response_mask", "values", (2, 3), (2, 2))
    assert message(lambda: positive_example_mask(M, t([1.0, 2.0, 3.0]))) == (
        "`scores` has 3 entries but `response_mask` has 2 rows; give one entry per sequence")
