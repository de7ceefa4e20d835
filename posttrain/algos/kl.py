"""KL estimators, KL-in-reward shaping and the KL coefficient controllers.

Estimators follow Schulman, "Approximating KL Divergence" (2020), with samples a ~ π (the
policy) and ρ = π_ref(a) / π(a) per token, so that E_π[k] estimates KL(π ‖ π_ref):
    k1 = −log ρ                 unbiased, high variance, can be negative
    k2 = ½ (log ρ)²             biased, low variance, ≥ 0
    k3 = (ρ − 1) − log ρ        unbiased, low variance, ≥ 0
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from posttrain.algos._checks import (
    check_float,
    check_keep,
    check_like,
    check_mask,
    check_rows,
    check_tensor,
    select,
)
from posttrain.errors import ConfigError
from posttrain.registry import Registry

KLEstimator = Callable[[Tensor], Tensor]
"""Maps log ρ = log π_ref − log π (any shape) to the per-token estimate (same shape)."""

KL_ESTIMATORS: Registry[KLEstimator] = Registry("KL estimator")


@KL_ESTIMATORS.register("k1")
def _k1(log_ratio: Tensor) -> Tensor:
    return -log_ratio


@KL_ESTIMATORS.register("k2")
def _k2(log_ratio: Tensor) -> Tensor:
    return 0.5 * log_ratio**2


@KL_ESTIMATORS.register("k3")
def _k3(log_ratio: Tensor) -> Tensor:
    # expm1 keeps (ρ − 1) exact for ρ near 1, where the estimator is most used.
    return torch.expm1(log_ratio) - log_ratio


def kl_estimate(
    logp: Tensor, ref_logp: Tensor, estimator: str = "k1", mask: Tensor | None = None
) -> Tensor:
    """Per-token KL(π ‖ π_ref) estimate.

    Args:
        logp: (B, T) log π(a_t|s_t) of the sampled tokens (the policy, or π_old for rewards).
        ref_logp: (B, T) log π_ref(a_t|s_t) of the same tokens.
        estimator: a name in `KL_ESTIMATORS`: "k1", "k2" or "k3".
        mask: (B, T) True on the tokens that count, or None. With a mask, log ρ is selected
            to 0 off the mask *before* the estimator, and the estimate is 0 there: a padding
            log-prob such as −95 (or −inf) gives k3 = e^95 − 1 − 95, which overflows float32,
            and even a result that is dropped afterwards sends 0 · inf = NaN into the gradient.
            Pass the mask whenever the estimate enters a loss.

    Returns:
        (B, T) estimate (0 off `mask`); gradients flow through `logp` (use it in the loss for
        KL-in-loss).
    """
    logp = check_tensor("logp", logp)
    check_float("logp", logp)
    ref_logp = check_like("ref_logp", ref_logp, "logp", logp)
    est = KL_ESTIMATORS.get(estimator)
    if mask is None:
        return est(ref_logp - logp)
    keep = check_keep("mask", mask, "logp", logp)
    return select(est(select(ref_logp - logp, keep)), keep)


def kl_penalized_rewards(
    scores: Tensor, kl: Tensor, response_mask: Tensor, beta: float
) -> Tensor:
    """Token rewards with the KL penalty in the reward (InstructGPT; Ziegler et al. 2019).

        r_t = −β·KL_t for t < T,   r_T = R(x, y) − β·KL_T

    Args:
        scores: (B,) sequence reward R(x, y).
        kl: (B, T) per-token KL_t, normally k1 of π_old against π_ref (detached).
        response_mask: (B, T) True on real response tokens. The score goes to the last True
            position of each row; a row with no True position gets no reward at all.
        beta: the KL coefficient β.

    Returns:
        (B, T) token rewards, 0 where `response_mask` is False.
    """
    kl = check_tensor("kl", kl, ndim=2)
    check_float("kl", kl)
    m = check_mask("response_mask", response_mask, "kl", kl)
    scores = check_rows("scores", scores, "kl", kl).to(kl.dtype)
    # where, not a product: a NaN or inf KL at a padding position must not leak.
    keep = m != 0
    rewards = select(-beta * select(kl, keep), keep)
    return add_score_at_last_token(rewards, scores, keep)


def add_score_at_last_token(rewards: Tensor, scores: Tensor, response_mask: Tensor) -> Tensor:
    """`rewards` (B, T) with `scores` (B,) added at each row's last True mask position.

    Every other entry of `rewards` is returned unchanged. A row with no True position gets no
    score, and its score is never read (NaN is fine there).
    """
    counts = response_mask != 0
    # Integer positions: bf16 holds integers exactly only up to 256.
    positions = torch.arange(counts.shape[1], device=counts.device)
    last = (positions * counts).argmax(dim=1, keepdim=True)
    has_token = counts.any(dim=1)
    at_last = torch.zeros_like(counts).scatter(1, last, True) & has_token[:, None]
    scores = select(scores.to(rewards.dtype), has_token)
    return torch.where(at_last, rewards + scores[:, None], rewards)


class FixedKLController:
    """A constant β."""

    def __init__(self, beta: float) -> None:
        if beta < 0:
            raise ConfigError(f"KL coefficient must be >= 0, got {beta}")
        self.value = float(beta)

    def update(self, current_kl: float, n_samples: int) -> float:
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Proportional controller of Ziegler et al. (2019), eq. (2):

        e = clip(KL / KL_target − 1, −0.2, 0.2),   β ← β · (1 + e · n / horizon)

    with n the number of samples of this step. β is chosen by the KL you want, not by hand.
    """

    def __init__(self, beta: float, target: float, horizon: float = 10000.0) -> None:
        super().__init__(beta)
        if target <= 0 or horizon <= 0:
            raise ConfigError(f"KL target and horizon must be > 0, got {target}, {horizon}")
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_samples: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_samples / self.horizon
        return self.value


