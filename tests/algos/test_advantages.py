"""Advantage estimators: hand values, loop references, identities, invariances."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from posttrain.algos import (
    ADVANTAGE_ESTIMATORS,
    compute_advantages,
    group_mean_std,
    kl_penalized_rewards,
    length_adaptive_lambda,
    masked_mean,
    masked_var,
    policy_lambda,
    whiten_advantages,
)
from posttrain.errors import ConfigError, ShapeError

D = torch.float64


def t(x):
    return torch.tensor(x, dtype=D)


def lengths_mask(lengths, width):
    return torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]


# ------------------------------------------------------------------------------------------ GAE


def test_gae_by_hand():
    # Row 0: r = [0, 0, 1], V = [0.5, 0.6, 0.7], γ = 1, λ = 0.9
    #   δ2 = 1 + 0 − 0.7 = 0.3                 A2 = 0.3
    #   δ1 = 0 + 0.7 − 0.6 = 0.1               A1 = 0.1 + 0.9·0.3 = 0.37
    #   δ0 = 0 + 0.6 − 0.5 = 0.1               A0 = 0.1 + 0.9·0.37 = 0.433
    #   returns = A + V = [0.933, 0.97, 1.0]
    rewards = t([[0.0, 0.0, 1.0]])
    values = t([[0.5, 0.6, 0.7]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    adv, ret = compute_advantages("gae", rewards, mask, values=values, gamma=1.0, lam=0.9)
    assert_close(adv, t([[0.433, 0.37, 0.3]]), atol=1e-15, rtol=0)
    assert_close(ret, t([[0.933, 0.97, 1.0]]), atol=1e-15, rtol=0)


def test_gae_by_hand_discounted_with_padding():
    # r = [0.2, 1.0, pad], V = [0.1, 0.3, pad], γ = 0.9, λ = 0.5 (γλ = 0.45)
    #   δ1 = 1.0 + 0.9·0 − 0.3 = 0.7                          A1 = 0.7
    #   δ0 = 0.2 + 0.9·0.3 − 0.1 = 0.37                       A0 = 0.37 + 0.45·0.7 = 0.685
    rewards = t([[0.2, 1.0, 55.0]])  # the padding holds garbage on purpose
    values = t([[0.1, 0.3, -9.0]])
    mask = torch.tensor([[True, True, False]])
    adv, ret = compute_advantages("gae", rewards, mask, values=values, gamma=0.9, lam=0.5)
    assert_close(adv, t([[0.685, 0.7, 0.0]]), atol=1e-15, rtol=0)
    assert_close(ret, t([[0.785, 1.0, 0.0]]), atol=1e-15, rtol=0)


def gae_loop(rewards, values, lengths, gamma, lams):
    """Reference: Python floats, one sequence at a time, positions 0..n-1 real."""
    adv = [[0.0] * rewards.shape[1] for _ in lengths]
    for i, n in enumerate(lengths):
        lam = lams[i]
        running = 0.0
        for s in reversed(range(n)):
            next_v = float(values[i, s + 1]) if s + 1 < n else 0.0
            delta = float(rewards[i, s]) + gamma * next_v - float(values[i, s])
            running = delta + gamma * lam * running
            adv[i][s] = running
    return t(adv)


@pytest.mark.parametrize("gamma", [1.0, 0.97])
def test_gae_ragged_lengths_and_per_sequence_lambda_match_loop(gamma):
    g = torch.Generator().manual_seed(0)
    lengths = [7, 1, 4, 0, 6]
    rewards = torch.randn(5, 7, generator=g, dtype=D)
    values = torch.randn(5, 7, generator=g, dtype=D)
    mask = lengths_mask(lengths, 7)
    lams = t([0.95, 0.5, 1.0, 0.3, 0.0])
    adv, ret = compute_advantages("gae", rewards, mask, values=values, gamma=gamma, lam=lams)
    expected = gae_loop(rewards, values, lengths, gamma, lams.tolist())
    assert_close(adv, expected, atol=1e-14, rtol=0)
    assert_close(ret, (expected + values) * mask, atol=1e-14, rtol=0)


def test_gae_lambda_one_gamma_one_is_reward_to_go_minus_values():
    g = torch.Generator().manual_seed(1)
    lengths = [5, 3, 1]
    mask = lengths_mask(lengths, 5)
    rewards = torch.randn(3, 5, generator=g, dtype=D) * mask
    values = torch.randn(3, 5, generator=g, dtype=D)
    adv, ret = compute_advantages("gae", rewards, mask, values=values, gamma=1.0, lam=1.0)
    reward_to_go = rewards.flip(1).cumsum(1).flip(1)
    assert_close(adv, (reward_to_go - values) * mask, atol=1e-14, rtol=0)
    assert_close(ret, reward_to_go * mask, atol=1e-14, rtol=0)  # Monte-Carlo returns


def test_gae_padding_anywhere_changes_nothing():
    g = torch.Generator().manual_seed(2)
    rewards = torch.randn(2, 4, generator=g, dtype=D)
    values = torch.randn(2, 4, generator=g, dtype=D)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    adv, ret = compute_advantages("gae", rewards, mask, values=values, gamma=0.99, lam=0.9)
    # Left-pad by 2 and right-pad by 3 columns full of garbage.
    width = 9
    big_r = torch.randn(2, width, generator=g, dtype=D)
    big_v = torch.randn(2, width, generator=g, dtype=D)
    big_m = torch.zeros(2, width, dtype=torch.bool)
    big_r[:, 2:6], big_v[:, 2:6], big_m[:, 2:6] = rewards, values, mask
    adv2, ret2 = compute_advantages("gae", big_r, big_m, values=big_v, gamma=0.99, lam=0.9)
    assert_close(adv2[:, 2:6], adv, atol=1e-15, rtol=0)
    assert_close(ret2[:, 2:6], ret, atol=1e-15, rtol=0)
    assert float(adv2[~big_m].abs().sum()) == 0.0


def test_decoupled_gae_uses_critic_lambda_for_returns():
    # VC-PPO: returns from λ_critic = 1 (Monte Carlo), advantages from λ_actor = 0.95.
    g = torch.Generator().manual_seed(3)
    mask = lengths_mask([6, 2], 6)
    rewards = torch.randn(2, 6, generator=g, dtype=D) * mask
    values = torch.randn(2, 6, generator=g, dtype=D)
    adv, ret = compute_advantages(
        "gae", rewards, mask, values=values, gamma=1.0, lam=0.95, critic_lam=1.0
    )
    expected_adv, _ = compute_advantages("gae", rewards, mask, values=values, lam=0.95)
    assert_close(adv, expected_adv, atol=0, rtol=0)
    assert_close(ret, rewards.flip(1).cumsum(1).flip(1) * mask, atol=1e-14, rtol=0)


def test_length_adaptive_lambda():
    # l = 40, α = 0.05: 1 − 1/(0.05·40) = 0.5; l = 100: 0.8; l = 10: 1 − 2 < 0 -> 0; l = 0 -> 0
    mask = lengths_mask([40, 100, 10, 0], 100)
    lam = length_adaptive_lambda(mask, alpha=0.05)
    assert_close(lam, torch.tensor([0.5, 0.8, 0.0, 0.0]), atol=1e-7, rtol=0)
    # identity 1 − 1/(α·l) for a range of lengths where it is in [0, 1]
    lengths = list(range(20, 400, 37))
    lam = length_adaptive_lambda(lengths_mask(lengths, 400).to(D), alpha=0.05)
    assert_close(lam, t([1 - 1 / (0.05 * n) for n in lengths]), atol=1e-15, rtol=0)
    # Σ_t λ^t = 1/(1 − λ) = α·l
    assert_close(1 / (1 - lam), t([0.05 * n for n in lengths]), atol=1e-12, rtol=0)
    assert policy_lambda("fixed", mask, lam=0.9) == 0.9
    assert_close(policy_lambda("length_adaptive", mask), length_adaptive_lambda(mask))
    with pytest.raises(ConfigError, match="length_adaptive"):
        policy_lambda("adaptive", mask)


# ------------------------------------------------------------------------------ group estimators

GROUP_IDS = torch.tensor([3, 7, 3, 7, 3, 9, 9, 7, 3, 9])  # three groups, interleaved


def group_loop(scores, group_ids, fn):
    out = []
    for i in range(len(scores)):
        mates = [float(scores[j]) for j in range(len(scores)) if group_ids[j] == group_ids[i]]
        out.append(fn(float(scores[i]), mates))
    return t(out)


def _std(xs):
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def sequence_batch(seed):
    g = torch.Generator().manual_seed(seed)
    lengths = [5, 2, 4, 1, 3, 5, 2, 3, 1, 4]
    mask = lengths_mask(lengths, 5)
    scores = torch.randn(10, generator=g, dtype=D)
    token_rewards = kl_penalized_rewards(scores, torch.zeros(10, 5, dtype=D), mask, beta=0.0)
    return scores, token_rewards, mask


def test_grpo_by_hand():
    # group rewards [1, 0, 0, 1]: mean 0.5, unbiased std sqrt((4·0.25)/3) = sqrt(1/3)
    # A = ±0.5 / sqrt(1/3) = ±0.5·sqrt(3)
    scores = t([1.0, 0.0, 0.0, 1.0])
    mask = torch.ones(4, 2, dtype=torch.bool)
    rewards = torch.zeros(4, 2, dtype=D)
    rewards[:, -1] = scores
    adv, ret = compute_advantages("grpo", rewards, mask, group_ids=torch.zeros(4), eps=0.0)
    a = 0.5 * math.sqrt(3)
    assert_close(adv, t([[a, a], [-a, -a], [-a, -a], [a, a]]), atol=1e-15, rtol=0)
    assert ret is None


def test_grpo_and_dr_grpo_match_loop_over_interleaved_groups():
    scores, rewards, mask = sequence_batch(4)
    adv, _ = compute_advantages("grpo", rewards, mask, group_ids=GROUP_IDS, eps=1e-6)
    expected = group_loop(scores, GROUP_IDS, lambda r, g: (r - sum(g) / len(g)) / (_std(g) + 1e-6))
    assert_close(adv, expected[:, None] * mask, atol=1e-13, rtol=0)
    adv, _ = compute_advantages("dr_grpo", rewards, mask, group_ids=GROUP_IDS)
    expected = group_loop(scores, GROUP_IDS, lambda r, g: r - sum(g) / len(g))
    assert_close(adv, expected[:, None] * mask, atol=1e-14, rtol=0)


def test_rloo_leave_one_out_equals_k_over_k_minus_one_times_centred():
    scores, rewards, mask = sequence_batch(5)
    adv, _ = compute_advantages("rloo", rewards, mask, group_ids=GROUP_IDS)
    # definition: R_i − mean of the other K−1 rewards
    loo = group_loop(scores, GROUP_IDS, lambda r, g: r - (sum(g) - r) / (len(g) - 1))
    assert_close(adv, loo[:, None] * mask, atol=1e-14, rtol=0)
    # identity: K/(K−1)·(R_i − mean)
    def identity(r, g):
        return len(g) / (len(g) - 1) * (r - sum(g) / len(g))

    ident = group_loop(scores, GROUP_IDS, identity)
    assert_close(adv, ident[:, None] * mask, atol=1e-14, rtol=0)


def test_rloo_with_kl_in_reward_uses_sequence_level_kl():
    # R_i ← R_i − β·Σ_t KL_t. Group of K = 2: A_0 = R'_0 − R'_1.
    # R = [1, 0], KL sums = [0.5 + 0.25, 0.1], β = 0.2:
    #   R' = [1 − 0.15, 0 − 0.02] = [0.85, −0.02];  A = [0.87, −0.87]
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    kl = t([[0.5, 0.25], [0.1, 99.0]])
    rewards = kl_penalized_rewards(t([1.0, 0.0]), kl, mask, beta=0.2)
    adv, _ = compute_advantages("rloo", rewards, mask, group_ids=torch.tensor([0, 0]))
    assert_close(adv, t([[0.87, 0.87], [-0.87, 0.0]]), atol=1e-15, rtol=0)


def test_reinforce_pp_token_return_and_global_whitening():
    # G_t = R − β·Σ_{i≥t} KL_i. R = 2, KL = [0.1, 0.2, 0.3], β = 0.5:
    #   G_2 = 2 − 0.15 = 1.85; G_1 = 2 − 0.25 = 1.75; G_0 = 2 − 0.3 = 1.7
    # second sequence: R = −1, KL = [0.4], G_0 = −1.2
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    kl = t([[0.1, 0.2, 0.3], [0.4, 7.0, 7.0]])
    rewards = kl_penalized_rewards(t([2.0, -1.0]), kl, mask, beta=0.5)
    adv, ret = compute_advantages("reinforce_pp", rewards, mask)
    assert_close(adv, t([[1.7, 1.75, 1.85], [-1.2, 0.0, 0.0]]), atol=1e-15, rtol=0)
    assert ret is None
    # global whitening over the 4 response tokens: mean (1.7+1.75+1.85−1.2)/4 = 1.025
    w = whiten_advantages(adv, mask, "global", eps=0.0)
    vals = [1.7, 1.75, 1.85, -1.2]
    m = sum(vals) / 4
    s = math.sqrt(sum((v - m) ** 2 for v in vals) / 3)
    assert_close(w, t([[(1.7 - m) / s, (1.75 - m) / s, (1.85 - m) / s], [(-1.2 - m) / s, 0, 0]]),
                 atol=1e-14, rtol=0)


def test_reinforce_pp_baseline_is_group_centred_then_globally_whitened():
    scores, rewards, mask = sequence_batch(6)
    adv, _ = compute_advantages("reinforce_pp_baseline", rewards, mask, group_ids=GROUP_IDS)
    centred = group_loop(scores, GROUP_IDS, lambda r, g: r - sum(g) / len(g))
    assert_close(adv, centred[:, None] * mask, atol=1e-14, rtol=0)
    w = whiten_advantages(adv, mask, "global", eps=0.0)
    assert_close(masked_mean(w, mask), t(0.0), atol=1e-14, rtol=0)
    assert_close(masked_var(w, mask), t(1.0), atol=1e-14, rtol=0)


def test_group_whitening_matches_loop():
    g = torch.Generator().manual_seed(7)
    adv = torch.randn(10, 5, generator=g, dtype=D)
    mask = lengths_mask([5, 2, 4, 1, 3, 5, 2, 3, 1, 4], 5)
    w = whiten_advantages(adv, mask, "group", group_ids=GROUP_IDS, eps=0.0)
    expected = torch.zeros_like(adv)
    for gid in GROUP_IDS.unique():
        rows = GROUP_IDS == gid
        vals = [float(v) for v in adv[rows][mask[rows]]]
        m, s = sum(vals) / len(vals), _std(vals)
        expected[rows] = (adv[rows] - m) / s * mask[rows]
    assert_close(w, expected, atol=1e-13, rtol=0)
    assert_close(whiten_advantages(adv, mask, "none"), adv * mask, atol=0, rtol=0)


def test_group_mean_std_by_hand():
    mean, std = group_mean_std(t([1.0, 2.0, 10.0, 3.0]), torch.tensor([0, 0, 1, 0]))
    # group 0: {1, 2, 3}: mean 2, unbiased std 1; group 1: {10}: mean 10, std NaN
    assert_close(mean, t([2.0, 2.0, 10.0, 2.0]), atol=0, rtol=0)
    assert_close(std[[0, 1, 3]], t([1.0, 1.0, 1.0]), atol=1e-15, rtol=0)
    assert math.isnan(float(std[2]))


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"])
def test_group_estimators_ignore_padding_and_row_order(name):
    _scores, rewards, mask = sequence_batch(8)
    adv, _ = compute_advantages(name, rewards, mask, group_ids=GROUP_IDS)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    padded = torch.cat([rewards, torch.randn(10, 3, dtype=D)], dim=1)[perm]
    pmask = torch.cat([mask, torch.zeros(10, 3, dtype=torch.bool)], dim=1)[perm]
    adv2, _ = compute_advantages(name, padded, pmask, group_ids=GROUP_IDS[perm])
    assert_close(adv2[:, :5], adv[perm], atol=1e-14, rtol=0)


# ------------------------------------------------------------------------------------ contract


def test_estimators_declare_what_they_need():
    needs = {n: (ADVANTAGE_ESTIMATORS.get(n).needs_values, ADVANTAGE_ESTIMATORS.get(n).needs_groups)
             for n in ADVANTAGE_ESTIMATORS.names()}
    assert needs == {
        "gae": (True, False),
        "grpo": (False, True),
        "dr_grpo": (False, True),
        "rloo": (False, True),
        "reinforce_pp": (False, False),
        "reinforce_pp_baseline": (False, True),
    }


def test_registering_a_name_twice_raises():
    from posttrain.algos import register_advantage

    with pytest.raises(ValueError, match="already registered"):
        register_advantage("gae")(lambda *a, **k: None)


def test_errors():
    rewards = torch.zeros(2, 3, dtype=D)
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ShapeError, match="needs `values`"):
        compute_advantages("gae", rewards, mask)
    with pytest.raises(ShapeError, match="needs `group_ids`"):
        compute_advantages("grpo", rewards, mask)
    with pytest.raises(ShapeError, match="at least 2 samples"):
        compute_advantages("grpo", rewards, mask, group_ids=torch.tensor([0, 1]))
    with pytest.raises(ShapeError, match="`group_ids`"):
        compute_advantages("rloo", rewards, mask, group_ids=torch.tensor([0, 0, 0]))
    with pytest.raises(ShapeError, match="`values`"):
        compute_advantages("gae", rewards, mask, values=torch.zeros(2, 4, dtype=D))
    with pytest.raises(ShapeError, match="`lam`"):
        compute_advantages("gae", rewards, mask, values=rewards, lam=t([0.9, 0.9, 0.9]))
    with pytest.raises(ConfigError, match="Did you mean 'grpo'"):
        compute_advantages("grp0", rewards, mask)
    with pytest.raises(ConfigError, match="whitening"):
        whiten_advantages(rewards, mask, "batch")
