"""Preference losses: the Bradley-Terry reward-model loss, the DPO family (DPO, cDPO, IPO,
SimPO, ORPO, with DPO-P and DPO+SFT terms) and KTO (ALGORITHMS.md sections 1 and 6).

All inputs are per pair (or, for KTO, per example), (B,). Losses come back per pair, (B,), so
the trainer can average them over the whole optimiser step (gradient accumulation and data
parallelism).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from posttrain.algos._checks import check_float, check_like, check_tensor
from posttrain.errors import ConfigError, ShapeError
from posttrain.registry import Registry

Metrics = dict[str, Tensor]


def bradley_terry_loss(
    chosen_scores: Tensor, rejected_scores: Tensor, margin: Tensor | float | None = None
) -> tuple[Tensor, Metrics]:
    """Reward-model loss −log σ(R(x, y⁺) − R(x, y⁻) − m) (InstructGPT eq. 1, margin of Llama 2).

    Args:
        chosen_scores: (B,) R(x, y⁺), the score at the last real token of the chosen response.
        rejected_scores: (B,) R(x, y⁻).
        margin: m, a float or a (B,) tensor of per-pair margins (TRL's `margin` column);
            None for no margin.

    Returns:
        (B,) losses and metrics rm/accuracy (share with R⁺ > R⁻), rm/margin (mean R⁺ − R⁻),
        rm/chosen, rm/rejected.
    """
    chosen_scores = check_tensor("chosen_scores", chosen_scores, ndim=1)
    check_float("chosen_scores", chosen_scores)
    rejected_scores = check_like("rejected_scores", rejected_scores, "chosen_scores", chosen_scores)
    if isinstance(margin, Tensor):
        margin = check_like("margin", margin, "chosen_scores", chosen_scores).detach()
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



# ---------------------------------------------------------------------------------- DPO family


class PairLogps(NamedTuple):
    """What every DPO variant sees: sequence log-probs of a batch of pairs."""

    chosen: Tensor  # (B,) log π(y⁺) = Σ_t log π(a_t|s_t), with gradient
    rejected: Tensor  # (B,) log π(y⁻), with gradient
    ref_chosen: Tensor  # (B,) log π_ref(y⁺), detached; 0 when reference-free
    ref_rejected: Tensor  # (B,) log π_ref(y⁻), detached; 0 when reference-free
    chosen_tokens: Tensor | None  # (B,) |y⁺| (response tokens), when `needs_lengths`
    rejected_tokens: Tensor | None  # (B,) |y⁻|, when `needs_lengths`


class VariantOutput(NamedTuple):
    losses: Tensor  # (B,) the variant's loss per pair
    chosen_rewards: Tensor  # (B,) the score of y⁺ whose difference the loss raises
    rejected_rewards: Tensor  # (B,) the same for y⁻
    metrics: Metrics  # variant-specific extras (e.g. orpo/nll), detached


class DPOVariant(Protocol):
    """One registry, one signature: every variant takes the same tensors and numbers and
    ignores the numbers it has no use for. It declares whether it needs the reference model
    (so the trainer loads one only when it does) and the response lengths."""

    needs_reference: bool
    needs_lengths: bool

    def __call__(self, logps: PairLogps, *, beta: float, beta_chosen: float,
                 beta_rejected: float, label_smoothing: float, simpo_gamma: float,
                 orpo_lambda: float) -> VariantOutput: ...


DPO_VARIANTS: Registry[DPOVariant] = Registry(
    "DPO variant", attrs={"needs_reference": True, "needs_lengths": False})


def _implicit_rewards(logps: PairLogps, beta_chosen: float, beta_rejected: float
                      ) -> tuple[Tensor, Tensor]:
    """r(y⁺) = β⁺·(log π(y⁺) − log π_ref(y⁺)), r(y⁻) = β⁻·(log π(y⁻) − log π_ref(y⁻))."""
    return (beta_chosen * (logps.chosen - logps.ref_chosen),
            beta_rejected * (logps.rejected - logps.ref_rejected))


@DPO_VARIANTS.register("sigmoid")
def _sigmoid(logps: PairLogps, *, beta_chosen: float, beta_rejected: float,
             label_smoothing: float, **_: float) -> VariantOutput:
    # DPO (Rafailov et al. 2023, eq. 7); with ε > 0 the conservative DPO of Mitchell (2023):
    # −(1−ε)·log σ(h) − ε·log σ(−h).
    rc, rr = _implicit_rewards(logps, beta_chosen, beta_rejected)
    h = rc - rr
    losses = -(1.0 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    return VariantOutput(losses, rc, rr, {})


@DPO_VARIANTS.register("ipo")
def _ipo(logps: PairLogps, *, beta: float, beta_chosen: float, beta_rejected: float,
         **_: float) -> VariantOutput:
    # IPO (Azar et al. 2023, eq. 17): (h/τ − 1/(2τ))² with τ = β. h is the β⁺/β⁻-scaled logit,
    # so asymmetric β changes IPO as it changes DPO (ALGORITHMS.md §6); with β⁺ = β⁻ = β,
    # h/β is the plain difference of log-ratios of the paper.
    rc, rr = _implicit_rewards(logps, beta_chosen, beta_rejected)
    losses = ((rc - rr) / beta - 1.0 / (2.0 * beta)) ** 2
    return VariantOutput(losses, rc, rr, {})


@DPO_VARIANTS.register("simpo", needs_reference=False, needs_lengths=True)
def _simpo(logps: PairLogps, *, beta: float, simpo_gamma: float, **_: float) -> VariantOutput:
    # SimPO (Meng et al. 2024, eq. 6): −log σ(β/|y⁺|·log π(y⁺) − β/|y⁻|·log π(y⁻) − γ). The
    # reward is the length-normalised log-prob, so no reference model and no length bias.
    rc = beta * logps.chosen / logps.chosen_tokens
    rr = beta * logps.rejected / logps.rejected_tokens
    return VariantOutput(-F.logsigmoid(rc - rr - simpo_gamma), rc, rr, {})


def log1mexp(x: Tensor) -> Tensor:
    """log(1 − eˣ) for x < 0, accurate everywhere (Mächler 2012): log(−expm1(x)) near 0,
    log1p(−eˣ) far from it."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def log_odds(mean_logp: Tensor) -> Tensor:
    """log(p/(1−p)) with p = exp(mean-token log π(y)), computed as log p − log(1 − p).

    p = 1 (a mean log-prob of exactly 0, reachable in float32) has infinite odds and a NaN
    gradient; the mean log-prob is capped at −ε of its dtype, where the odds are already
    ~1/ε."""
    m = mean_logp.clamp(max=-torch.finfo(mean_logp.dtype).eps)
    return m - log1mexp(m)


@DPO_VARIANTS.register("orpo", needs_reference=False, needs_lengths=True)
def _orpo(logps: PairLogps, *, orpo_lambda: float, **_: float) -> VariantOutput:
    # ORPO (Hong et al. 2024, eqs. 6-7): L_SFT + λ·L_OR with L_SFT = NLL(y⁺) (token mean of
    # the response) and L_OR = −log σ(log odds(y⁺) − log odds(y⁻)), p = exp(mean log π).
    mean_c = logps.chosen / logps.chosen_tokens
    mean_r = logps.rejected / logps.rejected_tokens
    odds_c, odds_r = log_odds(mean_c), log_odds(mean_r)
    nll = -mean_c
    ratio = odds_c - odds_r
    losses = nll - orpo_lambda * F.logsigmoid(ratio)
    return VariantOutput(losses, odds_c, odds_r, {"orpo/nll": nll.detach().mean(),
                                                  "orpo/log_odds_ratio": ratio.detach().mean()})


class DPOOutput(NamedTuple):
    losses: Tensor  # (B,) loss per pair
    chosen_rewards: Tensor  # (B,) the variant's score of y⁺ (below), detached
    rejected_rewards: Tensor  # (B,) the variant's score of y⁻, detached
    metrics: Metrics


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
    chosen_tokens: Tensor | None = None,
    rejected_tokens: Tensor | None = None,
    simpo_gamma: float = 0.5,
    orpo_lambda: float = 0.1,
) -> DPOOutput:
    """The DPO family (ALGORITHMS.md section 6).

        r(y⁺) = β⁺·(log π(y⁺) − log π_ref(y⁺)),  r(y⁻) = β⁻·(log π(y⁻) − log π_ref(y⁻))
        h     = r(y⁺) − r(y⁻)                    (β⁺ = β⁻ = β unless asymmetric)
        sigmoid: −(1−ε)·log σ(h) − ε·log σ(−h)   (ε = label_smoothing; ε = 0 is DPO, > 0 cDPO)
        ipo:     (h/β − 1/(2β))²
        simpo:   −log σ(β·log π(y⁺)/|y⁺| − β·log π(y⁻)/|y⁻| − γ)            (no reference)
        orpo:    NLL(y⁺) − λ·log σ(log odds(y⁺) − log odds(y⁻)),             (no reference)
                 odds(y) = p/(1−p), p = exp(log π(y)/|y|), NLL(y⁺) = −log π(y⁺)/|y⁺|
        + dpop_lambda · max(0, −r(y⁺))           (DPO-P: penalise lowering the chosen log-prob)
        + sft_alpha · NLL(y⁺)                    (DPO+SFT)

    The rewards reported are r(y) for sigmoid and ipo, β·log π(y)/|y| for simpo and
    log odds(y) for orpo: the per-response scores whose difference each loss raises.

    Args:
        policy_chosen_logp, policy_rejected_logp: (B,) sequence log-probs Σ_t log π(a_t|s_t)
            of the chosen and rejected responses, with gradient.
        ref_chosen_logp, ref_rejected_logp: (B,) the same under π_ref; ignored (may be None)
            when `reference_free` or the variant has no reference (simpo, orpo).
        variant: a name in `DPO_VARIANTS`: sigmoid, ipo, simpo, orpo.
        beta: β; `beta_chosen` / `beta_rejected` override it for y⁺ / y⁻ (β⁺ > β⁻). SimPO's β
            (paper: 2.0–2.5) is `beta`; ORPO does not use β.
        label_smoothing: ε of cDPO, in [0, 0.5).
        reference_free: drop the reference terms (log π_ref = 0).
        dpop_lambda: λ_p of DPO-P (variants with a reference only).
        sft_alpha: α of DPO+SFT, typically 0.1–0.5; needs `chosen_nll`.
        chosen_nll: (B,) NLL of y⁺ under π (the caller picks its normalisation, e.g. per token).
        chosen_tokens, rejected_tokens: (B,) response lengths |y⁺|, |y⁻| in tokens; needed by
            simpo and orpo.
        simpo_gamma: γ of SimPO, the target reward margin (TRL's `simpo_gamma`; paper γ/β ≈ 0.5).
        orpo_lambda: λ of ORPO (paper: 0.1).
    """
    spec = DPO_VARIANTS.get(variant)
    needs_reference = DPO_VARIANTS.attr(variant, "needs_reference")
    pc = check_tensor("policy_chosen_logp", policy_chosen_logp, ndim=1)
    check_float("policy_chosen_logp", pc)
    pr = check_like("policy_rejected_logp", policy_rejected_logp, "policy_chosen_logp", pc)
    uses_reference = needs_reference and not reference_free
    if not uses_reference:
        rc = torch.zeros_like(pc)
        rr = torch.zeros_like(pr)
    else:
        if ref_chosen_logp is None or ref_rejected_logp is None:
            raise ConfigError("dpo_loss needs reference log-probs unless reference_free=True")
        rc = check_like("ref_chosen_logp", ref_chosen_logp, "policy_chosen_logp", pc).detach()
        rr = check_like("ref_rejected_logp", ref_rejected_logp, "policy_chosen_logp", pc).detach()
    lengths: list[Tensor | None] = [None, None]
    if DPO_VARIANTS.attr(variant, "needs_lengths"):
        for i, (name, x) in enumerate((("chosen_tokens", chosen_tokens),
                                       ("rejected_tokens", rejected_tokens))):
            if x is None:
                raise ConfigError(f"DPO variant {variant!r} is length-normalised and needs "
                                  f"`{name}` (B,)")
            lengths[i] = check_like(name, x, "policy_chosen_logp", pc).to(pc.dtype).clamp(min=1)
    if beta <= 0:
        raise ConfigError(f"DPO beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ConfigError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    b_pos = beta if beta_chosen is None else beta_chosen
    b_neg = beta if beta_rejected is None else beta_rejected
    if b_pos <= 0 or b_neg <= 0:
        raise ConfigError(f"beta_chosen and beta_rejected must be > 0, got {b_pos}, {b_neg}")
    if dpop_lambda and not needs_reference:
        raise ConfigError(f"dpop_lambda (DPO-P) penalises a drop against the reference; DPO "
                          f"variant {variant!r} has no reference")
    logps = PairLogps(pc, pr, rc, rr, lengths[0], lengths[1])
    losses, chosen_rewards, rejected_rewards, extra = spec(
        logps, beta=beta, beta_chosen=b_pos, beta_rejected=b_neg,
        label_smoothing=label_smoothing, simpo_gamma=simpo_gamma, orpo_lambda=orpo_lambda)
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
        **extra,
    }
    return DPOOutput(losses, cr, rj, metrics)