class PPOAdaptiveKLController(FixedKLController):
    """The rule of the PPO paper (Schulman et al. 2017, section 4):

        KL < KL_target / 1.5 → β ← β / 2;   KL > KL_target · 1.5 → β ← β · 2
    """

    def __init__(self, beta: float, target: float) -> None:
        super().__init__(beta)
        if target <= 0:
            raise ConfigError(f"KL target must be > 0, got {target}")
        self.target = float(target)

    def update(self, current_kl: float, n_samples: int) -> float:
        if current_kl < self.target / 1.5:
            self.value /= 2.0
        elif current_kl > self.target * 1.5:
            self.value *= 2.0
        return self.value


KLControllerFactory = Callable[[float, float | None, float], FixedKLController]
"""Builds a controller from (beta, target, horizon)."""

KL_CONTROLLERS: Registry[KLControllerFactory] = Registry(
    "KL controller", attrs={"needs_target": False}
)


@KL_CONTROLLERS.register("fixed")
def _fixed_controller(beta: float, target: float | None, horizon: float) -> FixedKLController:
    return FixedKLController(beta)


@KL_CONTROLLERS.register("adaptive", needs_target=True)
def _adaptive_controller(beta: float, target: float | None, horizon: float
                         ) -> FixedKLController:
    return AdaptiveKLController(beta, _need_target("adaptive", target), horizon)


@KL_CONTROLLERS.register("ppo_adaptive", needs_target=True)
def _ppo_adaptive_controller(beta: float, target: float | None, horizon: float
                             ) -> FixedKLController:
    return PPOAdaptiveKLController(beta, _need_target("ppo_adaptive", target))


def _need_target(kind: str, target: float | None) -> float:
    if target is None:
        raise ConfigError(f"the {kind!r} KL controller needs a KL target (`kl_target`)")
    return target


def make_kl_controller(
    kind: str, beta: float, target: float | None = None, horizon: float = 10000.0
) -> FixedKLController:
    """Build the controller registered as `kind` in `KL_CONTROLLERS` ("fixed", "adaptive"
    (proportional) or "ppo_adaptive"). An entry with `needs_target` needs `target`."""
    build = KL_CONTROLLERS.get(kind)
    if KL_CONTROLLERS.attr(kind, "needs_target"):
        _need_target(kind, target)
    return build(beta, target, horizon)
