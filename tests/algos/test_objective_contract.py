"""The RL objective's contract beyond the worked example of test_objective.py: the step's
counts reach every term (norm_len, positive_tokens, a step of one token), the loss's own
numbers reach the loss, the documented defaults, metric shares in float64, padding the KL
cannot overflow through, and errors that name the argument at fault.

Found missing by mutation testing (docs/testing.md). The example is test_objective.py's
(float64): two responses, the second one token long, π_old = 1 (log 0), so ratio = π_θ:

    ratio = [[1.5, 0.5], [1.1, pad]]      A = [[1, 1], [-1, pad]]
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from posttrain.algos.objective import StepCounts, lm_objective, policy_objective, value_objective
from posttrain.errors import ShapeError

D = torch.float64
MASK = torch.tensor([[True, True], [True, False]])
COUNTS = StepCounts(tokens=3, seqs=2, rows=2, norm_len=2)


def t(x):
    return torch.tensor(x, dtype=D)


def inputs(pad_logp=-95.0):
    logp = torch.tensor([[math.log(1.5), math.log(0.5)], [math.log(1.1), pad_logp]], dtype=D,
                        requires_grad=True)
    old = torch.zeros(2, 2, dtype=D)
    adv = t([[1.0, 1.0], [-1.0, float("nan")]])
    ref = t([[0.0, 0.0], [0.0, 0.0]])
    return logp, old, adv, ref


# ------------------------------------------------------------------- counts reach every term


def test_seq_mean_token_sum_norm_divides_by_the_steps_norm_len_not_this_batchs_T():
    """Dr. GRPO's constant is the step's maximum length; a micro-batch whose T = 2 is shorter
    still divides by it. Clipped surrogate (ε = 0.2) per token: −1.2, −0.5 | 1.1, so with
    norm_len = 4 and 2 rows: ((−1.2 − 0.5)/4 + 1.1/4)/2 = −0.075 (T = 2 would give −0.15)."""
    logp, old, adv, _ = inputs()
    loss, _ = policy_objective(logp, old, adv, MASK, COUNTS._replace(norm_len=4),
                               aggregation="seq-mean-token-sum-norm")
    assert_close(loss, t(-0.075), atol=1e-12, rtol=0)


def test_the_loss_gets_the_numbers_in_loss_params():
    """ε = 0.6 instead of the default 0.2: no ratio is clipped (1.5 < 1.6, 0.5 > 0.4), so
    token-mean = (−1.5 − 0.5 + 1.1)/3 = −0.3 and clipfrac 0 (the default ε gives −0.2, 1/3)."""
    logp, old, adv, _ = inputs()
    loss, m = policy_objective(logp, old, adv, MASK, COUNTS, aggregation="token-mean",
                               loss_params={"clip_low": 0.6, "clip_high": 0.6})
    assert_close(loss, t(-0.3), atol=1e-12, rtol=0)
    assert_close(m["policy/clipfrac"], t(0.0), atol=0, rtol=0)


def test_metrics_are_this_micro_batchs_share_of_step_means():
    """The step has 6 tokens, this micro-batch 3: share = 1/2. clipfrac of the batch is 1/3
    (token (0,0)), so the reported share is 1/6; the entropy mean (1 + 2 + 3)/3 = 2 gives 1."""
    logp, old, adv, _ = inputs()
    entropy = t([[1.0, 2.0], [3.0, float("inf")]])
    _, m = policy_objective(logp, old, adv, MASK, COUNTS._replace(tokens=6),
                            aggregation="token-mean", entropy=entropy)
    assert_close(m["policy/clipfrac"], t(1 / 6), atol=1e-12, rtol=0)
    assert_close(m["policy/entropy"], t(1.0), atol=1e-12, rtol=0)


def test_each_term_reports_its_share_under_its_own_name():
    """The entropy bonus is reported as loss/entropy: −c·token-mean(H) = −0.01·2."""
    logp, old, adv, _ = inputs()
    entropy = t([[1.0, 2.0], [3.0, float("inf")]])
    loss, m = policy_objective(logp, old, adv, MASK, COUNTS, aggregation="token-mean",
                               entropy=entropy, entropy_coef=0.01)
    assert_close(m["loss/entropy"], t(-0.02), atol=1e-12, rtol=0)
    assert_close(m["loss/surrogate"] + m["loss/entropy"], loss.detach(), atol=1e-12, rtol=0)


def test_a_step_of_one_token_reports_that_tokens_metrics():
    """counts.tokens = 1, one token with ratio 1.5 and A = 1: clipped (1.5 > 1.2), so
    clipfrac = 1 and the loss −1.2; the share is 1/1, not diluted."""
    logp = t([[math.log(1.5)]]).requires_grad_()
    counts = StepCounts(tokens=1, seqs=1, rows=1, norm_len=1)
    loss, m = policy_objective(logp, torch.zeros(1, 1, dtype=D), t([[1.0]]),
                               torch.tensor([[True]]), counts, aggregation="token-mean")
    assert_close(loss, t(-1.2), atol=1e-12, rtol=0)
    assert_close(m["policy/clipfrac"], t(1.0), atol=1e-12, rtol=0)


def test_positive_lm_term_is_a_token_mean_over_the_steps_correct_tokens():
    """Row 0 is correct (2 tokens here); the step has 4 correct tokens in all, so the term is
    μ·(−log 1.5 − log 0.5)/4, not /2. With a single correct token in the step
    (positive_tokens = 1) it is μ·(−log 1.5)."""
    logp, old, adv, _ = inputs()
    base, _ = policy_objective(logp, old, adv, MASK, COUNTS, aggregation="token-mean")
    row0 = torch.tensor([[True, True], [False, False]])
    loss, m = policy_objective(logp, old, adv, MASK, COUNTS._replace(positive_tokens=4),
                               aggregation="token-mean", positive_mask=row0,
                               positive_lm_coef=0.1)
    want = 0.1 * -(math.log(1.5) + math.log(0.5)) / 4
    assert_close(loss - base, t(want), atol=1e-12, rtol=0)
    assert_close(m["loss/positive_lm"], t(want), atol=1e-12, rtol=0)
    one = torch.tensor([[True, False], [False, False]])
    loss, _ = policy_objective(logp, old, adv, MASK, COUNTS._replace(positive_tokens=1),
                               aggregation="token-mean", positive_mask=one,
                               positive_lm_coef=0.1)
    assert_close(loss - base, t(0.1 * -math.log(1.5)), atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------- the defaults


def test_policy_objective_defaults_to_clipped_seq_mean_token_mean():
    """The documented defaults: the clipped loss (ε = 0.2) under seq-mean-token-mean,
    ((−1.2 − 0.5)/2 + 1.1)/2 = 0.125."""
    logp, old, adv, _ = inputs()
    loss, _ = policy_objective(logp, old, adv, MASK, COUNTS)
    assert_close(loss, t(0.125), atol=1e-12, rtol=0)


def test_value_objective_defaults_to_clip_0_2_and_token_mean():
    """V_old = 0, V = 1, Ret = 1 on both tokens of row 0 and (V_old, V, Ret) = (0, 0.1, 0) on
    row 1's one token. Row 0: unclipped 0, clipped V = 0.2 gives (0.2 − 1)² = 0.64, so ½·0.64
    = 0.32 each; row 1: the clip does not bite, ½·0.1² = 0.005. token-mean over 3:
    (0.32 + 0.32 + 0.005)/3 = 0.215; with ε = 1.2 (or no clip) it would be 0.005/3.
    clipfrac = 2/3, reported as the share of a 3-token step: 2/3."""
    values = t([[1.0, 1.0], [0.1, float("nan")]]).requires_grad_()
    old = t([[0.0, 0.0], [0.0, 0.0]])
    returns = t([[1.0, 1.0], [0.0, float("inf")]])
    loss, m = value_objective(values, old, returns, MASK, COUNTS)
    assert_close(loss, t(0.215), atol=1e-12, rtol=0)
    assert_close(m["value/clipfrac"], t(2 / 3), atol=1e-12, rtol=0)
    # the clip range given is the one used: ε = 2 does not bite anywhere
    loss, m = value_objective(values, old, returns, MASK, COUNTS, clip_range=2.0)
    assert_close(loss, t(0.005 / 3), atol=1e-12, rtol=0)
    assert_close(m["value/clipfrac"], t(0.0), atol=0, rtol=0)
    # unclipped: no clipfrac to report
    loss, m = value_objective(values, old, returns, MASK, COUNTS, clip_range=None)
    assert_close(loss, t(0.005 / 3), atol=1e-12, rtol=0)
    assert "value/clipfrac" not in m


def test_value_clipfrac_is_the_micro_batchs_share_in_float64():
    """The step has 9 tokens, this micro-batch 3: share 1/3, so clipfrac 2/3 is reported as
    2/9, exact in float64 (a float32 share would be off by ~1e-8); a one-token step reports
    its token's clipfrac, 1."""
    values = t([[1.0, 1.0], [0.1, float("nan")]])
    old = t([[0.0, 0.0], [0.0, 0.0]])
    returns = t([[1.0, 1.0], [0.0, float("inf")]])
    _, m = value_objective(values, old, returns, MASK, COUNTS._replace(tokens=9))
    assert m["value/clipfrac"].dtype == D
    assert_close(m["value/clipfrac"], t(2 / 9), atol=1e-15, rtol=0)
    _, m = value_objective(t([[1.0]]), t([[0.0]]), t([[1.0]]), torch.tensor([[True]]),
                           StepCounts(tokens=1, seqs=1, rows=1))
    assert_close(m["value/clipfrac"], t(1.0), atol=0, rtol=0)


