"""KL estimators, KL-in-reward shaping and the KL controllers: hand values, expectations
(exact and sampled), loop references, padding invariance, controller rules and errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from posttrain.algos import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    PPOAdaptiveKLController,
    add_score_at_last_token,
    aggregate_loss,
    kl_estimate,
    kl_penalized_rewards,
    make_kl_controller,
)
from posttrain.errors import ConfigError, ShapeError

D = torch.float64


def t(x):
    return torch.tensor(x, dtype=D)


# ---------------------------------------------------------------------------------------------
# Estimators: hand values


def test_estimators_by_hand():
    # π(a) = 0.5, π_ref(a) = 0.25 -> ρ = π_ref/π = 0.5, log ρ = -ln 2
    #   k1 = -log ρ            = ln 2
    #   k2 = ½ (log ρ)²        = ½ (ln 2)²
    #   k3 = (ρ - 1) - log ρ   = -0.5 + ln 2
    # second entry: π = 0.25, π_ref = 0.75 -> ρ = 3, log ρ = ln 3
    #   k1 = -ln 3, k2 = ½ (ln 3)², k3 = 2 - ln 3
    # third entry: π = π_ref -> ρ = 1, every estimator is 0
    logp = torch.log(t([[0.5, 0.25, 0.3]]))
    ref = torch.log(t([[0.25, 0.75, 0.3]]))
    ln2, ln3 = math.log(2), math.log(3)
    assert_close(kl_estimate(logp, ref, "k1"), t([[ln2, -ln3, 0.0]]), atol=1e-15, rtol=0)
    assert_close(
        kl_estimate(logp, ref, "k2"), t([[0.5 * ln2**2, 0.5 * ln3**2, 0.0]]), atol=1e-15, rtol=0
    )
    assert_close(
        kl_estimate(logp, ref, "k3"), t([[-0.5 + ln2, 2.0 - ln3, 0.0]]), atol=1e-15, rtol=0
    )
    # the default estimator is k1
    assert_close(kl_estimate(logp, ref), kl_estimate(logp, ref, "k1"), atol=0, rtol=0)


def test_k3_is_accurate_near_rho_equal_one():
    # log ρ = x small: k3 = e^x - 1 - x = x²/2 + x³/6 + O(x⁴) = 5e-13 + 1.7e-19 for x = 1e-6.
    # (ρ - 1) by expm1 is exact to an ulp of 1e-6 (2e-22), so k3 keeps a relative error of
    # about 2e-22 / 5e-13 = 4e-10; the naive exp(x) - 1 would be wrong by 1e-16 / 5e-13 ~ 1e-4.
    x = 1e-6
    expected = x**2 / 2 + x**3 / 6
    assert abs(((math.exp(x) - 1) - x) / expected - 1) > 1e-5  # the naive form is not enough
    assert_close(kl_estimate(t([0.0]), t([x]), "k3"), t([expected]), atol=0, rtol=1e-9)


def test_estimators_any_shape_and_registry_names():
    assert KL_ESTIMATORS.names() == ["k1", "k2", "k3"]
    logp = torch.log(t([0.5, 0.25]))
    ref = torch.log(t([0.25, 0.75]))
    assert_close(kl_estimate(logp, ref, "k1"), t([math.log(2), -math.log(3)]), atol=1e-15,
                 rtol=0)
    three_d = kl_estimate(logp.view(1, 2, 1), ref.view(1, 2, 1), "k3")
    assert three_d.shape == (1, 2, 1)


def test_gradients_flow_through_logp_by_hand():
    # With l = log ρ = ref - logp, d/dlogp = -d/dl:
    #   k1 = -l        -> d/dlogp = 1
    #   k2 = ½ l²      -> d/dlogp = -l = logp - ref
    #   k3 = e^l - 1 - l -> d/dlogp = -(e^l - 1) = 1 - ρ
    # π = 0.5, π_ref = 0.25: ρ = 0.5, l = -ln 2 -> grads 1, ln 2, 0.5
    for name, expected in [("k1", 1.0), ("k2", math.log(2)), ("k3", 0.5)]:
        logp = torch.log(t([0.5])).requires_grad_()
        ref = torch.log(t([0.25])).requires_grad_()
        (g, g_ref) = torch.autograd.grad(kl_estimate(logp, ref, name).sum(), (logp, ref))
        assert_close(g, t([expected]), atol=1e-15, rtol=0)
        assert_close(g_ref, -g, atol=1e-15, rtol=0)


# ---------------------------------------------------------------------------------------------
# Estimators: signs


@settings(max_examples=300, deadline=None, database=None)
@given(
    st.floats(min_value=-40.0, max_value=0.0, allow_nan=False),
    st.floats(min_value=-40.0, max_value=0.0, allow_nan=False),
)
def test_k2_and_k3_are_non_negative(logp, ref):
    lp, rf = t([logp]), t([ref])
    assert kl_estimate(lp, rf, "k3").item() >= 0.0
    assert kl_estimate(lp, rf, "k2").item() >= 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_k3_is_non_negative_on_a_big_random_tensor(dtype):
    g = torch.Generator().manual_seed(0)
    # log ρ spread over many scales, including tiny values where rounding matters most
    scale = 10.0 ** torch.randint(-9, 2, (200_000,), generator=g).to(D)
    log_ratio = (torch.randn(200_000, generator=g, dtype=D) * scale).to(dtype)
    zero = torch.zeros_like(log_ratio)
    assert (kl_estimate(zero, log_ratio, "k3") >= 0).all()
    assert (kl_estimate(zero, log_ratio, "k2") >= 0).all()
    # k1 is not: it is negative whenever π_ref(a) > π(a)
    assert (kl_estimate(zero, log_ratio, "k1") < 0).any()


# ---------------------------------------------------------------------------------------------
# Estimators: expectation under a ~ π is KL(π ‖ π_ref) for k1 and k3

P = t([0.4, 0.3, 0.15, 0.1, 0.05])  # policy π
Q = t([0.1, 0.15, 0.2, 0.25, 0.3])  # reference π_ref
KL_PQ = (P * (P / Q).log()).sum()


def test_exact_expectations():
    # E_π[k1] = Σ p log(p/q) = KL;  E_π[k3] = Σ p (q/p - 1) + KL = (Σ q - Σ p) + KL = KL.
    logp, ref = P.log(), Q.log()
    assert_close((P * kl_estimate(logp, ref, "k1")).sum(), KL_PQ, atol=1e-15, rtol=0)
    assert_close((P * kl_estimate(logp, ref, "k3")).sum(), KL_PQ, atol=1e-15, rtol=0)
    # E_π[k2] = ½ Σ p (log p/q)² = 0.5849 is not the KL = 0.5381 here.
    e_k2 = 0.5 * (P * (P / Q).log() ** 2).sum()
    assert_close((P * kl_estimate(logp, ref, "k2")).sum(), e_k2, atol=1e-15, rtol=0)
    assert e_k2 - KL_PQ > 0.04


def test_sampled_expectations():
    n = 1_000_000
    g = torch.Generator().manual_seed(1234)
    a = torch.multinomial(P, n, replacement=True, generator=g)
    logp, ref = P.log()[a], Q.log()[a]
    for name in ("k1", "k3"):
        k = kl_estimate(logp, ref, name)
        se = k.std() / math.sqrt(n)  # standard error of the sample mean
        assert abs(k.mean() - KL_PQ) < 5 * se, (name, k.mean().item(), KL_PQ.item(), se.item())
    # k3 is the low-variance one
    assert kl_estimate(logp, ref, "k3").std() < kl_estimate(logp, ref, "k1").std()
    # k2 is biased: its mean sits near ½ E[(log p/q)²], many standard errors from the KL.
    k2 = kl_estimate(logp, ref, "k2")
    se2 = k2.std() / math.sqrt(n)
    e_k2 = 0.5 * (P * (P / Q).log() ** 2).sum()
    assert abs(k2.mean() - e_k2) < 5 * se2
    assert abs(k2.mean() - KL_PQ) > 50 * se2


# ---------------------------------------------------------------------------------------------
# KL-penalised rewards

KL = t(
    [
        [0.1, 0.2, 0.3, 0.4],
        [0.5, 0.6, 0.7, 0.8],
        [1.0, 2.0, 3.0, 4.0],
        [9.0, 9.0, 9.0, 9.0],
        [0.5, 7.0, 7.0, 7.0],
    ]
)
MASK = torch.tensor(
    [
        [1, 1, 1, 1],  # full row: score at t = 3
        [1, 1, 0, 0],  # right padding, length 2: score at t = 1
        [0, 1, 1, 0],  # left and right padding: score at t = 2
        [0, 0, 0, 0],  # empty row: all zeros
        [1, 0, 0, 0],  # one token: score at t = 0
    ],
    dtype=torch.bool,
)
SCORES = t([1.0, 2.0, 3.0, 4.0, 5.0])
BETA = 0.5
# r_t = -β KL_t on the mask, + R at the last True position, 0 off the mask
EXPECTED = t(
    [
        [-0.05, -0.1, -0.15, -0.2 + 1.0],
        [-0.25, -0.3 + 2.0, 0.0, 0.0],
        [0.0, -1.0, -1.5 + 3.0, 0.0],
        [0.0, 0.0, 0.0, 0.0],
        [-0.25 + 5.0, 0.0, 0.0, 0.0],
    ]
)


def loop_rewards(scores, kl, mask, beta):
    """The spec, one position at a time."""
    b, n = kl.shape
    out = torch.zeros(b, n, dtype=kl.dtype)
    for i in range(b):
        idx = [j for j in range(n) if mask[i, j]]
        for j in idx:
            out[i, j] = -beta * kl[i, j]
        if idx:
            out[i, idx[-1]] += scores[i]
    return out


def test_kl_penalized_rewards_by_hand():
    out = kl_penalized_rewards(SCORES, KL, MASK, BETA)
    assert out.dtype == D
    assert_close(out, EXPECTED, atol=1e-15, rtol=0)
    assert_close(loop_rewards(SCORES, KL, MASK, BETA), EXPECTED, atol=1e-15, rtol=0)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.long, torch.float64, torch.float32])
def test_kl_penalized_rewards_mask_dtypes(mask_dtype):
    out = kl_penalized_rewards(SCORES, KL, MASK.to(mask_dtype), BETA)
    assert_close(out, EXPECTED, atol=1e-15, rtol=0)


def test_kl_penalized_rewards_matches_a_loop_on_random_ragged_masks():
    g = torch.Generator().manual_seed(7)
    b, n = 16, 9
    kl = torch.randn(b, n, generator=g, dtype=D)
    scores = torch.randn(b, generator=g, dtype=D)
    start = torch.randint(0, n, (b,), generator=g)
    length = torch.randint(0, n + 1, (b,), generator=g)
    cols = torch.arange(n)
    mask = (cols >= start[:, None]) & (cols < (start + length)[:, None])
    mask[0] = False  # make sure an empty row is present
    out = kl_penalized_rewards(scores, kl, mask, 0.3)
    assert_close(out, loop_rewards(scores, kl, mask, 0.3), atol=1e-15, rtol=0)


def test_padding_changes_nothing():
    base = kl_penalized_rewards(SCORES, KL, MASK, BETA)
    # Garbage KL values where the mask is False change nothing.
    garbage = torch.where(MASK, KL, t(123456.0))
    assert_close(kl_penalized_rewards(SCORES, garbage, MASK, BETA), base, atol=0, rtol=0)
    # Extra padding columns (on either side) only add zero columns.
    pad = t([[-3.0, 1e6]] * 5)
    wide_kl = torch.cat([pad, KL, pad], dim=1)
    wide_mask = torch.cat([torch.zeros(5, 2, dtype=torch.bool), MASK,
                           torch.zeros(5, 2, dtype=torch.bool)], dim=1)
    wide = kl_penalized_rewards(SCORES, wide_kl, wide_mask, BETA)
    assert_close(wide[:, 2:6], base, atol=0, rtol=0)
    assert (wide[:, :2] == 0).all() and (wide[:, 6:] == 0).all()


def test_splitting_the_batch_changes_nothing():
    base = kl_penalized_rewards(SCORES, KL, MASK, BETA)
    parts = [
        kl_penalized_rewards(SCORES[i : i + 2], KL[i : i + 2], MASK[i : i + 2], BETA)
        for i in range(0, 5, 2)
    ]
    assert_close(torch.cat(parts), base, atol=0, rtol=0)


def test_beta_zero_gives_only_the_score():
    out = kl_penalized_rewards(SCORES, KL, MASK, 0.0)
    expected = torch.zeros(5, 4, dtype=D)
    for i, j in [(0, 3), (1, 1), (2, 2), (4, 0)]:
        expected[i, j] = SCORES[i]
    assert_close(out, expected, atol=0, rtol=0)


def test_add_score_at_last_token_by_hand():
    rewards = t([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 0]], dtype=torch.bool)
    # row 0: last True at t = 2 (a hole at t = 1 does not matter); row 1: no token, unchanged;
    # row 2: last True at t = 1
    out = add_score_at_last_token(rewards, t([10.0, 20.0, 30.0]), mask)
    assert_close(out, t([[1.0, 1.0, 11.0], [1.0, 1.0, 1.0], [1.0, 31.0, 1.0]]), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_score_lands_at_the_last_token_of_long_low_precision_rows(dtype):
    # Responses of 298 and 2050 tokens: the score belongs at index 297 / 2049. bfloat16 holds
    # integers exactly only up to 256 and float16 up to 2048, so positions must not be
    # computed in the rewards' dtype (297 rounds to 296 in bfloat16, 2049 to 2048 in float16).
    n = 2100
    for length in (298, 2050):
        mask = torch.zeros(1, n, dtype=torch.bool)
        mask[0, :length] = True
        out = add_score_at_last_token(torch.zeros(1, n, dtype=dtype), t([1.0]), mask)
        assert out.nonzero().tolist() == [[0, length - 1]], (dtype, length)
        kl = torch.zeros(1, n, dtype=dtype)
        out = kl_penalized_rewards(t([1.0]), kl, mask, 0.1)
        assert out.nonzero().tolist() == [[0, length - 1]], (dtype, length)


# ---------------------------------------------------------------------------------------------
# Controllers


def test_fixed_controller():
    c = FixedKLController(0.05)
    assert c.value == 0.05
    assert c.update(100.0, 256) == 0.05
    assert c.update(0.0, 256) == 0.05
    assert c.value == 0.05


def test_adaptive_controller_sequence_by_hand():
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000.0)
    # KL 9: e = clip(9/6 - 1 = 0.5) = 0.2 -> β = 0.1 · (1 + 0.2 · 256/10000) = 0.1 · 1.00512
    b1 = 0.1 * 1.00512
    assert c.update(9.0, 256) == pytest.approx(b1, rel=1e-15, abs=0)
    # KL 3: e = clip(3/6 - 1 = -0.5) = -0.2 -> β = b1 · (1 - 0.2 · 256/10000) = b1 · 0.99488
    b2 = b1 * 0.99488
    assert c.update(3.0, 256) == pytest.approx(b2, rel=1e-15, abs=0)
    # KL 6.6: e = 6.6/6 - 1 = 0.1 (inside the clip) -> β = b2 · (1 + 0.1 · 512/10000)
    b3 = b2 * 1.00512
    assert c.update(6.6, 512) == pytest.approx(b3, rel=1e-14, abs=0)
    # KL 5.4: e = -0.1 -> β = b3 · (1 - 0.1 · 100/10000) = b3 · 0.999
    b4 = b3 * 0.999
    assert c.update(5.4, 100) == pytest.approx(b4, rel=1e-14, abs=0)
    # KL = target: e = 0, β unchanged
    assert c.update(6.0, 256) == pytest.approx(b4, rel=1e-15, abs=0)
    assert c.value == pytest.approx(b4, rel=1e-15, abs=0)


def test_adaptive_controller_horizon():
    # horizon 1000, n = 500: KL 12 (e = 0.2) -> β = 1 · (1 + 0.2 · 0.5) = 1.1
    c = AdaptiveKLController(1.0, target=6.0, horizon=1000.0)
    assert c.update(12.0, 500) == pytest.approx(1.1, rel=1e-15, abs=0)


def test_ppo_adaptive_controller_three_branches():
    # target 6: below 6/1.5 = 4 halve, above 6·1.5 = 9 double, in [4, 9] keep
    c = PPOAdaptiveKLController(0.2, target=6.0)
    assert c.update(3.9, 256) == 0.1
    assert c.update(9.1, 256) == 0.2
    assert c.update(4.0, 256) == 0.2  # boundary: not below
    assert c.update(9.0, 256) == 0.2  # boundary: not above
    assert c.update(6.0, 256) == 0.2
    assert c.update(100.0, 1) == 0.4
    assert c.update(0.0, 1) == 0.2


@pytest.mark.parametrize(
    "make",
    [
        lambda: FixedKLController(0.3),
        lambda: AdaptiveKLController(0.3, target=6.0, horizon=1000.0),
        lambda: PPOAdaptiveKLController(0.3, target=6.0),
    ],
)
def test_state_dict_round_trip(make):
    a = make()
    for kl in (12.0, 1.0, 12.0):
        a.update(kl, 300)
    b = make()
    b.load_state_dict(a.state_dict())
    assert b.value == a.value
    assert b.update(20.0, 300) == a.update(20.0, 300)
    assert b.update(0.5, 300) == a.update(0.5, 300)


def test_state_dict_of_adaptive_controller_holds_the_updated_value():
    a = AdaptiveKLController(0.1, target=6.0, horizon=10000.0)
    a.update(9.0, 256)
    assert a.state_dict() == {"value": pytest.approx(0.1 * 1.00512, rel=1e-15, abs=0)}


@pytest.mark.parametrize(
    "make",
    [
        lambda: FixedKLController(-0.1),
        lambda: AdaptiveKLController(-0.1, target=6.0),
        lambda: AdaptiveKLController(0.1, target=0.0),
        lambda: AdaptiveKLController(0.1, target=-1.0),
        lambda: AdaptiveKLController(0.1, target=6.0, horizon=0.0),
        lambda: AdaptiveKLController(0.1, target=6.0, horizon=-5.0),
        lambda: PPOAdaptiveKLController(-0.1, target=6.0),
        lambda: PPOAdaptiveKLController(0.1, target=0.0),
    ],
)
def test_invalid_controller_arguments(make):
    with pytest.raises(ConfigError):
        make()


def test_make_kl_controller():
    fixed = make_kl_controller("fixed", 0.2)
    assert type(fixed) is FixedKLController and fixed.value == 0.2
    adaptive = make_kl_controller("adaptive", 0.2, target=6.0, horizon=500.0)
    assert type(adaptive) is AdaptiveKLController
    assert (adaptive.value, adaptive.target, adaptive.horizon) == (0.2, 6.0, 500.0)
    ppo = make_kl_controller("ppo_adaptive", 0.2, target=6.0)
    assert type(ppo) is PPOAdaptiveKLController
    assert (ppo.value, ppo.target) == (0.2, 6.0)


@pytest.mark.parametrize("kind", ["adaptive", "ppo_adaptive"])
def test_make_kl_controller_needs_a_target(kind):
    with pytest.raises(ConfigError, match="kl_target"):
        make_kl_controller(kind, 0.2)


@pytest.mark.parametrize("target", [6.0, None])
def test_make_kl_controller_unknown_kind(target):
    # A typo must be reported as an unknown kind, with or without a target; it must not tell
    # the user to add a KL target.
    with pytest.raises(ConfigError, match="unknown KL controller 'adaptve'"):
        make_kl_controller("adaptve", 0.2, target=target)


# ---------------------------------------------------------------------------------------------
# Errors


def test_unknown_estimator_suggests_the_closest_name():
    with pytest.raises(ConfigError, match="Did you mean 'k3'"):
        kl_estimate(t([0.0]), t([0.0]), "k33")
    # too far from every name for a suggestion, but the known names are listed
    with pytest.raises(ConfigError, match="known: k1, k2, k3"):
        kl_estimate(t([0.0]), t([0.0]), "k4")
    with pytest.raises(ConfigError, match="unknown KL estimator 'k4'"):
        KL_ESTIMATORS.get("k4")


def test_mismatched_logp_and_ref_logp_shapes():
    with pytest.raises(ShapeError, match="`ref_logp` has shape \\(2, 3\\) but `logp`"):
        kl_estimate(torch.zeros(2, 4, dtype=D), torch.zeros(2, 3, dtype=D))


def test_non_float_or_non_tensor_logp():
    with pytest.raises(ShapeError, match="`logp` must be a floating-point tensor"):
        kl_estimate(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4, dtype=D))
    with pytest.raises(ShapeError, match="`logp` must be a torch"):
        kl_estimate([0.0], torch.zeros(1, dtype=D))
    with pytest.raises(ShapeError, match="`ref_logp` must be a torch"):
        kl_estimate(torch.zeros(1, dtype=D), [0.0])


def test_kl_penalized_rewards_shape_errors():
    with pytest.raises(ShapeError, match="`scores` has 4 entries but `kl` has 5 rows"):
        kl_penalized_rewards(SCORES[:4], KL, MASK, BETA)
    with pytest.raises(ShapeError, match="`scores` must have 1 dimensions"):
        kl_penalized_rewards(SCORES[:, None], KL, MASK, BETA)
    with pytest.raises(ShapeError, match="`kl` must have 2 dimensions"):
        kl_penalized_rewards(SCORES, KL[0], MASK, BETA)
    with pytest.raises(ShapeError, match="`kl` must be a floating-point tensor"):
        kl_penalized_rewards(SCORES, KL.long(), MASK, BETA)
    with pytest.raises(ShapeError, match="`response_mask` has shape \\(5, 3\\) but `kl`"):
        kl_penalized_rewards(SCORES, KL, MASK[:, :3], BETA)


# ---------------------------------------------------------------------------------------------
# A mask keeps padding out of the estimator (k3's expm1 overflows on a padding log-prob)


def test_masked_kl_estimate_does_not_overflow_on_padding():
    # float32, one real token and one padding position with log π = -95, log π_ref = 0:
    # log ρ = 95 there and k3 = e^95 - 1 - 95 ≈ 1.8e41 > float32's 3.4e38, so it is inf.
    # Multiplying inf by the 0 of the mask gives NaN; selecting it afterwards still sends
    # 0 · e^95 = NaN into the gradient of expm1. The mask must select log ρ *before* k3.
    f32 = torch.float32
    logp = torch.tensor([[-1.0, -95.0]], dtype=f32, requires_grad=True)
    ref = torch.tensor([[-1.5, 0.0]], dtype=f32)
    mask = torch.tensor([[True, False]])

    # the defect, as the trainer assembled it: the unmasked estimate times the mask is NaN at
    # the pad (inf · 0); the aggregation now selects the pad away, so the value is finite, but
    # the gradient through expm1 at the pad is 0 · e^95 = NaN, whatever comes after
    unmasked = kl_estimate(logp, ref, "k3")
    assert torch.isinf(unmasked[0, 1]) and torch.isnan((unmasked * mask)[0, 1])
    for loss_mat in (unmasked * mask, unmasked):
        bad = aggregate_loss(loss_mat, mask, "token-mean")
        (g_bad,) = torch.autograd.grad(bad, logp, retain_graph=True)
        assert torch.isnan(g_bad[0, 1])

    # with the mask: finite, and equal to the loss of the real token alone
    # (log ρ = -0.5: k3 = e^-0.5 - 1 + 0.5, gradient d/dlogp = 1 - e^-0.5)
    good = aggregate_loss(kl_estimate(logp, ref, "k3", mask=mask), mask, "token-mean")
    (g_good,) = torch.autograd.grad(good, logp)
    alone = logp.detach()[:, :1].clone().requires_grad_(True)
    ref_alone = aggregate_loss(kl_estimate(alone, ref[:, :1], "k3"), mask[:, :1], "token-mean")
    (g_alone,) = torch.autograd.grad(ref_alone, alone)
    assert_close(good, ref_alone, atol=0, rtol=0)
    assert_close(good, torch.tensor(math.exp(-0.5) - 0.5, dtype=f32), atol=1e-7, rtol=0)
    assert_close(g_good, torch.cat([g_alone, torch.zeros(1, 1, dtype=f32)], dim=1), atol=0,
                 rtol=0)
    assert_close(g_good[0, 0], torch.tensor(1 - math.exp(-0.5), dtype=f32), atol=1e-7, rtol=0)


def test_masked_kl_estimate_is_zero_off_the_mask_and_unchanged_on_it():
    logp = torch.log(t([[0.5, 0.25, 0.3]]))
    ref = torch.log(t([[0.25, 0.75, 0.3]]))
    mask = torch.tensor([[1, 0, 1]])
    for name in ("k1", "k2", "k3"):
        full = kl_estimate(logp, ref, name)
        got = kl_estimate(logp, ref, name, mask=mask)
        assert_close(got, full * t([[1.0, 0.0, 1.0]]), atol=0, rtol=0)
    with pytest.raises(ShapeError, match="`mask`"):
        kl_estimate(logp, ref, "k3", mask=mask[:, :2])


# ---------------------------------------------------------------------------------------------
# The controller registry


def test_kl_controllers_are_a_registry_with_needs_target():
    from posttrain.algos import KL_CONTROLLERS

    assert KL_CONTROLLERS.names() == ["adaptive", "fixed", "ppo_adaptive"]
    assert KL_CONTROLLERS.attr("fixed", "needs_target") is False
    assert KL_CONTROLLERS.attr("adaptive", "needs_target") is True
    assert KL_CONTROLLERS.attr("ppo_adaptive", "needs_target") is True
    # each entry builds a controller from (beta, target, horizon)
    c = KL_CONTROLLERS.get("adaptive")(0.3, 6.0, 100.0)
    assert type(c) is AdaptiveKLController and (c.value, c.target, c.horizon) == (0.3, 6.0, 100.0)
    with pytest.raises(ConfigError, match="Did you mean 'ppo_adaptive'"):
        KL_CONTROLLERS.get("ppo-adaptive")
    with pytest.raises(ValueError, match="already registered"):
        KL_CONTROLLERS.register("fixed")(lambda beta, target, horizon: None)


def test_make_kl_controller_builds_a_registered_kind(monkeypatch):
    from posttrain.algos import KL_CONTROLLERS

    monkeypatch.setattr(KL_CONTROLLERS, "_items", dict(KL_CONTROLLERS._items))
    monkeypatch.setattr(KL_CONTROLLERS, "_attrs", dict(KL_CONTROLLERS._attrs))

    class Halving(FixedKLController):
        def update(self, current_kl, n_samples):
            self.value /= 2
            return self.value

    KL_CONTROLLERS.register("test_halving")(lambda beta, target, horizon: Halving(beta))
    c = make_kl_controller("test_halving", 0.4)
    assert c.update(1.0, 1) == 0.2
