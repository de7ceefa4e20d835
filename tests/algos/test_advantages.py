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


# ------------------------------------------------------------------- rows with no counted token


def _scored(scores, mask):
    """Token rewards with each score at its row's last position, whether it counts or not, so
    that a masked row's score is garbage the estimator must not read."""
    rewards = torch.zeros(mask.shape, dtype=D)
    rewards[:, -1] = t(scores)
    return rewards


def test_grpo_leaves_a_fully_masked_row_out_of_its_group():
    # The numbers: scores [1, 1, 0, 0] in one group, row 0 an overlong response with
    # `overlong: mask` (every token masked out). The group's statistics are over rows 1-3:
    #   mean = (1 + 0 + 0)/3 = 1/3
    #   unbiased std = sqrt(((2/3)² + (1/3)² + (1/3)²) / 2) = sqrt((6/9)/2) = sqrt(1/3)
    #   A = [0, (1 - 1/3)/(std + ε), (0 - 1/3)/(std + ε), (0 - 1/3)/(std + ε)]
    # (Counting row 0 as a score of 0 gave mean 1/4, std 1/2 and A = [0, 1.5, -0.5, -0.5].)
    mask = torch.ones(4, 3, dtype=torch.bool)
    mask[0] = False
    eps = 1e-6
    adv, _ = compute_advantages("grpo", _scored([1, 1, 0, 0], mask), mask,
                                group_ids=torch.zeros(4), eps=eps)
    std = math.sqrt(1 / 3)
    expected = [0.0, (2 / 3) / (std + eps), (-1 / 3) / (std + eps), (-1 / 3) / (std + eps)]
    assert_close(adv, t(expected)[:, None] * mask, atol=1e-12, rtol=0)


def test_an_all_correct_group_with_one_truncated_row_gives_zero_to_the_others():
    # scores [1, 1, 1] on the valid rows: mean 1, std 0 -> every advantage (1 - 1)/(0 + ε) = 0.
    # (Counting the masked row as 0 gave mean 3/4 and a positive advantage to every row.)
    mask = torch.ones(4, 3, dtype=torch.bool)
    mask[2] = False
    rewards = _scored([1, 1, 1, 1], mask)
    for name in ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"):
        adv, _ = compute_advantages(name, rewards, mask, group_ids=torch.zeros(4))
        assert_close(adv, torch.zeros(4, 3, dtype=D), atol=0, rtol=0, msg=name)


