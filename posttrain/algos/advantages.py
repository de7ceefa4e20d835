"""Advantage estimators: one registry, one signature.

Every estimator is called as

    advantages, returns = estimator(
        token_rewards,      # (B, T) shaped per-token rewards r_t (score at the last token,
                            #        minus β·KL_t per token when the KL is in the reward)
        response_mask,      # (B, T) True on real response tokens
        values=None,        # (B, T) V(s_t) from the critic, when `needs_values`
        group_ids=None,     # (B,)   which prompt each sample answers, when `needs_groups`
        gamma=1.0,          # discount γ
        lam=1.0,            # GAE λ: a float or a (B,) tensor, one λ per sequence
        critic_lam=None,    # GAE λ of the critic's returns (decoupled GAE); None = `lam`
        eps=1e-6,           # added to the group std (GRPO)
    )

and returns (B, T) advantages (0 off the mask) and (B, T) returns for the critic, or None when
the estimator has no critic. The sequence reward of the group estimators is the masked sum of
`token_rewards`, so a KL penalty in the reward enters R_i at sequence level (RLOO:
R_i − β·Σ_t KL_t) and the token return of REINFORCE++ is R − β·Σ_{i≥t} KL_i.

Each estimator declares `needs_values` and `needs_groups`, so a trainer builds a critic only
when the estimator uses one. Whitening is a separate choice (`whiten_advantages`): the published
REINFORCE++ and REINFORCE++-baseline are `reinforce_pp` / `reinforce_pp_baseline` followed by
global whitening, as their presets configure.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from posttrain.algos._checks import check_float, check_like, check_mask, check_rows, check_tensor
from posttrain.algos.masked import Reduce, masked_whiten
from posttrain.errors import ConfigError, ShapeError
from posttrain.registry import Registry


class AdvantageEstimator(Protocol):
    needs_values: bool
    needs_groups: bool

    def __call__(
        self,
        token_rewards: Tensor,
        response_mask: Tensor,
        *,
        values: Tensor | None = None,
        group_ids: Tensor | None = None,
        gamma: float = 1.0,
        lam: float | Tensor = 1.0,
        critic_lam: float | Tensor | None = None,
        eps: float = 1e-6,
    ) -> tuple[Tensor, Tensor | None]: ...


ADVANTAGE_ESTIMATORS: Registry[AdvantageEstimator] = Registry("advantage estimator")


def register_advantage(
    name: str, *, needs_values: bool = False, needs_groups: bool = False
) -> Callable[[Callable], AdvantageEstimator]:
    def add(fn: Callable) -> AdvantageEstimator:
        fn.needs_values = needs_values  # type: ignore[attr-defined]
        fn.needs_groups = needs_groups  # type: ignore[attr-defined]
        return ADVANTAGE_ESTIMATORS.register(name)(fn)

    return add


def compute_advantages(
    name: str,
    token_rewards: Tensor,
    response_mask: Tensor,
    *,
    values: Tensor | None = None,
    group_ids: Tensor | None = None,
    gamma: float = 1.0,
    lam: float | Tensor = 1.0,
    critic_lam: float | Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor | None]:
    """Look up estimator `name`, check its inputs and run it."""
    est = ADVANTAGE_ESTIMATORS.get(name)
    token_rewards = check_tensor("token_rewards", token_rewards, ndim=2)
    check_float("token_rewards", token_rewards)
    check_mask("response_mask", response_mask, "token_rewards", token_rewards)
    if est.needs_values:
        if values is None:
            raise ShapeError(f"advantage estimator {name!r} needs `values` from a critic")
        check_like("values", values, "token_rewards", token_rewards)
    if est.needs_groups:
        if group_ids is None:
            raise ShapeError(f"advantage estimator {name!r} needs `group_ids` (B,)")
        check_rows("group_ids", group_ids, "token_rewards", token_rewards)
    return est(
        token_rewards, response_mask, values=values, group_ids=group_ids, gamma=gamma,
        lam=lam, critic_lam=critic_lam, eps=eps,
    )


# ---------------------------------------------------------------------------------- λ schedules


def length_adaptive_lambda(response_mask: Tensor, alpha: float = 0.05) -> Tensor:
    """VAPO's per-sequence λ = 1 − 1/(α·l), l = |y|, clamped to [0, 1] (VAPO eq. 7).

    It makes the effective horizon Σ_t λ^t = 1/(1 − λ) = α·l grow with the length.

    Returns:
        (B,) λ in the mask's float dtype (float32 for a bool mask).
    """
    response_mask = check_tensor("response_mask", response_mask, ndim=2)
    if alpha <= 0:
        raise ConfigError(f"length-adaptive GAE needs alpha > 0, got {alpha}")
    dtype = response_mask.dtype if response_mask.is_floating_point() else torch.float32
    lengths = response_mask.to(dtype).sum(-1)
    return (1.0 - 1.0 / (alpha * lengths)).clamp(0.0, 1.0)


def policy_lambda(
    schedule: str, response_mask: Tensor, lam: float = 0.95, alpha: float = 0.05
) -> float | Tensor:
    """The λ of the policy's GAE: `fixed` (the float `lam`) or `length_adaptive` (VAPO)."""
    if schedule == "fixed":
        return lam
    if schedule == "length_adaptive":
        return length_adaptive_lambda(response_mask, alpha)
    raise ConfigError(f"unknown λ schedule {schedule!r}; choose fixed or length_adaptive")


