"""The sampling engine is not the trainer (ALGORITHMS.md §6c): measure the gap, correct for it.

`μ` is the policy that sampled, as the engine reported it (vLLM's log-probs of the processed
distribution, or a bf16 copy of the policy), `π_old` the trainer's own log-probs of the same
tokens at the same weights, `π_θ` the policy being trained. With `r_t = π_old/μ`:

    mismatch_metrics    k3(μ ‖ π_old) = E_μ[(r − 1) − log r], mean and max |log μ − log π_old|,
                        share of tokens with r outside [low, high]
    none                w_t = 1
    tis                 w_t = min(r_t, C)                          token truncated IS
    seq_is              w = min(exp(Σ_t log r_t), C)               sequence truncated IS
    icepop              w_t = r_t if low ≤ r_t ≤ high else 0       masked IS (IcePop)
    seq_mask            w = 1 if low ≤ exp(mean_t log r_t) ≤ high else 0
    opsm                w = 0 if Â < 0 and mean_t(log μ − log π_θ) > δ else 1
                        (off-policy sequence masking, DeepSeek-V3.2)

A weight multiplies the per-token policy loss and carries no gradient (decoupled PPO: the
clip stays around π_old). With μ = π_old every weight is exactly 1 (`exp(0) = 1`, and
`mean_t(log μ − log π_θ) = 0` on-policy), so every correction is the identity.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from posttrain.algos._checks import check_float, check_like, check_mask, check_tensor
from posttrain.algos.masked import masked_mean, masked_sum
from posttrain.registry import Registry

Correction = Callable[..., Tensor]
"""(log_ratio (B, T) = log π_old − log μ, mask (B, T) float, **params) -> weight (B, T)."""

IS_CORRECTIONS: Registry[Correction] = Registry(
    "importance-sampling correction", attrs={"needs_policy": False})


def _per_sequence(log_ratio: Tensor, mask: Tensor, mean: bool) -> Tensor:
    total = masked_sum(log_ratio, mask, dim=-1)
    if mean:
        total = total / mask.sum(-1).clamp(min=1)
    return total[:, None].expand_as(log_ratio)


@IS_CORRECTIONS.register("none")
def no_correction(log_ratio: Tensor, mask: Tensor) -> Tensor:
    return torch.ones_like(log_ratio)


@IS_CORRECTIONS.register("tis")
def token_tis(log_ratio: Tensor, mask: Tensor, *, is_cap: float = 2.0) -> Tensor:
    return torch.exp(log_ratio).clamp(max=is_cap)


@IS_CORRECTIONS.register("seq_is")
def sequence_is(log_ratio: Tensor, mask: Tensor, *, is_cap: float = 2.0) -> Tensor:
    # the cap is applied to the log (exp of a long sum overflows before min could act)
    cap = torch.log(torch.as_tensor(is_cap, dtype=log_ratio.dtype, device=log_ratio.device))
    return torch.exp(_per_sequence(log_ratio, mask, mean=False).clamp(max=cap))


@IS_CORRECTIONS.register("icepop")
def masked_is(log_ratio: Tensor, mask: Tensor, *, is_low: float = 0.5,
              is_high: float = 2.0) -> Tensor:
    ratio = torch.exp(log_ratio)
    return torch.where((ratio >= is_low) & (ratio <= is_high), ratio, torch.zeros_like(ratio))


@IS_CORRECTIONS.register("seq_mask")
def sequence_mask(log_ratio: Tensor, mask: Tensor, *, is_low: float = 0.5,
                  is_high: float = 2.0) -> Tensor:
    geo = torch.exp(_per_sequence(log_ratio, mask, mean=True))
    return ((geo >= is_low) & (geo <= is_high)).to(log_ratio.dtype)


@IS_CORRECTIONS.register("opsm", needs_policy=True)
def off_policy_sequence_mask(log_ratio: Tensor, mask: Tensor, *, behavior_logp: Tensor,
                             logp: Tensor, advantages: Tensor,
                             opsm_delta: float = 1e-3) -> Tensor:
    drift = _per_sequence(behavior_logp - logp, mask, mean=True)
    negative = masked_sum(advantages, mask, dim=-1)[:, None].expand_as(log_ratio) < 0
    return (~(negative & (drift > opsm_delta))).to(log_ratio.dtype)


def correction_weights(name: str, old_logp: Tensor, behavior_logp: Tensor, mask: Tensor, *,
                       logp: Tensor | None = None, advantages: Tensor | None = None,
                       params: Mapping[str, Any] | None = None) -> Tensor:
    """(B, T) per-token weights of correction `name` (IS_CORRECTIONS), no gradient, 0 on
    padding. `params` holds the numbers of every correction (is_cap, is_low, is_high,
    opsm_delta); each gets those it declares. `logp` (π_θ) and `advantages` are needed by
    corrections registered with `needs_policy`."""
    old_logp = check_tensor("old_logp", old_logp, ndim=2)
    check_float("old_logp", old_logp)
    behavior_logp = check_like("behavior_logp", behavior_logp, "old_logp", old_logp)
    m = check_mask("mask", mask, "old_logp", old_logp)
    fn = IS_CORRECTIONS.get(name)
    sig = inspect.signature(fn).parameters
    kwargs = {k: v for k, v in (params or {}).items() if k in sig and v is not None}
    if IS_CORRECTIONS.attr(name, "needs_policy"):
        if logp is None or advantages is None:
            raise ValueError(f"the {name} correction needs logp and advantages")
        kwargs.update(behavior_logp=torch.where(m != 0, behavior_logp.detach(), 0.0),
                      logp=torch.where(m != 0, logp.detach(), 0.0),
                      advantages=torch.where(m != 0, advantages.detach(), 0.0))
    # padding is selected away first: its log-probs may be anything, even inf
    log_ratio = torch.where(m != 0, (old_logp - behavior_logp).detach(), 0.0)
    weight = fn(log_ratio, m, **kwargs)
    return torch.where(m != 0, weight, torch.zeros_like(weight))


def mismatch_metrics(old_logp: Tensor, behavior_logp: Tensor, mask: Tensor, *,
                     is_low: float = 0.5, is_high: float = 2.0) -> dict[str, Tensor]:
    """How far the sampling engine's log-probs μ are from the trainer's π_old on the sampled
    tokens: mismatch/k3 (k3 estimate of KL(μ ‖ π_old), ≥ 0), mismatch/abs_logp_mean and
    mismatch/abs_logp_max (|log μ − log π_old|), mismatch/outside (share of tokens whose
    ratio π_old/μ is outside [is_low, is_high]). Token means over `mask`."""
    old_logp = check_tensor("old_logp", old_logp, ndim=2)
    check_float("old_logp", old_logp)
    behavior_logp = check_like("behavior_logp", behavior_logp, "old_logp", old_logp)
    m = check_mask("mask", mask, "old_logp", old_logp)
    keep = m != 0
    log_ratio = torch.where(keep, (old_logp - behavior_logp).detach(), 0.0)
    ratio = torch.exp(log_ratio)
    absdiff = log_ratio.abs()
    return {
        "mismatch/k3": masked_mean(torch.expm1(log_ratio) - log_ratio, m),
        "mismatch/abs_logp_mean": masked_mean(absdiff, m),
        "mismatch/abs_logp_max": absdiff.max() if keep.any() else absdiff.new_zeros(()),
        "mismatch/outside": masked_mean(((ratio < is_low) | (ratio > is_high)).to(m.dtype), m),
    }