def test_rloo_and_dr_grpo_count_only_the_valid_rows():
    # valid scores [3, 1, 2] (row 3 masked, its garbage score 100 unread): mean 2, K = 3.
    # dr_grpo: R - 2 = [1, -1, 0]; rloo: K/(K-1)·(R - mean) = 1.5·[1, -1, 0]; row 3: 0.
    mask = lengths_mask([2, 3, 1, 0], 3)
    rewards = torch.zeros(4, 3, dtype=D)
    rewards[0, 1], rewards[1, 2], rewards[2, 0], rewards[3, 2] = 3.0, 1.0, 2.0, 100.0
    gid = torch.tensor([5, 5, 5, 5])
    adv, _ = compute_advantages("dr_grpo", rewards, mask, group_ids=gid)
    assert_close(adv, t([1.0, -1.0, 0.0, 0.0])[:, None] * mask, atol=0, rtol=0)
    adv, _ = compute_advantages("rloo", rewards, mask, group_ids=gid)
    assert_close(adv, t([1.5, -1.5, 0.0, 0.0])[:, None] * mask, atol=0, rtol=0)
    # the definition: R_i - mean of the other valid rows: 3 - (1+2)/2 = 1.5, 1 - 2.5 = -1.5
    adv, _ = compute_advantages("reinforce_pp_baseline", rewards, mask, group_ids=gid)
    assert_close(adv, t([1.0, -1.0, 0.0, 0.0])[:, None] * mask, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"])
def test_a_group_with_fewer_than_two_valid_rows_gets_zero(name):
    # Group 0 has one valid row (its other row masked), group 1 none, group 2 two valid rows.
    # With one valid sample there is no baseline (mean = the sample, std and leave-one-out
    # mean undefined): every row of groups 0 and 1 gets 0, group 2 is as usual.
    mask = lengths_mask([2, 0, 0, 0, 2, 2], 2)
    rewards = _scored([5.0, 7.0, 1.0, 2.0, 1.0, 0.0], mask)
    gid = torch.tensor([0, 0, 1, 1, 2, 2])
    adv, _ = compute_advantages(name, rewards, mask, group_ids=gid, eps=0.0)
    assert torch.isfinite(adv).all()
    assert (adv[:4] == 0).all()
    # group 2: scores [1, 0], mean 1/2, unbiased std sqrt(1/2); K = 2
    a = {"grpo": 0.5 / math.sqrt(0.5), "dr_grpo": 0.5, "rloo": 1.0,
         "reinforce_pp_baseline": 0.5}[name]
    assert_close(adv[4:], t([[a, a], [-a, -a]]), atol=1e-15, rtol=0)


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"])
def test_every_group_estimator_refuses_a_group_of_one(name):
    rewards = torch.zeros(3, 2, dtype=D)
    mask = torch.ones(3, 2, dtype=torch.bool)
    with pytest.raises(ShapeError, match="at least 2 samples"):
        compute_advantages(name, rewards, mask, group_ids=torch.tensor([0, 0, 1]))


def test_group_mean_std_over_valid_rows_by_hand():
    scores = t([1.0, 2.0, 10.0, 3.0, 99.0, -4.0])
    gid = torch.tensor([0, 0, 1, 0, 0, 2])
    valid = torch.tensor([True, True, True, True, False, False])
    mean, std = group_mean_std(scores, gid, valid=valid)
    # group 0: valid {1, 2, 3} (99 left out): mean 2, unbiased std 1 — on every row of it,
    # the invalid one included; group 1: {10}: std NaN; group 2: no valid row: mean NaN
    assert_close(mean[[0, 1, 3, 4, 2]], t([2.0, 2.0, 2.0, 2.0, 10.0]), atol=0, rtol=0)
    assert_close(std[[0, 1, 3, 4]], t([1.0, 1.0, 1.0, 1.0]), atol=1e-15, rtol=0)
    assert math.isnan(float(std[2])) and math.isnan(float(mean[5]))
    # without `valid` every row counts: group 0 is {1, 2, 3, 99}
    mean, _ = group_mean_std(scores, gid)
    assert_close(mean[0], t(105 / 4), atol=0, rtol=0)
    with pytest.raises(ShapeError, match="`valid`"):
        group_mean_std(scores, gid, valid=valid[:3])


def test_group_whitening_leaves_a_masked_row_out_and_at_zero():
    # group 0 = rows 0, 1, 2 with row 2 fully masked (garbage 50s); group 1 = row 3 alone.
    # group 0 tokens: 1, 3 | 5 -> mean 3, unbiased var ((-2)² + 0 + 2²)/2 = 4, std 2
    # group 1 tokens: 2, 4 -> mean 3, var 2 (a group with one valid row is still whitened)
    adv = t([[1.0, 3.0], [5.0, 0.0], [50.0, 50.0], [2.0, 4.0]])
    mask = torch.tensor([[1, 1], [1, 0], [0, 0], [1, 1]], dtype=torch.bool)
    w = whiten_advantages(adv, mask, "group", group_ids=torch.tensor([0, 0, 0, 1]), eps=0.0)
    s2 = math.sqrt(2)
    assert_close(w, t([[-1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [-1 / s2, 1 / s2]]), atol=1e-15,
                 rtol=0)


# ---------------------------------------------------------------------------------- registries


def test_whiten_modes_and_lambda_schedules_are_registries():
    from posttrain.algos import LAMBDA_SCHEDULES, WHITEN_MODES

    assert WHITEN_MODES.names() == ["global", "group", "none"]
    assert "group" in WHITEN_MODES and "batch" not in WHITEN_MODES
    assert WHITEN_MODES.attr("group", "needs_groups") is True
    assert WHITEN_MODES.attr("global", "needs_groups") is False
    with pytest.raises(ConfigError, match=r"unknown whitening mode 'grup'.*Did you mean 'group'"):
        WHITEN_MODES.get("grup")
    with pytest.raises(ShapeError, match="needs `group_ids`"):
        whiten_advantages(torch.zeros(2, 2, dtype=D), torch.ones(2, 2), "group")

    assert LAMBDA_SCHEDULES.names() == ["fixed", "length_adaptive"]
    with pytest.raises(ConfigError, match="Did you mean 'length_adaptive'"):
        LAMBDA_SCHEDULES.get("length-adaptive")
    mask = lengths_mask([40, 100], 100)
    assert LAMBDA_SCHEDULES.get("fixed")(mask, lam=0.9, alpha=0.05) == 0.9
    assert_close(LAMBDA_SCHEDULES.get("length_adaptive")(mask, lam=0.9, alpha=0.05),
                 torch.tensor([0.5, 0.8]), atol=1e-7, rtol=0)


def test_register_advantage_declares_its_needs_in_the_registry(monkeypatch):
    from posttrain.algos import register_advantage

    monkeypatch.setattr(ADVANTAGE_ESTIMATORS, "_items", dict(ADVANTAGE_ESTIMATORS._items))
    monkeypatch.setattr(ADVANTAGE_ESTIMATORS, "_attrs", dict(ADVANTAGE_ESTIMATORS._attrs))

    @register_advantage("test_constant", needs_groups=True)
    def constant(token_rewards, response_mask, **_):
        return torch.ones_like(token_rewards), None

    assert ADVANTAGE_ESTIMATORS.attr("test_constant", "needs_groups") is True
    assert ADVANTAGE_ESTIMATORS.attr("test_constant", "needs_values") is False
    assert (constant.needs_values, constant.needs_groups) == (False, True)
    assert ADVANTAGE_ESTIMATORS.attr("gae", "needs_values") is True
    with pytest.raises(ShapeError, match="needs `group_ids`"):
        compute_advantages("test_constant", torch.zeros(1, 1, dtype=D), torch.ones(1, 1))