def test_lm_objective_scales_by_coef_and_defaults_to_coef_1():
    """NLL token-mean over 3 targets: (1 + 2 + 3)/3 = 2; coef 0.25 gives 0.5, the default
    coef 1 gives 2. A step of a single target token (num_tokens = 1) gives its NLL, 0.7."""
    logp = t([[-1.0, -2.0], [-3.0, float("-inf")]])
    loss, _ = lm_objective(logp, MASK, num_tokens=3, coef=0.25)
    assert_close(loss, t(0.5), atol=1e-12, rtol=0)
    loss, _ = lm_objective(logp, MASK, num_tokens=3)
    assert_close(loss, t(2.0), atol=1e-12, rtol=0)
    loss, _ = lm_objective(t([[-0.7, float("nan")]]), torch.tensor([[True, False]]),
                           num_tokens=1)
    assert_close(loss, t(0.7), atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------------- padding


@pytest.mark.parametrize("pad_logp", [-1000.0, float("-inf")])
def test_kl_in_loss_gradient_is_finite_through_padding_that_overflows_float64(pad_logp):
    """log ρ = 0 − (−1000) at the pad: expm1(1000) overflows float64 (−95 does not), and
    −inf gives inf − inf. The estimator must see the padding selected away *before* it, or
    the backward of the dropped entry is 0 · inf = NaN. The result equals a clean padding."""
    logp, old, adv, ref = inputs(pad_logp=pad_logp)
    kw = dict(aggregation="token-mean", ref_logp=ref, kl_coef=0.1, kl_estimator="k3")
    loss, m = policy_objective(logp, old, adv, MASK, COUNTS, **kw)
    loss.backward()
    clean_logp, *_ = inputs(pad_logp=0.0)
    clean, cm = policy_objective(clean_logp, old, adv, MASK, COUNTS, **kw)
    clean.backward()
    assert torch.isfinite(logp.grad).all()
    assert_close(loss, clean, atol=0, rtol=0)
    assert_close(m["kl/ref_loss"], cm["kl/ref_loss"], atol=0, rtol=0)
    assert_close(logp.grad, clean_logp.grad, atol=0, rtol=0)


# ---------------------------------------------------------------- errors name their argument


def test_policy_objective_errors_name_the_argument_and_its_reference():
    logp, old, adv, _ = inputs()
    wide = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ShapeError, match=r"`logp` must have 2 dimensions"):
        policy_objective(logp.detach()[0], old[0], adv[0], MASK, COUNTS)
    with pytest.raises(ShapeError, match=r"`logp` must be a floating-point tensor"):
        policy_objective(torch.zeros(2, 2, dtype=torch.long), old, adv, MASK, COUNTS)
    with pytest.raises(ShapeError, match=r"`response_mask` has shape \(2, 3\) but `logp`"):
        policy_objective(logp, old, adv, wide, COUNTS)
    with pytest.raises(ShapeError, match=r"`ref_logp` has shape \(2, 3\) but `logp`"):
        policy_objective(logp, old, adv, MASK, COUNTS, ref_logp=wide.to(D), kl_coef=0.1)
    with pytest.raises(ShapeError, match=r"`entropy` has shape \(2, 3\) but `logp`"):
        policy_objective(logp, old, adv, MASK, COUNTS, entropy=wide.to(D))
    with pytest.raises(ShapeError, match=r"`positive_mask` has shape \(2, 3\) but `logp`"):
        policy_objective(logp, old, adv, MASK, COUNTS, positive_mask=wide,
                         positive_lm_coef=0.1)
    # a term switched on without its input says which input and which option
    with pytest.raises(ValueError) as err:
        policy_objective(logp, old, adv, MASK, COUNTS, kl_coef=0.1)
    assert str(err.value) == "a KL-in-loss term (kl_coef > 0) needs ref_logp"
    with pytest.raises(ValueError) as err:
        policy_objective(logp, old, adv, MASK, COUNTS, positive_lm_coef=0.1)
    assert str(err.value) == "a positive-example LM term (positive_lm_coef > 0) needs positive_mask"


