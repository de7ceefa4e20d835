"""Per-token policy and value losses. Aggregation into a scalar is `masked.aggregate_loss`.

Every loss here returns `(loss_mat, metrics)`: a (B, T) per-token loss (0 off the mask) and a
dict of detached 0-dim tensors with namespaced keys. Metrics are masked means over this batch;
nothing calls `.item()`, so no device sync happens here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from posttrain.algos._checks import check_float, check_like, check_mask, check_rows, check_tensor
from posttrain.algos.masked import masked_mean, masked_var
from posttrain.errors import ConfigError
from posttrain.registry import Registry

Metrics = dict[str, Tensor]
PolicyLoss = Callable[..., tuple[Tensor, Metrics]]

POLICY_LOSSES: Registry[PolicyLoss] = Registry("policy loss")


def _check_policy_inputs(logp, old_logp, advantages, response_mask):
    logp = check_tensor("logp", logp, ndim=2)
    check_float("logp", logp)
    old_logp = check_like("old_logp", old_logp, "logp", logp)
    advantages = check_like("advantages", advantages, "logp", logp)
    m = check_mask("response_mask", response_mask, "logp", logp)
    return old_logp.detach(), advantages.detach(), m


@POLICY_LOSSES.register("clipped")
def clipped_policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
) -> tuple[Tensor, Metrics]:
    """PPO's clipped surrogate with asymmetric clipping ("clip-higher", DAPO / VAPO).

        ratio = exp(log π_θ − log π_old)
        ℓ_t   = −min(ratio·A, clip(ratio, 1 − ε_low, 1 + ε_high)·A)
        dual clip (Ye et al. 2020), for A < 0 only:  ℓ_t = min(ℓ_t, c·|A|)

    Args:
        logp: (B, T) log π_θ(a_t|s_t), with gradient.
        old_logp: (B, T) log π_old(a_t|s_t), recorded at rollout time.
        advantages: (B, T) A_t.
        response_mask: (B, T) True on tokens that receive loss.
        clip_low, clip_high: ε_low and ε_high (0.2 / 0.2; clip-higher uses ε_high = 0.28).
        dual_clip: c > 1 to enable the dual clip (3.0 in the paper), None to disable.

    Metrics: policy/clipfrac (tokens where the clipped term is the larger loss), policy/
    dual_clipfrac, policy/approx_kl (k3 estimate of KL(π_old ‖ π_θ)), policy/ratio_mean.
    """
    old_logp, advantages, m = _check_policy_inputs(logp, old_logp, advantages, response_mask)
    if clip_low < 0 or clip_high < 0:
        raise ConfigError(f"clip ranges must be >= 0, got low={clip_low}, high={clip_high}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ConfigError(f"dual_clip must be > 1 (the paper uses 3), got {dual_clip}")
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    metrics: Metrics = {"policy/clipfrac": masked_mean((clipped > unclipped).to(m.dtype), m)}
    if dual_clip is not None:
        cap = -advantages * dual_clip  # = c·|A| where A < 0
        dual = (advantages < 0) & (loss > cap)
        loss = torch.where(advantages < 0, torch.minimum(loss, cap), loss)
        metrics["policy/dual_clipfrac"] = masked_mean(dual.to(m.dtype), m)
    with torch.no_grad():
        metrics["policy/approx_kl"] = masked_mean(torch.expm1(log_ratio) - log_ratio, m)
        metrics["policy/ratio_mean"] = masked_mean(ratio, m)
    return loss * m, {k: v.detach() for k, v in metrics.items()}


@POLICY_LOSSES.register("unclipped")
def unclipped_policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
) -> tuple[Tensor, Metrics]:
    """ℓ_t = −ratio·A. With one on-policy epoch (ratio = 1, gradient ∇log π) this is REINFORCE,
    as RLOO uses it; the clip arguments are accepted for the shared signature and ignored."""
    old_logp, advantages, m = _check_policy_inputs(logp, old_logp, advantages, response_mask)
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    with torch.no_grad():
        metrics = {
            "policy/approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, m),
            "policy/ratio_mean": masked_mean(ratio, m),
        }
    return -advantages * ratio * m, metrics


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    response_mask: Tensor,
    clip_range: float | None = 0.2,
) -> tuple[Tensor, Metrics]:
    """Clipped value loss ½·max((V − Ret)², (clip(V, V_old ± ε_v) − Ret)²) per token.

    Args:
        values: (B, T) V(s_t) of the critic being trained.
        old_values: (B, T) V(s_t) recorded at rollout time.
        returns: (B, T) regression targets Ret_t.
        response_mask: (B, T) True on tokens that count.
        clip_range: ε_v; None disables clipping (½·(V − Ret)²).

    Metrics: value/clipfrac, value/explained_variance (of `values` for `returns`),
    value/mean, value/returns_mean.
    """
    values = check_tensor("values", values, ndim=2)
    check_float("values", values)
    old_values = check_like("old_values", old_values, "values", values).detach()
    returns = check_like("returns", returns, "values", values).detach()
    m = check_mask("response_mask", response_mask, "values", values)
    unclipped = (values - returns) ** 2
    metrics: Metrics = {}
    if clip_range is None:
        loss = 0.5 * unclipped
    else:
        v_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
        clipped = (v_clipped - returns) ** 2
        loss = 0.5 * torch.maximum(unclipped, clipped)
        metrics["value/clipfrac"] = masked_mean((clipped > unclipped).to(m.dtype), m).detach()
    metrics["value/explained_variance"] = explained_variance(values.detach(), returns, m)
    metrics["value/mean"] = masked_mean(values.detach(), m)
    metrics["value/returns_mean"] = masked_mean(returns, m)
    return loss * m, metrics


def explained_variance(values: Tensor, returns: Tensor, response_mask: Tensor) -> Tensor:
    """1 − Var(Ret − V) / Var(Ret) over the masked tokens (1 is perfect, 0 is a constant
    predictor, negative is worse than a constant). NaN when the returns have no variance."""
    values = check_tensor("values", values, ndim=2)
    returns = check_like("returns", returns, "values", values)
    m = check_mask("response_mask", response_mask, "values", values)
    var_ret = masked_var(returns, m)
    return 1.0 - masked_var(returns - values, m) / var_ret


def entropy_loss(entropy: Tensor, response_mask: Tensor) -> tuple[Tensor, Metrics]:
    """−H(π(·|s_t)) per token: adding `c_ent ·` this to the loss is the entropy bonus.

    Args:
        entropy: (B, T) entropy per position (`token_logprobs_and_entropy`), with gradient.
        response_mask: (B, T) True on tokens that count.
    """
    entropy = check_tensor("entropy", entropy, ndim=2)
    m = check_mask("response_mask", response_mask, "entropy", entropy)
    return -entropy * m, {"policy/entropy": masked_mean(entropy.detach(), m)}


def nll_loss(logp: Tensor, loss_mask: Tensor) -> tuple[Tensor, Metrics]:
    """−log π(a_t|s_t) per token: the language-model loss of PPO-ptx (pretraining text),
    SFT-in-RL and VAPO's positive-example LM loss.

    Args:
        logp: (B, T) log-probs of the target tokens, with gradient.
        loss_mask: (B, T) True on tokens that receive the loss.
    """
    logp = check_tensor("logp", logp, ndim=2)
    m = check_mask("loss_mask", loss_mask, "logp", logp)
    return -logp * m, {"lm/nll": masked_mean(-logp.detach(), m)}


def positive_example_mask(
    response_mask: Tensor, scores: Tensor, threshold: float = 0.0
) -> Tensor:
    """The response mask restricted to the sequences whose score is > `threshold` (those the
    reward marks correct), for VAPO's positive-example LM loss. Returns a bool (B, T) mask."""
    response_mask = check_tensor("response_mask", response_mask, ndim=2)
    scores = check_rows("scores", scores, "response_mask", response_mask)
    return response_mask.bool() & (scores > threshold)[:, None]
