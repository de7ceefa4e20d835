"""The pure-math layer: tensors in, tensors out. Imports only torch and the standard library
(and `posttrain.errors`); no models, files, devices or processes."""

from posttrain.algos.advantages import (
    ADVANTAGE_ESTIMATORS,
    WHITEN_MODES,
    compute_advantages,
    group_mean_std,
    length_adaptive_lambda,
    policy_lambda,
    register_advantage,
    whiten_advantages,
)
from posttrain.algos.kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    PPOAdaptiveKLController,
    add_score_at_last_token,
    kl_estimate,
    kl_penalized_rewards,
    make_kl_controller,
)
from posttrain.algos.logprobs import token_logprobs, token_logprobs_and_entropy
from posttrain.algos.masked import (
    AGGREGATION_MODES,
    aggregate_loss,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)
from posttrain.algos.policy_loss import (
    POLICY_LOSSES,
    clipped_policy_loss,
    entropy_loss,
    explained_variance,
    nll_loss,
    positive_example_mask,
    unclipped_policy_loss,
    value_loss,
)
from posttrain.algos.preference import DPO_VARIANTS, DPOOutput, bradley_terry_loss, dpo_loss
from posttrain.registry import Registry

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGGREGATION_MODES",
    "DPO_VARIANTS",
    "KL_ESTIMATORS",
    "POLICY_LOSSES",
    "WHITEN_MODES",
    "AdaptiveKLController",
    "DPOOutput",
    "FixedKLController",
    "PPOAdaptiveKLController",
    "Registry",
    "add_score_at_last_token",
    "aggregate_loss",
    "bradley_terry_loss",
    "clipped_policy_loss",
    "compute_advantages",
    "dpo_loss",
    "entropy_loss",
    "explained_variance",
    "group_mean_std",
    "kl_estimate",
    "kl_penalized_rewards",
    "length_adaptive_lambda",
    "make_kl_controller",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "nll_loss",
    "policy_lambda",
    "positive_example_mask",
    "register_advantage",
    "token_logprobs",
    "token_logprobs_and_entropy",
    "unclipped_policy_loss",
    "value_loss",
    "whiten_advantages",
]