def test_value_and_lm_objective_errors_name_the_argument_and_its_reference():
    values = t([[1.0, 1.0], [0.1, 0.0]])
    wide = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ShapeError, match=r"`values` must have 2 dimensions"):
        value_objective(values[0], values, values, MASK, COUNTS)
    with pytest.raises(ShapeError, match=r"`response_mask` has shape \(2, 3\) but `values`"):
        value_objective(values, values, values, wide, COUNTS)
    with pytest.raises(ShapeError, match=r"`logp` must have 2 dimensions"):
        lm_objective(values[0], MASK, num_tokens=3)
    with pytest.raises(ShapeError, match=r"`loss_mask` has shape \(2, 3\) but `logp`"):
        lm_objective(values, wide, num_tokens=3)


def test_a_token_weight_of_the_wrong_shape_names_itself_and_logp():
    logp, old, adv, _ = inputs()
    with pytest.raises(ShapeError) as err:
        policy_objective(logp, old, adv, MASK, COUNTS, token_weight=torch.ones(2, 3, dtype=D))
    assert str(err.value) == (
        "`token_weight` has shape (2, 3) but `logp` has shape (2, 2); they must match")


def test_a_float64_token_weight_does_not_promote_a_float32_loss():
    """The weight is cast to the surrogate's dtype. Clipped surrogate per token −1.2, −0.5 |
    1.1; weights 2, 1 | 1: token-mean = (−2.4 − 0.5 + 1.1)/3 = −0.6, in float32."""
    logp, old, adv, _ = inputs()
    logp = logp.detach().float().requires_grad_()
    w = t([[2.0, 1.0], [1.0, 1.0]])
    loss, _ = policy_objective(logp, old.float(), adv.float(), MASK, COUNTS,
                               aggregation="token-mean", token_weight=w)
    assert loss.dtype == torch.float32
    assert_close(loss, torch.tensor(-0.6), atol=1e-6, rtol=0)
