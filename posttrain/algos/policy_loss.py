"""Per-token policy and value losses. Aggregation into a scalar is `masked.aggregate_loss`.

Every policy loss in `POLICY_LOSSES` has one signature:

    loss_mat, metrics = fn(
        logp,            # (B, T) log π_θ(a_t|s_t), with gradient
        old_logp,        # (B, T) log π_old(a_t|s_t), recorded at rollout time
        advantages,      # (B, T) Â_t
        response_mask,   # (B, T) True on tokens that receive loss
        *,               # then only the keyword parameters the loss uses, with defaults,
                         # out of: clip_low, clip_high, dual_clip, tau_pos, tau_neg
    )

and returns a (B, T) per-token loss (0 off the mask) and a dict of detached 0-dim tensors with
namespaced keys. A trainer passes a loss only the keyword parameters it declares
(`inspect.signature`). Metrics are masked means over this batch; nothing calls `.item()`, so no
device sync happens here. Padding is selected away before any non-linear step (STYLE habit
14): NaN or inf off the mask reach neither the loss nor the gradient.

Each loss declares `needs_off_policy`: True for a loss whose ratio is exactly 1 on the data of
one on-policy update, so that it degenerates (GSPO); a trainer refuses such a config.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from posttrain.algos._checks import (
    check_float,
    check_keep,
    check_like,
    check_rows,
    check_tensor,
    select,
)
from posttrain.algos.masked import masked_mean, masked_var
from posttrain.errors import ConfigError
from posttrain.registry import Registry

Metrics = dict[str, Tensor]
PolicyLoss = Callable[..., tuple[Tensor, Metrics]]

POLICY_LOSSES: Registry[PolicyLoss] = Registry(
    "policy loss", attrs={"needs_off_policy": False}
)


def _check_policy_inputs(logp, old_logp, advantages, response_mask):
    """Checked inputs with padding selected to 0: logp (with gradient), old_logp and
    advantages (detached), the bool mask and the same mask as 0/1 floats."""
    logp = check_tensor("logp", logp, ndim=2)
    check_float("logp", logp)
    old_logp = check_like("old_logp", old_logp, "logp", logp)
    advantages = check_like("advantages", advantages, "logp", logp)
    keep = check_keep("response_mask", response_mask, "logp", logp)
    m = keep.to(logp.dtype)
    return (select(logp, keep), select(old_logp.detach(), keep),
            select(advantages.detach(), keep), keep, m)


def _check_clip(clip_low: float, clip_high: float) -> None:
    if clip_low < 0 or clip_high < 0:
        raise ConfigError(f"clip ranges must be >= 0, got low={clip_low}, high={clip_high}")


def _ratio_metrics(log_ratio: Tensor, m: Tensor) -> Metrics:
    """policy/approx_kl (k3 estimate of KL(π_old ‖ π_θ)) and policy/ratio_mean."""
    with torch.no_grad():
        return {
            "policy/approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, m),
            "policy/ratio_mean": masked_mean(torch.exp(log_ratio), m),
        }


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
    logp, old_logp, advantages, keep, m = _check_policy_inputs(
        logp, old_logp, advantages, response_mask)
    _check_clip(clip_low, clip_high)
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
    metrics.update(_ratio_metrics(log_ratio, m))
    return select(loss, keep), {k: v.detach() for k, v in metrics.items()}


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
    logp, old_logp, advantages, keep, m = _check_policy_inputs(
        logp, old_logp, advantages, response_mask)
    log_ratio = logp - old_logp
    return select(-advantages * torch.exp(log_ratio), keep), _ratio_metrics(log_ratio, m)


def _sequence_ratio(log_ratio: Tensor, advantages: Tensor, m: Tensor
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """GSPO's s_i = exp(mean_t log r_{i,t}) (B,), Â_i = the masked mean of the advantages row
    (constant per row for the group estimators) and the (B,) rows with a counted token.
    `log_ratio` and `advantages` are 0 off the mask."""
    n = m.sum(-1)
    rows = n > 0
    seq_log_ratio = log_ratio.sum(-1) / n.clamp(min=1)
    return torch.exp(seq_log_ratio), advantages.sum(-1) / n.clamp(min=1), rows


@POLICY_LOSSES.register("gspo", needs_off_policy=True)
def gspo_policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
) -> tuple[Tensor, Metrics]:
    """Group Sequence Policy Optimization (Zheng et al. 2025, arXiv 2507.18071): the
    importance ratio and its clip are taken per sequence, not per token.

        s_i = (π_θ(y_i|x) / π_old(y_i|x))^{1/|y_i|} = exp(mean_t log r_{i,t})
        ℓ_i = −min(s_i·Â_i, clip(s_i, 1 − ε_low, 1 + ε_high)·Â_i)

    Â_i is the masked mean of row i of `advantages` (the group estimators give one value per
    row). The returned (B, T) matrix holds ℓ_i on every counted token of row i, so that
    `aggregate_loss(..., "seq-mean-token-mean")` yields mean_i ℓ_i, the paper's objective; a
    `token-mean` aggregation would instead weigh each sequence by its length.

    The ratio of a sequence is exactly 1 on the policy that sampled it, so a single on-policy
    update learns nothing GSPO-specific (the loss declares `needs_off_policy`): use at least 2
    mini-batches or epochs. ε defaults are the paper's 3e-4 / 4e-4 (a sequence ratio moves far
    less than a token ratio).

    Metrics: policy/clipfrac (share of sequences whose clipped term is the larger loss),
    policy/seq_ratio_mean (mean s_i over the sequences), policy/approx_kl (token k3).
    """
    logp, old_logp, advantages, keep, m = _check_policy_inputs(
        logp, old_logp, advantages, response_mask)
    _check_clip(clip_low, clip_high)
    log_ratio = logp - old_logp
    seq_ratio, seq_adv, rows = _sequence_ratio(log_ratio, advantages, m)
    unclipped = -seq_adv * seq_ratio
    clipped = -seq_adv * torch.clamp(seq_ratio, 1.0 - clip_low, 1.0 + clip_high)
    seq_loss = torch.maximum(unclipped, clipped)
    with torch.no_grad():
        metrics = {
            "policy/clipfrac": masked_mean((clipped > unclipped).to(m.dtype), rows),
            "policy/seq_ratio_mean": masked_mean(seq_ratio, rows),
            "policy/approx_kl": _ratio_metrics(log_ratio, m)["policy/approx_kl"],
        }
    return select(seq_loss[:, None].expand_as(logp), keep), metrics


@POLICY_LOSSES.register("gspo_token", needs_off_policy=True)
def gspo_token_policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
) -> tuple[Tensor, Metrics]:
    """GSPO-token (Zheng et al. 2025, arXiv 2507.18071): GSPO with a per-token
    advantage Â_{i,t}.

        s_{i,t} = sg(s_i) · r_{i,t} / sg(r_{i,t})
        ℓ_{i,t} = −min(s_{i,t}·Â_{i,t}, clip(s_{i,t}, 1 − ε_low, 1 + ε_high)·Â_{i,t})

    s_{i,t} has the value of the sequence ratio s_i, and its gradient is s_i·∇log π_θ(a_t) for
    each token alone. Aggregate with `seq-mean-token-mean` (the paper's 1/G Σ_i 1/|y_i| Σ_t);
    with Â_{i,t} = Â_i the value and the gradient equal GSPO's (the paper's eqs. 11 and 18).
    Needs off-policy data, like GSPO.

    Metrics: policy/clipfrac (share of tokens whose clipped term is the larger loss),
    policy/seq_ratio_mean, policy/approx_kl (token k3).
    """
    logp, old_logp, advantages, keep, m = _check_policy_inputs(
        logp, old_logp, advantages, response_mask)
    _check_clip(clip_low, clip_high)
    log_ratio = logp - old_logp
    seq_ratio, _, rows = _sequence_ratio(log_ratio, advantages, m)
    token_ratio = seq_ratio.detach()[:, None] * torch.exp(log_ratio - log_ratio.detach())
    unclipped = -advantages * token_ratio
    clipped = -advantages * torch.clamp(token_ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    with torch.no_grad():
        metrics = {
            "policy/clipfrac": masked_mean((clipped > unclipped).to(m.dtype), m),
            "policy/seq_ratio_mean": masked_mean(seq_ratio, rows),
            "policy/approx_kl": _ratio_metrics(log_ratio, m)["policy/approx_kl"],
        }
    return select(loss, keep), metrics


@POLICY_LOSSES.register("cispo")
def cispo_policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    clip_low: float = 1.0,
    clip_high: float = 0.28,
) -> tuple[Tensor, Metrics]:
    """Clipped IS-weight Policy Optimization (MiniMax-M1, arXiv 2506.13585, §3.1):

        ℓ_t = −sg(clip(r_t, 1 − ε_low, 1 + ε_high)) · Â_t · log π_θ(a_t|s_t)

    The clipped importance weight carries no gradient, so a clipped token still learns
    (gradient −ŵ_t·Â_t·∇log π_θ), where PPO's clip would drop it. Token-mean aggregation, as
    the paper. The paper imposes no lower bound (ε_low large; the default 1.0 makes the lower
    bound 0, below any ratio) and tunes only ε_high, whose value it does not state; 0.28 (the
    clip-higher value) is this library's default.

    Metrics: policy/clipfrac (share of tokens whose weight was clipped), policy/approx_kl,
    policy/ratio_mean.
    """
    logp, old_logp, advantages, keep, m = _check_policy_inputs(
        logp, old_logp, advantages, response_mask)
    _check_clip(clip_low, clip_high)
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio).detach()
    lo, hi = 1.0 - clip_low, 1.0 + clip_high
    weight = torch.clamp(ratio, lo, hi)
    loss = -weight * advantages * logp
    metrics = {"policy/clipfrac": masked_mean(((ratio < lo) | (ratio > hi)).to(m.dtype), m)}
    metrics.update(_ratio_metrics(log_ratio, m))
    return select(loss, keep), metrics


@POLICY_LOSSES.register("sapo")
def sapo_policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
) -> tuple[Tensor, Metrics]:
    """Soft Adaptive Policy Optimization (SAPO, Qwen 2025, arXiv 2511.20347): a smooth,
    temperature-controlled gate in place of the hard clip.

        ℓ_t = −(4/τ) · σ(τ·(r_t − 1)) · Â_t,   τ = τ_pos if Â_t > 0 else τ_neg

    d/dr (4/τ)·σ(τ(r − 1)) = 4·σ(1 − σ), which is 1 at r = 1: on-policy the gradient is
    −Â·∇log π_θ, as PPO's, and it decays smoothly as r leaves 1 (faster for larger τ). The loss
    *value* at r = 1 is −2Â/τ, not −Â. τ_neg > τ_pos damps the negative-advantage updates,
    which spread probability over many unsampled tokens; the defaults τ_pos = 1.0,
    τ_neg = 1.05 are the paper's recommendation. Token-mean aggregation.

    Metrics: policy/gate_weight_mean (mean 4σ(1 − σ), the factor on the PPO gradient r·Â·∇log π),
    policy/approx_kl, policy/ratio_mean.
    """
    logp, old_logp, advantages, keep, m = _check_policy_inputs(
        logp, old_logp, advantages, response_mask)
    if tau_pos <= 0 or tau_neg <= 0:
        raise ConfigError(f"SAPO temperatures must be > 0, got tau_pos={tau_pos}, "
                          f"tau_neg={tau_neg}")
    log_ratio = logp - old_logp
    tau = torch.where(advantages > 0, torch.full_like(logp, tau_pos),
                      torch.full_like(logp, tau_neg)).detach()
    gate = torch.sigmoid(tau * (torch.exp(log_ratio) - 1.0))
    loss = -(4.0 / tau) * gate * advantages
    metrics = {"policy/gate_weight_mean": masked_mean((4.0 * gate * (1.0 - gate)).detach(), m)}
    metrics.update(_ratio_metrics(log_ratio, m))
    return select(loss, keep), metrics


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
    keep = check_keep("response_mask", response_mask, "values", values)
    m = keep.to(values.dtype)
    values, old_values, returns = (select(x, keep) for x in (values, old_values, returns))
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
    return select(loss, keep), metrics


def explained_variance(values: Tensor, returns: Tensor, response_mask: Tensor) -> Tensor:
    """1 − Var(Ret − V) / Var(Ret) over the masked tokens (1 is perfect, 0 is a constant
    predictor, negative is worse than a constant). NaN when the returns have no variance."""
    values = check_tensor("values", values, ndim=2)
    returns = check_like("returns", returns, "values", values)
    keep = check_keep("response_mask", response_mask, "values", values)
    values, returns = select(values, keep), select(returns, keep)
    m = keep.to(values.dtype)
    var_ret = masked_var(returns, m)
    return 1.0 - masked_var(returns - values, m) / var_ret


def entropy_loss(entropy: Tensor, response_mask: Tensor) -> tuple[Tensor, Metrics]:
    """−H(π(·|s_t)) per token: adding `c_ent ·` this to the loss is the entropy bonus.

    Args:
        entropy: (B, T) entropy per position (`token_logprobs_and_entropy`), with gradient.
        response_mask: (B, T) True on tokens that count.
    """
    entropy = check_tensor("entropy", entropy, ndim=2)
    keep = check_keep("response_mask", response_mask, "entropy", entropy)
    entropy = select(entropy, keep)
    return select(-entropy, keep), {"policy/entropy": masked_mean(entropy.detach(), keep)}


def nll_loss(logp: Tensor, loss_mask: Tensor) -> tuple[Tensor, Metrics]:
    """−log π(a_t|s_t) per token: the language-model loss of PPO-ptx (pretraining text),
    SFT-in-RL and VAPO's positive-example LM loss.

    Args:
        logp: (B, T) log-probs of the target tokens, with gradient.
        loss_mask: (B, T) True on tokens that receive the loss.
    """
    logp = check_tensor("logp", logp, ndim=2)
    keep = check_keep("loss_mask", loss_mask, "logp", logp)
    logp = select(logp, keep)
    return select(-logp, keep), {"lm/nll": masked_mean(-logp.detach(), keep)}


def positive_example_mask(
    response_mask: Tensor, scores: Tensor, threshold: float = 0.0
) -> Tensor:
    """The response mask restricted to the sequences whose score is > `threshold` (those the
    reward marks correct), for VAPO's positive-example LM loss. Returns a bool (B, T) mask."""
    response_mask = check_tensor("response_mask", response_mask, ndim=2)
    scores = check_rows("scores", scores, "response_mask", response_mask)
    return response_mask.bool() & (scores > threshold)[:, None]
