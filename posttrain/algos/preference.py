"""Preference losses: the Bradley-Terry reward-model loss and the DPO family.

All inputs are per pair, (B,). Losses come back per pair, (B,), so the trainer can average
them over the whole optimiser step (gradient accumulation and data parallelism).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from posttrain.algos._checks import check_float, check_like, check_tensor
from posttrain.errors import ConfigError
from posttrain.registry import Registry

Metrics = dict[str, Tensor]


def bradley_terry_loss(
    chosen_scores: Tensor, rejected_scores: Tensor, margin: Tensor | float | None = None
) -> tuple[Tensor, Metrics]:
    """Reward-model loss −log σ(R(x, y⁺) − R(x, y⁻) − m) (InstructGPT eq. 1, margin of Llama 2).

    Args:
        chosen_scores: (B,) R(x, y⁺), the score at the last real token of the chosen response.
        rejected_scores: (B,) R(x, y⁻).
        margin: m, a float or (B,) tensor; None for no margin.

    Returns:
        (B,) losses and metrics rm/accuracy (share with R⁺ > R⁻), rm/margin (mean R⁺ − R⁻),
        rm/chosen, rm/rejected.
    """
    chosen_scores = check_tensor("chosen_scores", chosen_scores, ndim=1)
    check_float("chosen_scores", chosen_scores)
    rejected_scores = check_like("rejected_scores", rejected_scores, "chosen_scores", chosen_scores)
    diff = chosen_scores - rejected_scores
    logits = diff if margin is None else diff - margin
    losses = -F.logsigmoid(logits)
    d = diff.detach()
    metrics = {
        "rm/accuracy": (d > 0).to(d.dtype).mean(),
        "rm/margin": d.mean(),
        "rm/chosen": chosen_scores.detach().mean(),
        "rm/rejected": rejected_scores.detach().mean(),
    }
    return losses, metrics


class DPOOutput(NamedTuple):
    losses: Tensor  # (B,) loss per pair
    chosen_rewards: Tensor  # (B,) β⁺·(log π(y⁺) − log π_ref(y⁺)), detached
    rejected_rewards: Tensor  # (B,) β⁻·(log π(y⁻) − log π_ref(y⁻)), detached
    metrics: Metrics


DPOVariant = Callable[[Tensor, Tensor, float, float], Tensor]
"""(h, Δ, β, label_smoothing) -> (B,) base loss, with h the β-scaled preference logit and
Δ = the unscaled difference of log-ratios."""

DPO_VARIANTS: Registry[DPOVariant] = Registry("DPO variant")


@DPO_VARIANTS.register("sigmoid")
def _sigmoid(h: Tensor, delta: Tensor, beta: float, label_smoothing: float) -> Tensor:
    # DPO (Rafailov et al. 2023, eq. 7); with ε > 0 the conservative DPO of Mitchell (2023):
    # −(1−ε)·log σ(h) − ε·log σ(−h).
    return -(1.0 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)


@DPO_VARIANTS.register("ipo")
def _ipo(h: Tensor, delta: Tensor, beta: float, label_smoothing: float) -> Tensor:
    # IPO (Azar et al. 2023, eq. 17): (Δ − 1/(2τ))² with τ = β, where Δ = h/β.
    return (delta - 1.0 / (2.0 * beta)) ** 2


def dpo_loss(
    policy_chosen_logp: Tensor,
    policy_rejected_logp: Tensor,
    ref_chosen_logp: Tensor | None,
    ref_rejected_logp: Tensor | None,
    *,
    variant: str = "sigmoid",
    beta: float = 0.1,
    beta_chosen: float | None = None,
    beta_rejected: float | None = None,
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    dpop_lambda: float = 0.0,
    sft_alpha: float = 0.0,
    chosen_nll: Tensor | None = None,
) -> DPOOutput:
    """The DPO family (ALGORITHMS.md section 6).

        r(y⁺) = β⁺·(log π(y⁺) − log π_ref(y⁺)),  r(y⁻) = β⁻·(log π(y⁻) − log π_ref(y⁻))
        h     = r(y⁺) − r(y⁻)                    (β⁺ = β⁻ = β unless asymmetric)
        sigmoid: −(1−ε)·log σ(h) − ε·log σ(−h)   (ε = label_smoothing; ε = 0 is DPO, > 0 cDPO)
        ipo:     (h/β − 1/(2β))²
        + dpop_lambda · max(0, −r(y⁺))           (DPO-P: penalise lowering the chosen log-prob)
        + sft_alpha · NLL(y⁺)                    (DPO+SFT)

    Args:
        policy_chosen_logp, policy_rejected_logp: (B,) sequence log-probs Σ_t log π(a_t|s_t)
            of the chosen and rejected responses, with gradient.
        ref_chosen_logp, ref_rejected_logp: (B,) the same under π_ref; ignored (may be None)
            when `reference_free`.
        variant: "sigmoid" or "ipo".
        beta: β; `beta_chosen` / `beta_rejected` override it for y⁺ / y⁻ (β⁺ > β⁻).
        label_smoothing: ε of cDPO, in [0, 0.5).
        reference_free: drop the reference terms (log π_ref = 0).
        dpop_lambda: λ_p of DPO-P.
        sft_alpha: α of DPO+SFT, typically 0.1–0.5; needs `chosen_nll`.
        chosen_nll: (B,) NLL of y⁺ under π (the caller picks its normalisation, e.g. per token).
    """
    pc = check_tensor("policy_chosen_logp", policy_chosen_logp, ndim=1)
    check_float("policy_chosen_logp", pc)
    pr = check_like("policy_rejected_logp", policy_rejected_logp, "policy_chosen_logp", pc)
    if reference_free:
        rc = torch.zeros_like(pc)
        rr = torch.zeros_like(pr)
    else:
        if ref_chosen_logp is None or ref_rejected_logp is None:
            raise ConfigError("dpo_loss needs reference log-probs unless reference_free=True")
        rc = check_like("ref_chosen_logp", ref_chosen_logp, "policy_chosen_logp", pc).detach()
        rr = check_like("ref_rejected_logp", ref_rejected_logp, "policy_chosen_logp", pc).detach()
    if beta <= 0:
        raise ConfigError(f"DPO beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ConfigError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    b_pos = beta if beta_chosen is None else beta_chosen
    b_neg = beta if beta_rejected is None else beta_rejected
    if b_pos <= 0 or b_neg <= 0:
        raise ConfigError(f"beta_chosen and beta_rejected must be > 0, got {b_pos}, {b_neg}")
    chosen_logratio = pc - rc
    rejected_logratio = pr - rr
    chosen_rewards = b_pos * chosen_logratio
    rejected_rewards = b_neg * rejected_logratio
    h = chosen_rewards - rejected_rewards
    delta = chosen_logratio - rejected_logratio
    losses = DPO_VARIANTS.get(variant)(h, delta, beta, label_smoothing)
    if dpop_lambda:
        losses = losses + dpop_lambda * torch.clamp(-chosen_rewards, min=0.0)
    if sft_alpha:
        if chosen_nll is None:
            raise ConfigError("DPO+SFT (sft_alpha > 0) needs `chosen_nll`")
        losses = losses + sft_alpha * check_like("chosen_nll", chosen_nll, "policy_chosen_logp", pc)
    cr, rj = chosen_rewards.detach(), rejected_rewards.detach()
    metrics = {
        "rewards/chosen": cr.mean(),
        "rewards/rejected": rj.mean(),
        "rewards/margin": (cr - rj).mean(),
        "rewards/accuracy": (cr > rj).to(cr.dtype).mean(),
    }
    return DPOOutput(losses, cr, rj, metrics)
