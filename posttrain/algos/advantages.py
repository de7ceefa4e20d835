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
R_i − β·Σ_t KL_t) and the token return of REINFORCE++ is R − β·Σ_{i≥t} KL_i. Padding is selected
away (never multiplied), so NaN or inf off the mask reach no output.

Group statistics (mean, std, K) run over the group's *valid* rows only: a row with no counted
token (an `overlong: mask` response, a padding row) has no reward to compare, so it neither
enters its group's baseline nor receives an advantage. A group with fewer than 2 valid rows has
no baseline (the mean of one sample is the sample itself: R − mean = 0, its std and the
leave-one-out mean are undefined), so every row of it gets advantage 0. Every group estimator
needs groups of at least 2 samples (`samples_per_prompt >= 2`); a smaller group is a ShapeError.

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

from posttrain.algos._checks import (
    check_float,
    check_like,
    check_mask,
    check_rows,
    check_tensor,
    select,
)
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


ADVANTAGE_ESTIMATORS: Registry[AdvantageEstimator] = Registry(
    "advantage estimator", attrs={"needs_values": False, "needs_groups": False}
)


def register_advantage(
    name: str, *, needs_values: bool = False, needs_groups: bool = False
) -> Callable[[Callable], AdvantageEstimator]:
    """`ADVANTAGE_ESTIMATORS.register(name, needs_values=..., needs_groups=...)`."""
    return ADVANTAGE_ESTIMATORS.register(
        name, needs_values=needs_values, needs_groups=needs_groups
    )


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


LambdaSchedule = Callable[..., float | Tensor]
"""fn(response_mask (B, T), *, lam, alpha) -> the policy's GAE λ: a float or (B,) per sequence."""

LAMBDA_SCHEDULES: Registry[LambdaSchedule] = Registry("λ schedule")


@LAMBDA_SCHEDULES.register("fixed")
def _fixed_lambda(response_mask: Tensor, *, lam: float, alpha: float) -> float:
    return lam


@LAMBDA_SCHEDULES.register("length_adaptive")
def _length_adaptive_lambda(response_mask: Tensor, *, lam: float, alpha: float) -> Tensor:
    return length_adaptive_lambda(response_mask, alpha)


def policy_lambda(
    schedule: str, response_mask: Tensor, lam: float = 0.95, alpha: float = 0.05
) -> float | Tensor:
    """The λ of the policy's GAE, by the name of a schedule in `LAMBDA_SCHEDULES`: `fixed`
    (the float `lam`) or `length_adaptive` (VAPO, from `alpha`)."""
    return LAMBDA_SCHEDULES.get(schedule)(response_mask, lam=lam, alpha=alpha)


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


