"""Policy, value, entropy and LM losses (ALGORITHMS.md section 3): hand-derived values, a plain
Python loop reference, gradients by autograd, padding invariance and error handling."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from posttrain.algos.logprobs import token_logprobs
from posttrain.algos.masked import aggregate_loss
from posttrain.algos.policy_loss import (
    POLICY_LOSSES,
    clipped_policy_loss,
    entropy_loss,
    explained_variance,
    nll_loss,
    positive_example_mask,
    unclipped_policy_loss,
    value_loss,
)
from posttrain.errors import ConfigError, ShapeError

D = torch.float64
E = math.e


def t(x):
    return torch.tensor(x, dtype=D)


def bmask(x):
    return torch.tensor(x, dtype=torch.bool)


# --------------------------------------------------------------------------------------------
# The four PPO cases plus an in-range token, on one row; row 1 holds an in-range token and
# three masked-out positions whose values would be clipped if they counted.
# old_logp is deliberately not 0 so that only the difference logp - old_logp matters.
OLD = t([[-1.3, -0.7, -2.1, -0.4], [-1.0, -3.0, -0.5, -0.2]])
LOG_RATIO = t([[1.0, -1.0, -1.0, 1.0], [0.0, 1.0, -1.0, 5.0]])
LOGP = OLD + LOG_RATIO
ADV = t([[2.0, 2.0, -2.0, -2.0], [1.5, 2.0, -2.0, 7.0]])
MASK = bmask([[1, 1, 1, 1], [1, 0, 0, 0]])


def test_clipped_policy_loss_by_hand_for_the_four_ppo_cases():
    loss, _ = clipped_policy_loss(LOGP, OLD, ADV, MASK)
    expected = t(
        [
            [
                # A > 0, ratio e (log-ratio 1) > 1.2: clipped ratio 1.2,
                # loss = -min(2e, 2·1.2) = -2.4 (the clip stops the push up)
                -2.4,
                # A > 0, ratio 1/e < 0.8: clipped ratio 0.8,
                # loss = -min(2/e, 2·0.8) = -2/e (the unclipped term wins: no lower clip for A>0)
                -2.0 / E,
                # A < 0, ratio 1/e < 0.8: clipped ratio 0.8,
                # loss = -min(-2/e, -2·0.8) = 1.6 (clipped)
                1.6,
                # A < 0, ratio e > 1.2: clipped ratio 1.2,
                # loss = -min(-2e, -2·1.2) = 2e (the unclipped term wins: no upper clip for A<0)
                2.0 * E,
            ],
            # ratio 1, A = 1.5: inside the trust region, loss = -1.5; the rest is masked out.
            [-1.5, 0.0, 0.0, 0.0],
        ]
    )
    assert_close(loss, expected, atol=1e-12, rtol=0)


def test_clip_higher_does_not_clip_a_ratio_of_1_25_that_the_symmetric_clip_does():
    old = t([[-0.9]])
    logp = old + math.log(1.25)
    adv = t([[1.0]])
    mask = bmask([[1]])
    # eps_high = 0.28: clip(1.25, 0.8, 1.28) = 1.25, loss = -min(1.25, 1.25) = -1.25, no clip.
    loss, metrics = clipped_policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    assert_close(loss, t([[-1.25]]), atol=1e-12, rtol=0)
    assert_close(metrics["policy/clipfrac"], t(0.0), atol=0, rtol=0)
    # eps_high = 0.2: clip(1.25, 0.8, 1.2) = 1.2, loss = -min(1.25, 1.2) = -1.2, clipped.
    loss, metrics = clipped_policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.2)
    assert_close(loss, t([[-1.2]]), atol=1e-12, rtol=0)
    assert_close(metrics["policy/clipfrac"], t(1.0), atol=0, rtol=0)


def test_asymmetric_clip_uses_clip_low_below_and_clip_high_above():
    old = t([[0.0, 0.0]])
    logp = t([[math.log(0.5), math.log(2.0)]])
    adv = t([[-1.0, 1.0]])
    mask = bmask([[1, 1]])
    # clip_low = 0.1, clip_high = 0.5: clip range [0.9, 1.5].
    # A = -1, ratio 0.5: loss = -min(-0.5, -0.9) = 0.9.  A = 1, ratio 2: loss = -min(2, 1.5) = -1.5
    loss, _ = clipped_policy_loss(logp, old, adv, mask, clip_low=0.1, clip_high=0.5)
    assert_close(loss, t([[0.9, -1.5]]), atol=1e-12, rtol=0)


def test_dual_clip_caps_the_loss_of_negative_advantages_at_c_times_abs_a():
    old = t([[-0.5, -0.5, -0.5, -0.5]])
    logp = old + t([[2.0, 1.0, 2.0, -3.0]])
    adv = t([[-1.0, -1.0, 1.0, 2.0]])
    mask = bmask([[1, 1, 1, 1]])
    loss, metrics = clipped_policy_loss(logp, old, adv, mask, dual_clip=3.0)
    expected = t(
        [
            [
                # A = -1, ratio e² ≈ 7.39: PPO loss = -min(-e², -1.2) = e² > 3·|A| = 3 → capped at 3
                3.0,
                # A = -1, ratio e ≈ 2.72: PPO loss e < 3, the dual clip does nothing
                E,
                # A = 1, ratio e²: PPO loss = -min(e², 1.2) = -1.2; the dual clip ignores A > 0
                -1.2,
                # A = 2, ratio e^-3: PPO loss = -min(2e^-3, 1.6) = -2e^-3; a cap -A·c = -6
                # wrongly applied to A > 0 would give -6 here
                -2.0 * math.exp(-3.0),
            ]
        ]
    )
    assert_close(loss, expected, atol=1e-12, rtol=0)
    # the dual clip fires on token 0 only (1/4); the PPO clip (clipped term the larger loss)
    # on token 2 only (1/4): on token 0 the unclipped e² beats the clipped 1.2
    assert_close(metrics["policy/dual_clipfrac"], t(0.25), atol=0, rtol=0)
    assert_close(metrics["policy/clipfrac"], t(0.25), atol=0, rtol=0)


def test_dual_clip_leaves_positive_advantages_unchanged():
    gen = torch.Generator().manual_seed(1)
    old = -torch.rand(3, 5, generator=gen, dtype=D) * 3
    logp = old + torch.randn(3, 5, generator=gen, dtype=D) * 2
    adv = torch.rand(3, 5, generator=gen, dtype=D) + 0.1  # all A > 0
    mask = torch.ones(3, 5, dtype=torch.bool)
    plain, _ = clipped_policy_loss(logp, old, adv, mask)
    dual, metrics = clipped_policy_loss(logp, old, adv, mask, dual_clip=3.0)
    assert_close(dual, plain, atol=0, rtol=0)
    assert_close(metrics["policy/dual_clipfrac"], t(0.0), atol=0, rtol=0)


def test_gradient_is_zero_on_clipped_tokens_and_minus_a_ratio_on_unclipped_ones():
    logp = LOGP.clone().requires_grad_(True)
    loss, _ = clipped_policy_loss(logp, OLD, ADV, MASK)
    loss.sum().backward()
    # d(-A·ratio)/d logp = -A·ratio (d ratio / d logp = ratio); a clipped term is constant.
    expected = t(
        [
            [
                0.0,  # A = 2, ratio e: clipped
                -2.0 / E,  # A = 2, ratio 1/e: unclipped, -A·ratio
                0.0,  # A = -2, ratio 1/e: clipped
                2.0 * E,  # A = -2, ratio e: unclipped, -A·ratio = 2e
            ],
            [-1.5, 0.0, 0.0, 0.0],  # ratio 1: -A; masked positions get no gradient
        ]
    )
    assert_close(logp.grad, expected, atol=1e-12, rtol=0)


def test_dual_clipped_tokens_get_no_gradient():
    old = t([[0.0, 0.0]])
    logp = t([[2.0, 1.0]]).requires_grad_(True)
    adv = t([[-1.0, -1.0]])
    loss, _ = clipped_policy_loss(logp, old, adv, bmask([[1, 1]]), dual_clip=3.0)
    loss.sum().backward()
    # token 0 is capped at the constant 3; token 1 (ratio e, loss e < 3) keeps -A·ratio = e
    assert_close(logp.grad, t([[0.0, E]]), atol=1e-12, rtol=0)


def test_clipped_policy_metrics_by_hand():
    _, metrics = clipped_policy_loss(LOGP, OLD, ADV, MASK)
    # counted tokens: the four of row 0 and the first of row 1 (5 tokens).
    # Clipped term is the larger loss on tokens (0,0) and (0,2): 2/5. The three masked-out
    # tokens of row 1 are all clipped ones ((1,1) A>0 r=e, (1,2) A<0 r=1/e, (1,3) A>0 r=e^5);
    # counting them would give 5/8.
    assert_close(metrics["policy/clipfrac"], t(0.4), atol=1e-15, rtol=0)
    # k3 = (r - 1) - log r: log-ratio 1 → e - 2; log-ratio -1 → 1/e; log-ratio 0 → 0
    k3 = (2 * (E - 2.0) + 2 * (1.0 / E) + 0.0) / 5
    assert_close(metrics["policy/approx_kl"], t(k3), atol=1e-15, rtol=0)
    assert_close(metrics["policy/ratio_mean"], t((2 * E + 2 / E + 1.0) / 5), atol=1e-15, rtol=0)
    assert "policy/dual_clipfrac" not in metrics  # only reported when the dual clip is on
    assert all(not v.requires_grad and v.dim() == 0 for v in metrics.values())


def test_approx_kl_is_zero_on_policy_and_positive_off_policy():
    logp = t([[-1.0, -2.0]])
    _, metrics = clipped_policy_loss(logp, logp.clone(), t([[1.0, -1.0]]), bmask([[1, 1]]))
    assert_close(metrics["policy/approx_kl"], t(0.0), atol=0, rtol=0)
    assert_close(metrics["policy/clipfrac"], t(0.0), atol=0, rtol=0)
    assert_close(metrics["policy/ratio_mean"], t(1.0), atol=0, rtol=0)


def test_masked_positions_do_not_change_the_loss_or_the_metrics():
    # Change every masked-out value to something else entirely: nothing may move.
    other_old = torch.where(MASK, OLD, t(-9.0))
    other_logp = torch.where(MASK, LOGP, t(-0.01))
    other_adv = torch.where(MASK, ADV, t(-50.0))
    for kwargs in ({}, {"dual_clip": 3.0}):
        ref_loss, ref_m = clipped_policy_loss(LOGP, OLD, ADV, MASK, **kwargs)
        loss, m = clipped_policy_loss(other_logp, other_old, other_adv, MASK, **kwargs)
        assert_close(loss, ref_loss, atol=0, rtol=0)
        assert (loss[~MASK] == 0).all()
        assert m.keys() == ref_m.keys()
        for k in m:
            assert_close(m[k], ref_m[k], atol=0, rtol=0)


def test_padding_columns_and_rows_change_nothing():
    gen = torch.Generator().manual_seed(2)
    b, n, pad = 3, 6, 4
    old = -torch.rand(b, n, generator=gen, dtype=D) * 3
    logp = old + torch.randn(b, n, generator=gen, dtype=D)
    adv = torch.randn(b, n, generator=gen, dtype=D)
    mask = torch.rand(b, n, generator=gen) > 0.3
    ref_loss, ref_m = clipped_policy_loss(logp, old, adv, mask, clip_high=0.28, dual_clip=3.0)

    def padded(x, fill):
        x = torch.cat([x, torch.full((b, pad), fill, dtype=x.dtype)], dim=1)
        return torch.cat([x, torch.full((2, n + pad), fill, dtype=x.dtype)], dim=0)

    loss, m = clipped_policy_loss(
        padded(logp, 0.0), padded(old, -7.0), padded(adv, -3.0), padded(mask, False),
        clip_high=0.28, dual_clip=3.0,
    )
    assert_close(loss[:b, :n], ref_loss, atol=0, rtol=0)
    assert (loss[b:] == 0).all() and (loss[:, n:] == 0).all()
    for k in ref_m:
        # extra zeros can only change the summation order, hence the 1e-15
        assert_close(m[k], ref_m[k], atol=1e-15, rtol=0)


def _loop_clipped(logp, old, adv, mask, clip_low, clip_high, dual_clip):
    """The PPO surrogate one token at a time with `math`, for reference."""
    rows, cols = len(logp), len(logp[0])
    loss = [[0.0] * cols for _ in range(rows)]
    n = clipped = dual = 0
    kl = 0.0
    for i in range(rows):
        for j in range(cols):
            if not mask[i][j]:
                continue
            lr = logp[i][j] - old[i][j]
            r, a = math.exp(lr), adv[i][j]
            unclipped_term = -a * r
            clipped_term = -a * min(max(r, 1.0 - clip_low), 1.0 + clip_high)
            ell = max(unclipped_term, clipped_term)
            n += 1
            clipped += clipped_term > unclipped_term
            if a < 0 and ell > -a * dual_clip:
                ell = -a * dual_clip
                dual += 1
            kl += (r - 1.0) - lr
            loss[i][j] = ell
    return loss, clipped / n, dual / n, kl / n, clipped, dual


def test_clipped_policy_loss_matches_a_python_loop_on_random_inputs():
    gen = torch.Generator().manual_seed(0)
    shape = (6, 16)
    old = -torch.rand(shape, generator=gen, dtype=D) * 4
    logp = old + torch.randn(shape, generator=gen, dtype=D) * 0.8
    adv = torch.randn(shape, generator=gen, dtype=D)
    mask = torch.rand(shape, generator=gen) > 0.25
    loss, metrics = clipped_policy_loss(
        logp, old, adv, mask, clip_low=0.2, clip_high=0.28, dual_clip=3.0
    )
    ref, clipfrac, dualfrac, kl, n_clipped, n_dual = _loop_clipped(
        logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 0.2, 0.28, 3.0
    )
    # the random draw exercises every branch
    assert n_clipped > 0 and n_dual > 0
    assert_close(loss, t(ref), atol=1e-12, rtol=0)
    assert_close(metrics["policy/clipfrac"], t(clipfrac), atol=1e-15, rtol=0)
    assert_close(metrics["policy/dual_clipfrac"], t(dualfrac), atol=1e-15, rtol=0)
    assert_close(metrics["policy/approx_kl"], t(kl), atol=1e-12, rtol=0)


# --------------------------------------------------------------------------------------------
def test_unclipped_policy_loss_is_minus_a_ratio_without_any_clip():
    loss, metrics = unclipped_policy_loss(LOGP, OLD, ADV, MASK)
    # -A·ratio: 2·e → -2e, 2·(1/e) → -2/e, -2·(1/e) → 2/e, -2·e → 2e; ratio 1, A 1.5 → -1.5
    expected = t([[-2.0 * E, -2.0 / E, 2.0 / E, 2.0 * E], [-1.5, 0.0, 0.0, 0.0]])
    assert_close(loss, expected, atol=1e-12, rtol=0)
    # same k3 KL as the clipped loss (the metric does not depend on clipping)
    _, clipped_metrics = clipped_policy_loss(LOGP, OLD, ADV, MASK)
    k3 = (2 * (E - 2.0) + 2 * (1.0 / E)) / 5
    assert_close(metrics["policy/approx_kl"], t(k3), atol=1e-15, rtol=0)
    assert_close(metrics["policy/approx_kl"], clipped_metrics["policy/approx_kl"], atol=0, rtol=0)


def test_unclipped_policy_loss_on_policy_is_reinforce():
    # old_logp = logp.detach(): ratio = 1 with d ratio / d logp = 1, so the gradient is -A
    # (REINFORCE: ∇ = -A·∇log π), and the loss value is -A.
    logp = t([[-0.3, -1.7, -2.2], [-0.9, -0.1, -4.0]]).requires_grad_(True)
    adv = t([[1.5, -0.5, 2.0], [-3.0, 0.25, 9.0]])
    mask = bmask([[1, 1, 1], [1, 1, 0]])
    loss, _ = unclipped_policy_loss(logp, logp.detach(), adv, mask)
    assert_close(loss, -adv * mask, atol=0, rtol=0)
    loss.sum().backward()
    assert_close(logp.grad, -adv * mask, atol=0, rtol=0)


def test_registry_maps_names_to_losses_with_one_signature():
    assert POLICY_LOSSES.get("clipped") is clipped_policy_loss
    assert POLICY_LOSSES.get("unclipped") is unclipped_policy_loss
    assert {"clipped", "unclipped"} <= set(POLICY_LOSSES.names())
    # one signature: the clip arguments are accepted by every loss (and ignored by unclipped)
    for name in ("clipped", "unclipped"):
        loss, _ = POLICY_LOSSES.get(name)(
            LOGP, OLD, ADV, MASK, clip_low=0.2, clip_high=0.28, dual_clip=3.0
        )
        assert loss.shape == LOGP.shape
    loss, _ = POLICY_LOSSES.get("unclipped")(LOGP, OLD, ADV, MASK, clip_low=0.0, clip_high=0.0)
    assert_close(loss[0, 0], t(-2.0 * E), atol=1e-12, rtol=0)


def test_unknown_policy_loss_name_raises_config_error_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown policy loss 'cliped'.*Did you mean 'clipped'"):
        POLICY_LOSSES.get("cliped")


def test_registering_a_policy_loss_name_twice_raises():
    with pytest.raises(ValueError, match="already registered"):
        POLICY_LOSSES.register("clipped")(unclipped_policy_loss)
    assert POLICY_LOSSES.get("clipped") is clipped_policy_loss


def test_one_ppo_step_raises_the_logprob_of_positive_advantage_tokens_and_lowers_negative():
    # A softmax policy over V = 4 tokens with independent logits at T = 2 positions, all zero
    # (uniform, log π = log 1/4). Token 0 (label 1) has A = +2, token 1 (label 2) has A = -2.
    logits = nn.Parameter(torch.zeros(1, 2, 4, dtype=D))
    labels = torch.tensor([[1, 2]])
    adv = t([[2.0, -2.0]])
    mask = bmask([[1, 1]])
    old_logp = token_logprobs(logits, labels).detach()
    opt = torch.optim.SGD([logits], lr=1.0)

    loss_mat, _ = clipped_policy_loss(token_logprobs(logits, labels), old_logp, adv, mask)
    loss = aggregate_loss(loss_mat, mask, mode="token-mean")
    # ratio = 1: loss = mean(-A·1) = -(2 - 2)/2 = 0
    assert_close(loss, t(0.0), atol=1e-15, rtol=0)
    opt.zero_grad()
    loss.backward()
    opt.step()

    new_logp = token_logprobs(logits, labels).detach()
    # d loss / d logp_t = -A_t/2 and d logp_t / d z_j = 1[j = y_t] - 1/4, so one step of
    # lr 1 sets z_t = (A_t/2)·(onehot(y_t) - 1/4):
    #   A = +2: z_y = 3/4, others -1/4 → logp = 3/4 - log(e^{3/4} + 3e^{-1/4}) = 1 - log(e + 3)
    #   A = -2: z_y = -3/4, others 1/4 → logp = -3/4 - log(e^{-3/4} + 3e^{1/4}) = -1 - log(1/e + 3)
    expected = t([[1.0 - math.log(E + 3.0), -1.0 - math.log(1.0 / E + 3.0)]])
    assert_close(new_logp, expected, atol=1e-12, rtol=0)
    assert new_logp[0, 0] > old_logp[0, 0]  # log(1/4) ≈ -1.386 → ≈ -0.744
    assert new_logp[0, 1] < old_logp[0, 1]  # log(1/4) ≈ -1.386 → ≈ -2.131


# --------------------------------------------------------------------------------------------
# value_loss with eps_v = 0.25 (dyadic numbers, so the hand values are exact)
V = t([[1.5, 1.5, 0.625, -1.0, 10.0]])
V_OLD = t([[0.5, 0.5, 0.5, 0.0, 0.0]])
RET = t([[3.0, 0.0, 1.0, -2.0, -10.0]])
V_MASK = bmask([[1, 1, 1, 1, 0]])


def test_value_loss_by_hand_in_both_branches():
    loss, metrics = value_loss(V, V_OLD, RET, V_MASK, clip_range=0.25)
    expected = t(
        [
            [
                # V - V_old = 1 → clipped V = 0.75; (1.5-3)² = 2.25 < (0.75-3)² = 5.0625
                # → ½·5.0625 (the clipped term wins)
                2.53125,
                # clipped V = 0.75; (1.5-0)² = 2.25 > (0.75-0)² = 0.5625 → ½·2.25
                1.125,
                # V - V_old = 0.125 inside ±0.25: both terms (0.625-1)² = 0.140625 → ½ of it
                0.0703125,
                # V - V_old = -1 → clipped V = -0.25; (-1+2)² = 1 < (-0.25+2)² = 3.0625
                # → ½·3.0625
                1.53125,
                0.0,  # masked out
            ]
        ]
    )
    assert_close(loss, expected, atol=0, rtol=0)
    # clipped term strictly larger on tokens 0 and 3 of the 4 counted ones (the masked token
    # would be clipped too)
    assert_close(metrics["value/clipfrac"], t(0.5), atol=0, rtol=0)
    # masked means: (1.5 + 1.5 + 0.625 - 1)/4 and (3 + 0 + 1 - 2)/4
    assert_close(metrics["value/mean"], t(0.65625), atol=0, rtol=0)
    assert_close(metrics["value/returns_mean"], t(0.5), atol=0, rtol=0)
    # Var(Ret) = 13/3 (mean 0.5, squared deviations 6.25 + 0.25 + 0.25 + 6.25);
    # Ret - V = 1.5, -1.5, 0.375, -1 (mean -0.15625): Σ squared deviations = 5.54296875,
    # EV = 1 - (5.54296875/3)/(13/3)
    assert_close(
        metrics["value/explained_variance"], t(1.0 - 5.54296875 / 13.0), atol=1e-15, rtol=0
    )


def test_value_loss_default_clip_range_is_0_2():
    values, old, ret = t([[1.0]]), t([[0.5]]), t([[2.0]])
    # clipped V = 0.5 + 0.2 = 0.7; (1-2)² = 1 < (0.7-2)² = 1.69 → ½·1.69 = 0.845
    loss, _ = value_loss(values, old, ret, bmask([[1]]))
    assert_close(loss, t([[0.845]]), atol=1e-12, rtol=0)


def test_value_loss_without_clipping_is_half_squared_error():
    loss, metrics = value_loss(V, V_OLD, RET, V_MASK, clip_range=None)
    # ½·(V - Ret)²: ½·2.25, ½·2.25, ½·0.140625, ½·1, masked 0
    assert_close(loss, t([[1.125, 1.125, 0.0703125, 0.5, 0.0]]), atol=0, rtol=0)
    assert "value/clipfrac" not in metrics


def test_value_loss_gradient_is_zero_where_the_clipped_term_wins():
    values = V.clone().requires_grad_(True)
    loss, _ = value_loss(values, V_OLD, RET, V_MASK, clip_range=0.25)
    loss.sum().backward()
    # clipped-branch tokens (0, 3) are constant in V; otherwise d ½(V-Ret)² / dV = V - Ret
    assert_close(values.grad, t([[0.0, 1.5, -0.375, 0.0, 0.0]]), atol=0, rtol=0)


def test_explained_variance_by_hand():
    values = t([[1.0, 2.0, 2.0, 5.0, 99.0]])
    returns = t([[1.0, 2.0, 3.0, 4.0, -99.0]])
    mask = bmask([[1, 1, 1, 1, 0]])
    # Ret = 1,2,3,4: mean 2.5, Σ squared deviations 5 → Var = 5/3
    # Ret - V = 0,0,1,-1: mean 0, Σ squared deviations 2 → Var = 2/3
    # EV = 1 - (2/3)/(5/3) = 0.6 (the Bessel factors cancel)
    assert_close(explained_variance(values, returns, mask), t(0.6), atol=1e-15, rtol=0)
    # a perfect prediction explains everything; the constant mean predicts nothing
    assert_close(explained_variance(returns, returns, mask), t(1.0), atol=0, rtol=0)
    assert_close(
        explained_variance(torch.full_like(returns, 2.5), returns, mask), t(0.0), atol=1e-15, rtol=0
    )


def test_explained_variance_shape_error_names_the_returns_argument():
    values = t([[1.0, 2.0, 3.0]])
    mask = bmask([[1, 1, 1]])
    with pytest.raises(ShapeError, match="`returns`"):
        explained_variance(values, t([[1.0], [2.0]]), mask)


# --------------------------------------------------------------------------------------------
def test_entropy_loss_is_minus_entropy_on_the_mask():
    ent = t([[0.5, 1.0, 2.0], [3.0, 0.25, 7.0]]).requires_grad_(True)
    mask = bmask([[1, 1, 0], [1, 1, 0]])
    loss, metrics = entropy_loss(ent, mask)
    assert_close(loss, t([[-0.5, -1.0, 0.0], [-3.0, -0.25, 0.0]]), atol=0, rtol=0)
    # masked mean (0.5 + 1 + 3 + 0.25)/4
    assert_close(metrics["policy/entropy"], t(1.1875), atol=0, rtol=0)
    loss.sum().backward()
    assert_close(ent.grad, -mask.to(D), atol=0, rtol=0)


def test_nll_loss_is_minus_logp_on_the_mask():
    logp = t([[-0.5, -2.0, -7.0]]).requires_grad_(True)
    mask = bmask([[1, 1, 0]])
    loss, metrics = nll_loss(logp, mask)
    assert_close(loss, t([[0.5, 2.0, 0.0]]), atol=0, rtol=0)
    assert_close(metrics["lm/nll"], t(1.25), atol=0, rtol=0)  # (0.5 + 2)/2
    loss.sum().backward()
    assert_close(logp.grad, t([[-1.0, -1.0, 0.0]]), atol=0, rtol=0)


def test_positive_example_mask_keeps_rows_scored_above_the_threshold():
    mask = bmask([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 1, 1]])
    scores = t([1.0, 0.0, -1.0, 0.5])
    # score > 0 (strict): rows 0 and 3; a score equal to the threshold is not positive
    out = positive_example_mask(mask, scores)
    assert out.dtype == torch.bool
    assert torch.equal(out, bmask([[1, 1, 0], [0, 0, 0], [0, 0, 0], [0, 1, 1]]))
    out = positive_example_mask(mask, scores, threshold=0.5)
    assert torch.equal(out, bmask([[1, 1, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]]))
    # a 0/1 integer response mask is accepted and padding stays excluded
    out = positive_example_mask(mask.long(), scores, threshold=-2.0)
    assert torch.equal(out, mask)


# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", [clipped_policy_loss, unclipped_policy_loss])
@pytest.mark.parametrize("which", ["old_logp", "advantages", "response_mask"])
def test_policy_loss_shape_mismatch_names_the_argument(fn, which):
    args = {"old_logp": OLD, "advantages": ADV, "response_mask": MASK}
    args[which] = args[which][:, :3]
    with pytest.raises(ShapeError, match=f"`{which}`"):
        fn(LOGP, args["old_logp"], args["advantages"], args["response_mask"])


def test_policy_loss_rejects_a_non_2d_or_integer_logp():
    with pytest.raises(ShapeError, match="`logp`"):
        clipped_policy_loss(LOGP[0], OLD[0], ADV[0], MASK[0])
    with pytest.raises(ShapeError, match="`logp`"):
        clipped_policy_loss(LOGP.long(), OLD, ADV, MASK)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"clip_low": -0.1},
        {"clip_high": -0.01},
        {"dual_clip": 1.0},
        {"dual_clip": 0.5},
    ],
)
def test_clipped_policy_loss_rejects_bad_clip_settings(kwargs):
    with pytest.raises(ConfigError):
        clipped_policy_loss(LOGP, OLD, ADV, MASK, **kwargs)


@pytest.mark.parametrize("which", ["old_values", "returns", "response_mask"])
def test_value_loss_shape_mismatch_names_the_argument(which):
    args = {"old_values": V_OLD, "returns": RET, "response_mask": V_MASK}
    args[which] = args[which][:, :2]
    with pytest.raises(ShapeError, match=f"`{which}`"):
        value_loss(V, args["old_values"], args["returns"], args["response_mask"])


def test_small_loss_shape_mismatches_name_the_argument():
    with pytest.raises(ShapeError, match="`response_mask`"):
        entropy_loss(t([[1.0, 2.0]]), bmask([[1, 1, 1]]))
    with pytest.raises(ShapeError, match="`loss_mask`"):
        nll_loss(t([[1.0, 2.0]]), bmask([[1], [1]]))
    with pytest.raises(ShapeError, match="`scores`"):
        positive_example_mask(bmask([[1, 1], [1, 0]]), t([1.0, 2.0, 3.0]))
