"""The RL objective as pure functions: tensors and numbers in, `(loss, metrics)` out.

The policy update of the trainer is wiring around `policy_objective` (one call per
micro-batch); the critic's around `value_objective`; PPO-ptx's around `lm_objective`. Every
term states its own aggregation:

    policy_objective =  agg(ℓ_policy)                          the preset's `aggregation`
                      + β · agg(k(π_θ, π_ref))                 same aggregation (KL-in-loss)
                      − c_ent · agg(H(π_θ))                    same aggregation (entropy bonus)
                      + μ · token-mean_{correct y}(−log π_θ)   VAPO's positive-example LM loss
    value_objective  =  agg_v(½·max((V − Ret)², (clip(V) − Ret)²))   its own aggregation
    lm_objective     =  γ · token-mean(−log π_θ)               PPO-ptx, SFT-in-RL

`counts` are those of the whole optimiser step (every micro-batch, every rank), so the
micro-batch results add up to the loss of the step (`aggregate_loss`). The metrics are the
micro-batch's share of step-level means: summed over the step's micro-batches (and ranks) they
give token-weighted means over the step.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import NamedTuple

from torch import Tensor

from posttrain.algos._checks import check_float, check_like, check_mask, check_tensor
from posttrain.algos.kl import kl_estimate
from posttrain.algos.masked import aggregate_loss, masked_mean
from posttrain.algos.policy_loss import POLICY_LOSSES, value_loss

Metrics = dict[str, Tensor]


class StepCounts(NamedTuple):
    """Counts over the whole optimiser step, all micro-batches and ranks."""

    tokens: float  # response tokens that count (the mask's True entries)
    seqs: float  # rows with at least one counted token (`seq-mean-token-mean`)
    rows: float  # every row, empty ones included (`seq-mean-token-sum-norm`, Dr. GRPO)
    norm_len: float | None = None  # the constant of `seq-mean-token-sum-norm` (max length)
    positive_tokens: float = 1.0  # tokens of the responses marked correct (positive LM loss)


def loss_arguments(policy_loss: str, params: Mapping[str, float | None]) -> dict[str, object]:
    """The entries of `params` that the registered policy loss declares as keyword arguments
    (all of them when it takes **kwargs): one config carries the numbers of every loss."""
    fn = POLICY_LOSSES.get(policy_loss)
    sig = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.values()):
        return dict(params)
    return {k: v for k, v in params.items() if k in sig}


def _aggregate(loss_mat: Tensor, mask: Tensor, mode: str, counts: StepCounts) -> Tensor:
    return aggregate_loss(loss_mat, mask, mode, num_tokens=counts.tokens,
                          num_seqs=counts.seqs, norm_len=counts.norm_len, num_rows=counts.rows)


def policy_objective(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    counts: StepCounts,
    *,
    policy_loss: str = "clipped",
    loss_params: Mapping[str, float | None] | None = None,
    aggregation: str = "seq-mean-token-mean",
    ref_logp: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
    positive_mask: Tensor | None = None,
    positive_lm_coef: float = 0.0,
    token_weight: Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """The policy's loss on one micro-batch, as its share of the step's loss.

    Args:
        logp: (B, T) log π_θ(a_t|s_t), with gradient.
        old_logp: (B, T) log π_old(a_t|s_t) (the policy that sampled, or its recomputation).
        advantages: (B, T) A_t.
        response_mask: (B, T) True on the tokens that receive loss.
        counts: the whole step's counts.
        policy_loss: a name in POLICY_LOSSES; `loss_params` holds the numbers of every loss
            (clip_low, clip_high, dual_clip, tau_pos, tau_neg, ...): the loss gets those it
            declares.
        aggregation: a name in the aggregation registry, for the policy, KL and entropy terms.
        ref_logp: (B, T) log π_ref(a_t|s_t); with `kl_coef` > 0 the KL-in-loss term
            β·k(π_θ ‖ π_ref) with estimator `kl_estimator` (gradient through `logp`).
        entropy: (B, T) H(π_θ(·|s_t)) with gradient; with `entropy_coef` > 0 the bonus −c·H.
        positive_mask: (B, T) the response mask of the sequences marked correct; with
            `positive_lm_coef` > 0, μ·NLL over them, token-mean over `counts.positive_tokens`.
        token_weight: (B, T) a weight on each token's policy loss, without gradient: the
            importance correction for a sampling engine that is not the trainer
            (`posttrain.algos.mismatch`); the KL, entropy and LM terms are not weighted.

    Returns:
        the scalar loss and metrics: loss/policy (the total), loss/surrogate, loss/kl,
        loss/entropy, loss/positive_lm (each term's share, as present), kl/ref_loss (the
        estimator's token mean), policy/entropy, and the policy loss's own metrics.
    """
    logp = check_tensor("logp", logp, ndim=2)
    check_float("logp", logp)
    counted = check_mask("response_mask", response_mask, "logp", logp) != 0
    fn = POLICY_LOSSES.get(policy_loss)
    surrogate, loss_metrics = fn(logp, old_logp, advantages, response_mask,
                                 **loss_arguments(policy_loss, loss_params or {}))
    if token_weight is not None:
        weight = check_like("token_weight", token_weight, "logp", logp).detach()
        surrogate = surrogate * weight.to(surrogate.dtype)
    # this micro-batch's share of the step's tokens: metric means become step-level means
    share = counted.sum().to(logp.dtype) / max(float(counts.tokens), 1.0)
    terms = {"surrogate": _aggregate(surrogate, counted, aggregation, counts)}
    metrics: Metrics = {k: v.detach() * share for k, v in loss_metrics.items()}
    if kl_coef:
        if ref_logp is None:
            raise ValueError("a KL-in-loss term (kl_coef > 0) needs ref_logp")
        ref_logp = check_like("ref_logp", ref_logp, "logp", logp).detach()
        # Padding is selected away before the estimator: a pad position whose log-probs are
        # far apart (log π = −95, log π_ref = 0) would overflow k3's expm1 to inf, and
        # inf · 0 is NaN.
        kl = kl_estimate(logp, ref_logp, kl_estimator, mask=counted)
        terms["kl"] = kl_coef * _aggregate(kl, counted, aggregation, counts)
        metrics["kl/ref_loss"] = masked_mean(kl.detach(), counted) * share
    if entropy is not None:
        entropy = check_like("entropy", entropy, "logp", logp)
        metrics["policy/entropy"] = masked_mean(entropy.detach(), counted) * share
        if entropy_coef:
            terms["entropy"] = -entropy_coef * _aggregate(entropy, counted, aggregation, counts)
    if positive_lm_coef:
        if positive_mask is None:
            raise ValueError("a positive-example LM term (positive_lm_coef > 0) needs "
                             "positive_mask")
        pos = check_mask("positive_mask", positive_mask, "logp", logp) != 0
        terms["positive_lm"] = positive_lm_coef * aggregate_loss(
            -logp, pos, "token-mean", num_tokens=max(float(counts.positive_tokens), 1.0))
    loss = sum(terms.values())
    metrics["loss/policy"] = loss.detach()
    metrics.update({f"loss/{k}": v.detach() for k, v in terms.items()})
    return loss, metrics


def value_objective(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    response_mask: Tensor,
    counts: StepCounts,
    *,
    clip_range: float | None = 0.2,
    aggregation: str = "token-mean",
) -> tuple[Tensor, Metrics]:
    """The critic's clipped value loss on one micro-batch, as its share of the step's.

    Args:
        values: (B, T) V(s_t) of the critic being trained, with gradient.
        old_values: (B, T) V(s_t) recorded at rollout time (the clip's centre).
        returns: (B, T) the regression targets Ret_t.
        response_mask: (B, T) True on the tokens that count.
        counts: the whole step's counts.
        clip_range: ε_v (None: unclipped).
        aggregation: how the per-token value loss becomes a scalar (its own choice, not
            necessarily the policy's).

    Returns:
        the scalar loss and metrics loss/value, value/clipfrac (step share).
    """
    values = check_tensor("values", values, ndim=2)
    counted = check_mask("response_mask", response_mask, "values", values) != 0
    mat, vm = value_loss(values, old_values, returns, response_mask, clip_range)
    loss = _aggregate(mat, counted, aggregation, counts)
    share = counted.sum().to(values.dtype) / max(float(counts.tokens), 1.0)
    metrics = {"loss/value": loss.detach()}
    if "value/clipfrac" in vm:
        metrics["value/clipfrac"] = vm["value/clipfrac"] * share
    return loss, metrics


def lm_objective(logp: Tensor, loss_mask: Tensor, num_tokens: float, coef: float = 1.0
                 ) -> tuple[Tensor, Metrics]:
    """coef · token-mean NLL over the step's `num_tokens` target tokens (PPO-ptx's γ_ptx term,
    SFT-in-RL). `logp` (B, T) are the target tokens' log-probs with gradient, `loss_mask`
    (B, T) True on the targets."""
    logp = check_tensor("logp", logp, ndim=2)
    mask = check_mask("loss_mask", loss_mask, "logp", logp) != 0
    loss = coef * aggregate_loss(-logp, mask, "token-mean", num_tokens=max(num_tokens, 1.0))
    return loss, {"loss/ptx": loss.detach()}