# ---------------------------------------------------------------------------------- helpers


def _per_row(lam: float | Tensor, ref: Tensor, name: str) -> Tensor:
    if isinstance(lam, Tensor):
        lam = check_rows(name, lam, "token_rewards", ref)
        return lam.to(ref.dtype)
    return torch.full((ref.shape[0],), float(lam), dtype=ref.dtype, device=ref.device)


def _gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: Tensor) -> Tensor:
    """GAE (Schulman et al. 2016, eq. 16) over the True positions of each row.

    δ_t = r_t + γ·V(s_{t+1}) − V(s_t),  A_t = δ_t + γλ·A_{t+1},  V(s_{T+1}) = 0.
    "t+1" is the next True position, so padding anywhere in a row changes nothing.
    """
    valid = mask > 0
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(rewards[:, 0])
    columns = []
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        keep = valid[:, t]
        columns.append(torch.where(keep, adv, torch.zeros_like(adv)))
        next_value = torch.where(keep, values[:, t], next_value)
        next_adv = torch.where(keep, adv, next_adv)
    return torch.stack(columns[::-1], dim=1)


def _group_index(group_ids: Tensor, min_size: int) -> tuple[Tensor, Tensor]:
    _, inverse = torch.unique(group_ids, return_inverse=True)
    counts = torch.bincount(inverse)
    if min_size > 1 and int(counts.min()) < min_size:
        raise ShapeError(
            f"every group needs at least {min_size} samples (samples_per_prompt >= {min_size}); "
            f"the smallest group in `group_ids` has {int(counts.min())}"
        )
    return inverse, counts


def group_mean_std(scores: Tensor, group_ids: Tensor, min_size: int = 1) -> tuple[Tensor, Tensor]:
    """Per-sample mean and unbiased std of `scores` (B,) over the samples of its group.

    The std uses Bessel's correction (torch.std), as GRPO implementations do; it is NaN for a
    group of one.
    """
    inverse, counts = _group_index(group_ids, min_size)
    counts = counts.to(scores.dtype)
    sums = torch.zeros_like(counts).index_add_(0, inverse, scores)
    mean = (sums / counts)[inverse]
    sq = torch.zeros_like(counts).index_add_(0, inverse, (scores - mean) ** 2)
    std = (sq / (counts - 1)).sqrt()[inverse]
    return mean, std


def _sequence_scores(token_rewards: Tensor, response_mask: Tensor) -> tuple[Tensor, Tensor]:
    m = response_mask.to(token_rewards.dtype)
    return (token_rewards * m).sum(-1), m


# ---------------------------------------------------------------------------------- estimators


@register_advantage("gae", needs_values=True)
def gae(token_rewards, response_mask, *, values=None, group_ids=None, gamma=1.0, lam=1.0,
        critic_lam=None, eps=1e-6):
    """GAE advantages with λ = `lam` (float or per sequence); returns Ret_t = A_t + V(s_t) from
    GAE with λ = `critic_lam` (decoupled GAE of VC-PPO: critic 1.0, actor 0.95)."""
    m = response_mask.to(token_rewards.dtype)
    values = values.to(token_rewards.dtype)
    adv = _gae(token_rewards, values, m, gamma, _per_row(lam, token_rewards, "lam"))
    if critic_lam is None:
        critic_adv = adv
    else:
        critic_adv = _gae(
            token_rewards, values, m, gamma, _per_row(critic_lam, token_rewards, "critic_lam")
        )
    returns = (critic_adv + values) * m
    return adv, returns