# ----------------------------------------------------------------------------------------- KTO


class KTOOutput(NamedTuple):
    losses: Tensor  # (B,) loss per example
    rewards: Tensor  # (B,) β·(log π(y) − log π_ref(y)), detached
    metrics: Metrics


def kto_kl_estimate(kl_policy_logp: Tensor, kl_ref_logp: Tensor) -> Tensor:
    """KTO's KL estimate: mean over mismatched pairs (x_i, y_j), j ≠ i, of the sequence
    log-ratio log π(y_j|x_i) − log π_ref(y_j|x_i); detached, a 0-dim tensor.

    Args:
        kl_policy_logp: (B,) log π of completions paired with another example's prompt.
        kl_ref_logp: (B,) the same under π_ref.
    """
    p = check_tensor("kl_policy_logp", kl_policy_logp, ndim=1)
    check_float("kl_policy_logp", p)
    r = check_like("kl_ref_logp", kl_ref_logp, "kl_policy_logp", p)
    return (p - r).detach().mean()


def kto_loss(
    policy_logp: Tensor,
    ref_logp: Tensor,
    desirable: Tensor,
    kl: Tensor | float,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> KTOOutput:
    """KTO (Ethayarajh et al. 2024, eq. 8), on unpaired examples:

        r = log π(y|x) − log π_ref(y|x)        z = max(0, KL estimate), no gradient
        desirable:   λ_D·(1 − σ(β·(r − z)))
        undesirable: λ_U·(1 − σ(β·(z − r)))

    Args:
        policy_logp: (B,) sequence log-probs Σ_t log π(a_t|s_t), with gradient.
        ref_logp: (B,) the same under π_ref.
        desirable: (B,) bool, True where the example's label is desirable.
        kl: the KL estimate on mismatched pairs (`kto_kl_estimate`), a float or 0-dim tensor;
            it is detached and clamped at 0 here.
        beta: β.
        desirable_weight, undesirable_weight: λ_D and λ_U (the paper balances them so that
            λ_D·n_D / (λ_U·n_U) is in [1, 4/3]).

    Returns:
        (B,) losses, (B,) rewards β·r and metrics kto/rewards_desirable and
        kto/rewards_undesirable (means of β·r over each class, 0 for a class with no example)
        and kto/kl (the estimate as given).
    """
    p = check_tensor("policy_logp", policy_logp, ndim=1)
    check_float("policy_logp", p)
    ref = check_like("ref_logp", ref_logp, "policy_logp", p).detach()
    good = check_like("desirable", desirable, "policy_logp", p)
    if good.dtype != torch.bool:
        raise ShapeError(f"`desirable` must be a bool tensor, got dtype {good.dtype}")
    if beta <= 0:
        raise ConfigError(f"KTO beta must be > 0, got {beta}")
    if desirable_weight < 0 or undesirable_weight < 0:
        raise ConfigError(f"KTO weights must be >= 0, got {desirable_weight}, "
                          f"{undesirable_weight}")
    kl = torch.as_tensor(kl, dtype=p.dtype, device=p.device).detach()
    z = kl.clamp(min=0.0)
    r = p - ref
    losses = torch.where(good, desirable_weight * (1.0 - torch.sigmoid(beta * (r - z))),
                         undesirable_weight * (1.0 - torch.sigmoid(beta * (z - r))))
    rewards = beta * r.detach()
    zero = torch.zeros_like(rewards)
    n_good = good.sum().clamp(min=1)
    n_bad = (~good).sum().clamp(min=1)
    metrics = {
        "kto/rewards_desirable": torch.where(good, rewards, zero).sum() / n_good,
        "kto/rewards_undesirable": torch.where(good, zero, rewards).sum() / n_bad,
        "kto/kl": kl,
    }
    return KTOOutput(losses, rewards, metrics)