def _group_stats(scores: Tensor, inverse: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample mean, unbiased std and count of the valid `scores` of its group.

    The mean is NaN for a group with no valid row, the std NaN for one with fewer than 2.
    """
    n_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    zeros = scores.new_zeros(n_groups)
    scores = select(scores, valid)
    counts = zeros.index_add(0, inverse, valid.to(scores.dtype))
    sums = zeros.index_add(0, inverse, scores)
    nan = torch.full_like(zeros, float("nan"))
    mean = torch.where(counts >= 1, sums / counts.clamp(min=1), nan)
    sq = zeros.index_add(0, inverse, select(scores - mean[inverse], valid) ** 2)
    std = torch.where(counts >= 2, (sq / (counts - 1).clamp(min=1)).sqrt(), nan)
    return mean[inverse], std[inverse], counts[inverse]


def group_mean_std(
    scores: Tensor, group_ids: Tensor, min_size: int = 1, *, valid: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Per-sample mean and unbiased std of `scores` (B,) over the samples of its group.

    Args:
        scores: (B,) one score per sample.
        group_ids: (B,) which prompt each sample answers.
        min_size: the smallest group allowed (a smaller one raises ShapeError).
        valid: (B,) bool, True on the samples that enter the statistics (those with at least
            one counted token). Default: all. An invalid sample's score is never read (NaN is
            fine); it still gets its group's statistics.

    The std uses Bessel's correction (torch.std), as GRPO implementations do; it is NaN for a
    group with fewer than 2 valid samples, and the mean is NaN for a group with none.
    """
    scores = check_tensor("scores", scores, ndim=1)
    check_float("scores", scores)
    group_ids = check_rows("group_ids", group_ids, "scores", scores)
    if valid is None:
        valid = torch.ones_like(scores, dtype=torch.bool)
    else:
        valid = check_like("valid", valid, "scores", scores) != 0
    inverse, _ = _group_index(group_ids, min_size)
    mean, std, _ = _group_stats(scores, inverse, valid)
    return mean, std


def _group_baseline(token_rewards: Tensor, response_mask: Tensor, group_ids: Tensor
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Sequence scores R_i (masked sum of the token rewards) and their group statistics over
    the valid rows. Returns (scores, mean, std, k, rows, keep): `k` the group's number of
    valid rows, `rows` (B,) True where an advantage is defined (a valid row of a group with at
    least 2 valid rows), `keep` the (B, T) bool mask."""
    keep = response_mask != 0
    valid = keep.any(-1)
    scores = select(token_rewards, keep).sum(-1)
    inverse, _ = _group_index(group_ids, min_size=2)
    mean, std, k = _group_stats(scores, inverse, valid)
    rows = valid & (k >= 2)
    # Where no advantage is defined the statistics may be NaN; replace them by harmless numbers
    # so that no NaN enters the arithmetic (nor, by 0/NaN, its gradient) before the selection.
    mean = select(mean, rows)
    std = torch.where(rows, std, torch.ones_like(std))
    k = torch.where(rows, k, torch.full_like(k, 2.0))
    return scores, mean, std, k, rows, keep


def _broadcast_rows(adv: Tensor, rows: Tensor, keep: Tensor) -> Tensor:
    """(B,) sequence advantages on every counted token of the rows where they are defined."""
    return select(adv[:, None].expand_as(keep), keep & rows[:, None])


# ---------------------------------------------------------------------------------- estimators


@register_advantage("gae", needs_values=True)
def gae(token_rewards, response_mask, *, values=None, group_ids=None, gamma=1.0, lam=1.0,
        critic_lam=None, eps=1e-6):
    """GAE advantages with λ = `lam` (float or per sequence); returns Ret_t = A_t + V(s_t) from
    GAE with λ = `critic_lam` (decoupled GAE of VC-PPO: critic 1.0, actor 0.95)."""
    keep = response_mask != 0
    m = keep.to(token_rewards.dtype)
    rewards = select(token_rewards, keep)
    values = select(values.to(token_rewards.dtype), keep)
    adv = _gae(rewards, values, m, gamma, _per_row(lam, token_rewards, "lam"))
    if critic_lam is None:
        critic_adv = adv
    else:
        critic_adv = _gae(
            rewards, values, m, gamma, _per_row(critic_lam, token_rewards, "critic_lam")
        )
    return adv, select(critic_adv + values, keep)


@register_advantage("grpo", needs_groups=True)
def grpo(token_rewards, response_mask, *, values=None, group_ids=None, gamma=1.0, lam=1.0,
         critic_lam=None, eps=1e-6):
    """A_i = (R_i − mean_group(R)) / (std_group(R) + ε) on every token of y_i (Shao et al. 2024),
    the statistics over the group's valid rows."""
    scores, mean, std, _, rows, keep = _group_baseline(token_rewards, response_mask, group_ids)
    return _broadcast_rows((scores - mean) / (std + eps), rows, keep), None


@register_advantage("dr_grpo", needs_groups=True)
def dr_grpo(token_rewards, response_mask, *, values=None, group_ids=None, gamma=1.0, lam=1.0,
            critic_lam=None, eps=1e-6):
    """A_i = R_i − mean_group(R): GRPO without the std division (Liu et al. 2025, "Dr. GRPO")."""
    scores, mean, _, _, rows, keep = _group_baseline(token_rewards, response_mask, group_ids)
    return _broadcast_rows(scores - mean, rows, keep), None


@register_advantage("rloo", needs_groups=True)
def rloo(token_rewards, response_mask, *, values=None, group_ids=None, gamma=1.0, lam=1.0,
         critic_lam=None, eps=1e-6):
    """Leave-one-out baseline (Ahmadian et al. 2024):
    A_i = R_i − (1/(K−1))·Σ_{j≠i} R_j = K/(K−1)·(R_i − mean_group(R)),
    with K the group's number of valid rows."""
    scores, mean, _, k, rows, keep = _group_baseline(token_rewards, response_mask, group_ids)
    return _broadcast_rows(k / (k - 1).clamp(min=1) * (scores - mean), rows, keep), None


@register_advantage("reinforce_pp")
def reinforce_pp(token_rewards, response_mask, *, values=None, group_ids=None, gamma=1.0,
                 lam=1.0, critic_lam=None, eps=1e-6):
    """REINFORCE++ token return G_t = Σ_{i≥t} γ^{i−t} r_i = R − β·Σ_{i≥t} KL_i for γ = 1
    (Hu 2025). The published method then whitens globally (`whiten_advantages(..., "global")`)."""
    keep = response_mask != 0
    m = keep.to(token_rewards.dtype)
    rewards = select(token_rewards, keep)
    ones = torch.ones(token_rewards.shape[0], dtype=m.dtype, device=m.device)
    return _gae(rewards, torch.zeros_like(rewards), m, gamma, ones), None


@register_advantage("reinforce_pp_baseline", needs_groups=True)
def reinforce_pp_baseline(token_rewards, response_mask, *, values=None, group_ids=None,
                          gamma=1.0, lam=1.0, critic_lam=None, eps=1e-6):
    """REINFORCE++-baseline: A = R − mean_group(R) (then global whitening, KL as a k2 loss)."""
    scores, mean, _, _, rows, keep = _group_baseline(token_rewards, response_mask, group_ids)
    return _broadcast_rows(scores - mean, rows, keep), None


# ---------------------------------------------------------------------------------- whitening

Whitening = Callable[..., Tensor]
"""fn(advantages (B, T) already 0 off the mask, keep (B, T) bool, *, group_ids, eps, reduce)
-> (B, T) whitened advantages, 0 off the mask."""

WHITEN_MODES: Registry[Whitening] = Registry("whitening mode", attrs={"needs_groups": False})


@WHITEN_MODES.register("none")
def _whiten_none(advantages, keep, *, group_ids, eps, reduce):
    return advantages


@WHITEN_MODES.register("global")
def _whiten_global(advantages, keep, *, group_ids, eps, reduce):
    """Mean and unbiased variance of every response token of the batch (REINFORCE++);
    `reduce` sums the statistics over data-parallel ranks."""
    return masked_whiten(advantages, keep, shift_mean=True, eps=eps, reduce=reduce)


@WHITEN_MODES.register("group", needs_groups=True)
def _whiten_group(advantages, keep, *, group_ids, eps, reduce):
    """Mean and unbiased variance of the response tokens of the sequences sharing a group id.

    The statistics are over tokens, so a row with no counted token (an overlong response masked
    out) takes no part in them and stays 0. Unlike the group estimators, a group with a single
    valid row is still whitened (over that row's tokens): whitening needs no baseline from
    other samples, and per-group whitening of per-token returns with one sample per prompt is
    a legitimate choice.
    """
    inverse, _ = _group_index(group_ids, min_size=1)
    n_groups = int(inverse.max()) + 1
    m = keep.to(advantages.dtype)
    zeros = advantages.new_zeros(n_groups)
    count = zeros.index_add(0, inverse, m.sum(-1))
    mean = zeros.index_add(0, inverse, advantages.sum(-1)) / count.clamp(min=1)
    centred = select(advantages - mean[inverse][:, None], keep)
    var = zeros.index_add(0, inverse, (centred**2).sum(-1)) / (count - 1).clamp(min=1)
    return select(centred * torch.rsqrt(var + eps)[inverse][:, None], keep)


def whiten_advantages(
    advantages: Tensor,
    response_mask: Tensor,
    mode: str,
    group_ids: Tensor | None = None,
    eps: float = 1e-8,
    reduce: Reduce | None = None,
) -> Tensor:
    """Whiten (B, T) advantages over the response tokens, by a mode in `WHITEN_MODES`: `none`,
    per `group`, or `global`.

    `global` uses the mean and (unbiased) variance of every response token of the batch;
    `reduce` sums the statistics over data-parallel ranks. `group` uses the tokens of the
    sequences that share a group id. Masked-out entries are 0 (and never read).
    """
    advantages = check_tensor("advantages", advantages, ndim=2)
    check_float("advantages", advantages)
    keep = check_mask("response_mask", response_mask, "advantages", advantages) != 0
    whiten = WHITEN_MODES.get(mode)
    if WHITEN_MODES.attr(mode, "needs_groups"):
        if group_ids is None:
            raise ShapeError(f"{mode!r} whitening needs `group_ids` (B,)")
        check_rows("group_ids", group_ids, "advantages", advantages)
    return whiten(select(advantages, keep), keep, group_ids=group_ids, eps=eps, reduce=reduce)