@register_advantage("grpo", needs_groups=True)
def grpo(token_rewards, response_mask, *, values=None, group_ids=None, gamma=1.0, lam=1.0,
         critic_lam=None, eps=1e-6):
    """A_i = (R_i − mean_group(R)) / (std_group(R) + ε) on every token of y_i (Shao et al. 2024)."""
    scores, m = _sequence_scores(token_rewards, response_mask)
    mean, std = group_mean_std(scores, group_ids, min_size=2)
    return ((scores - mean) / (std + eps))[:, None] * m, None


@register_advantage("dr_grpo", needs_groups=True)
def dr_grpo(token_rewards, response_mask, *, values=None, group_ids=None, gamma=1.0, lam=1.0,
            critic_lam=None, eps=1e-6):
    """A_i = R_i − mean_group(R): GRPO without the std division (Liu et al. 2025, "Dr. GRPO")."""
    scores, m = _sequence_scores(token_rewards, response_mask)
    mean, _ = group_mean_std(scores, group_ids, min_size=1)
    return (scores - mean)[:, None] * m, None


@register_advantage("rloo", needs_groups=True)
def rloo(token_rewards, response_mask, *, values=None, group_ids=None, gamma=1.0, lam=1.0,
         critic_lam=None, eps=1e-6):
    """Leave-one-out baseline (Ahmadian et al. 2024):
    A_i = R_i − (1/(K−1))·Σ_{j≠i} R_j = K/(K−1)·(R_i − mean_group(R))."""
    scores, m = _sequence_scores(token_rewards, response_mask)
    inverse, counts = _group_index(group_ids, min_size=2)
    k = counts.to(scores.dtype)[inverse]
    mean, _ = group_mean_std(scores, group_ids, min_size=2)
    return (k / (k - 1) * (scores - mean))[:, None] * m, None


@register_advantage("reinforce_pp")
def reinforce_pp(token_rewards, response_mask, *, values=None, group_ids=None, gamma=1.0,
                 lam=1.0, critic_lam=None, eps=1e-6):
    """REINFORCE++ token return G_t = Σ_{i≥t} γ^{i−t} r_i = R − β·Σ_{i≥t} KL_i for γ = 1
    (Hu 2025). The published method then whitens globally (`whiten_advantages(..., "global")`)."""
    m = response_mask.to(token_rewards.dtype)
    ones = torch.ones(token_rewards.shape[0], dtype=m.dtype, device=m.device)
    return _gae(token_rewards, torch.zeros_like(token_rewards), m, gamma, ones), None


@register_advantage("reinforce_pp_baseline", needs_groups=True)
def reinforce_pp_baseline(token_rewards, response_mask, *, values=None, group_ids=None,
                          gamma=1.0, lam=1.0, critic_lam=None, eps=1e-6):
    """REINFORCE++-baseline: A = R − mean_group(R) (then global whitening, KL as a k2 loss)."""
    return dr_grpo(token_rewards, response_mask, group_ids=group_ids)


# ---------------------------------------------------------------------------------- whitening

WHITEN_MODES = ("none", "group", "global")


def whiten_advantages(
    advantages: Tensor,
    response_mask: Tensor,
    mode: str,
    group_ids: Tensor | None = None,
    eps: float = 1e-8,
    reduce: Reduce | None = None,
) -> Tensor:
    """Whiten (B, T) advantages over the response tokens: `none`, per `group`, or `global`.

    `global` uses the mean and (unbiased) variance of every response token of the batch;
    `reduce` sums the statistics over data-parallel ranks. `group` uses the tokens of the
    sequences that share a group id. Masked-out entries stay 0.
    """
    advantages = check_tensor("advantages", advantages, ndim=2)
    check_float("advantages", advantages)
    m = check_mask("response_mask", response_mask, "advantages", advantages)
    if mode == "none":
        return advantages * m
    if mode == "global":
        return masked_whiten(advantages, m, shift_mean=True, eps=eps, reduce=reduce)
    if mode == "group":
        if group_ids is None:
            raise ShapeError("per-group whitening needs `group_ids` (B,)")
        check_rows("group_ids", group_ids, "advantages", advantages)
        inverse, _ = _group_index(group_ids, min_size=1)
        n_groups = int(inverse.max()) + 1
        zeros = advantages.new_zeros(n_groups)
        count = zeros.index_add(0, inverse, m.sum(-1))
        mean = (zeros.index_add(0, inverse, (advantages * m).sum(-1)) / count.clamp(min=1))
        centred = (advantages - mean[inverse][:, None]) * m
        sq = zeros.index_add(0, inverse, (centred**2).sum(-1))
        var = sq / (count - 1).clamp(min=1)
        return centred * torch.rsqrt(var + eps)[inverse][:, None]
    raise ConfigError(f"unknown whitening mode {mode!r}; choose one of {', '.join(WHITEN_MODES)}")
