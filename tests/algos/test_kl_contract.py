"""KL shaping and controllers beyond test_kl.py: the dtype and device of the shaped rewards,
the documented horizon default, the smallest legal arguments (β = 0, a target or horizon
below 1) and the messages users read (habit 12). Found missing by mutation testing
(docs/testing.md)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from posttrain.algos import (
    AdaptiveKLController,
    FixedKLController,
    PPOAdaptiveKLController,
    add_score_at_last_token,
    kl_estimate,
    make_kl_controller,
)
from posttrain.errors import ConfigError, ShapeError

D = torch.float64


def t(x):
    return torch.tensor(x, dtype=D)


# ------------------------------------------------------------------- rewards: dtype, device


def test_the_score_is_added_in_the_rewards_dtype():
    """float32 rewards stay float32 when the scores come in float64: the score 0.1 is rounded
    to float32 (0.100000001490116...) before it is added, and nothing is promoted."""
    rewards = torch.zeros(1, 3, dtype=torch.float32)
    mask = torch.tensor([[True, True, False]])
    out = add_score_at_last_token(rewards, t([0.1]), mask)
    assert out.dtype == torch.float32
    assert out.tolist() == [[0.0, torch.tensor(0.1, dtype=torch.float32).item(), 0.0]]


def test_add_score_at_last_token_runs_on_the_device_of_its_inputs():
    """The positions used to find the last token are built on the mask's device; `meta` is a
    second device on any machine (a CPU arange times a meta mask is an error)."""
    rewards = torch.zeros(2, 3, device="meta")
    mask = torch.ones(2, 3, dtype=torch.bool, device="meta")
    out = add_score_at_last_token(rewards, torch.zeros(2, device="meta"), mask)
    assert out.device.type == "meta" and out.shape == (2, 3)


def test_a_wrong_mask_names_logp_as_the_reference():
    with pytest.raises(ShapeError) as err:
        kl_estimate(torch.zeros(2, 3, dtype=D), torch.zeros(2, 3, dtype=D),
                    mask=torch.ones(2, 2, dtype=torch.bool))
    assert str(err.value) == "`mask` has shape (2, 2) but `logp` has shape (2, 3); they must match"


# ------------------------------------------------------------------- controllers: arguments


def test_the_horizon_defaults_to_10000():
    """β = 1, KL = 2·target: e = clip(2 − 1, ±0.2) = 0.2, and n = 1000 samples:
    β ← 1·(1 + 0.2·1000/10000) = 1.02 (the constructor and the factory alike)."""
    for ctl in (AdaptiveKLController(1.0, target=1.0),
                make_kl_controller("adaptive", 1.0, target=1.0)):
        assert ctl.horizon == 10000.0
        assert_close(ctl.update(2.0, 1000), 1.02, atol=1e-12, rtol=0)


def test_a_zero_beta_is_allowed_it_means_no_kl_penalty():
    assert FixedKLController(0.0).value == 0.0
    assert AdaptiveKLController(0.0, target=6.0).value == 0.0
    assert PPOAdaptiveKLController(0.0, target=6.0).value == 0.0


def test_a_target_or_horizon_below_one_is_allowed():
    """Only ≤ 0 is rejected: a KL target of 0.05 nats and a horizon of 0.5 are legal.
    PPO rule at target 0.05: KL 0.1 > 0.05·1.5 doubles β, 0.5 → 1.0."""
    ctl = AdaptiveKLController(0.5, target=0.05, horizon=0.5)
    assert (ctl.target, ctl.horizon) == (0.05, 0.5)
    ppo = PPOAdaptiveKLController(0.5, target=0.05)
    assert ppo.target == 0.05 and ppo.update(0.1, 1) == 1.0


def config_message(fn):
    with pytest.raises(ConfigError) as err:
        fn()
    return str(err.value)


def test_controller_messages_name_the_value_at_fault():
    assert config_message(lambda: FixedKLController(-0.1)) == (
        "KL coefficient must be >= 0, got -0.1")
    assert config_message(lambda: AdaptiveKLController(0.1, target=0.0)) == (
        "KL target and horizon must be > 0, got 0.0, 10000.0")
    assert config_message(lambda: AdaptiveKLController(0.1, target=6.0, horizon=-5.0)) == (
        "KL target and horizon must be > 0, got 6.0, -5.0")
    assert config_message(lambda: PPOAdaptiveKLController(0.1, target=-1.0)) == (
        "KL target must be > 0, got -1.0")


@pytest.mark.parametrize("kind", ["adaptive", "ppo_adaptive"])
def test_a_missing_target_message_names_the_controller(kind):
    assert config_message(lambda: make_kl_controller(kind, 0.2)) == (
        f"the {kind!r} KL controller needs a KL target (`kl_target`)")
