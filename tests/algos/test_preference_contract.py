"""The preference losses' contract beyond the worked examples of test_preference.py: the
documented defaults (SimPO's γ = 0.5, ORPO's λ = 0.1, KTO's β = 0.1), the boundaries of the
argument checks (β = 0, a weight of 0), KTO's per-class means at one and three examples, the
dtype and device the results come back in, and the full text of the errors users read, which
name the argument at fault and the one it is compared with.

Found missing by mutation testing (docs/testing.md). Values are float64 and hand-computed;
the arithmetic is in each docstring.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from posttrain.algos.preference import bradley_terry_loss, dpo_loss, kto_kl_estimate, kto_loss
from posttrain.errors import ConfigError, ShapeError

D = torch.float64


def t(x):
    return torch.tensor(x, dtype=D)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def message(fn, error=ShapeError):
    with pytest.raises(error) as err:
        fn()
    return str(err.value)


def mismatch(name, ref_name, shape=(3,), ref_shape=(2,)):
    return f"`{name}` has shape {shape} but `{ref_name}` has shape {ref_shape}; they must match"


# ----------------------------------------------------------------------------- documented defaults


def test_simpo_default_gamma_is_one_half():
    """log π(y⁺) = −2 over 2 tokens, log π(y⁻) = −4 over 4: both mean −1, so with the default
    β = 0.1 both rewards are −0.1 and the logit is 0 − γ = −0.5; the loss is
    −log σ(−0.5) = log(1 + e^0.5)."""
    out = dpo_loss(t([-2.0]), t([-4.0]), None, None, variant="simpo",
                   chosen_tokens=t([2.0]), rejected_tokens=t([4.0]))
    assert_close(out.losses, t([math.log1p(math.exp(0.5))]), atol=1e-12, rtol=0)
    assert_close(out.chosen_rewards, t([-0.1]), atol=1e-12, rtol=0)


def test_orpo_default_lambda_is_one_tenth():
    """y⁺: 2·ln(1/2) over 2 tokens → p = 1/2, log odds 0, NLL ln 2. y⁻: 3·ln(1/4) over 3 →
    p = 1/4, odds 1/3, log odds −ln 3. Ratio ln 3, −log σ(ln 3) = ln(1 + 1/3) = ln(4/3), so
    with λ = 0.1 the loss is ln 2 + 0.1·ln(4/3)."""
    out = dpo_loss(t([2 * math.log(0.5)]), t([3 * math.log(0.25)]), None, None, variant="orpo",
                   chosen_tokens=t([2.0]), rejected_tokens=t([3.0]))
    assert_close(out.losses, t([math.log(2.0) + 0.1 * math.log(4.0 / 3.0)]), atol=1e-12, rtol=0)


def test_kto_default_beta_is_one_tenth():
    """r = 2 − (−8) = 10, KL 0 so z = 0; desirable: 1 − σ(0.1·10) = 1 − σ(1); rewards β·r = 1."""
    out = kto_loss(t([2.0]), t([-8.0]), torch.tensor([True]), 0.0)
    assert_close(out.losses, t([1.0 - sigmoid(1.0)]), atol=1e-12, rtol=0)
    assert_close(out.rewards, t([1.0]), atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------ check boundaries


def test_dpo_beta_zero_is_rejected_by_the_beta_check():
    """β = 0 is not > 0: the message is the one about β itself (not the β⁺/β⁻ one), and it is
    raised even when β⁺ and β⁻ are both given."""
    x = t([-1.0])
    assert message(lambda: dpo_loss(x, x, x, x, beta=0.0), ConfigError) == (
        "DPO beta must be > 0, got 0.0")
    assert message(lambda: dpo_loss(x, x, x, x, beta=0.0, beta_chosen=0.1, beta_rejected=0.1),
                   ConfigError) == "DPO beta must be > 0, got 0.0"


def test_dpo_beta_rejected_zero_is_rejected():
    x = t([-1.0])
    assert message(lambda: dpo_loss(x, x, x, x, beta_chosen=0.1, beta_rejected=0.0),
                   ConfigError) == "beta_chosen and beta_rejected must be > 0, got 0.1, 0.0"


def test_kto_weights_of_zero_and_below_one_are_legal():
    """policy = ref = 0, KL 0: r = z = 0, so both classes have 1 − σ(0) = 1/2 before the
    weights. (λ_D, λ_U) = (0, 1) → [0, 1/2]; (0.5, 1) → [1/4, 1/2]; (1, 0) → [1/2, 0]."""
    x = t([0.0, 0.0])
    good = torch.tensor([True, False])
    for wd, wu, want in [(0.0, 1.0, [0.0, 0.5]), (0.5, 1.0, [0.25, 0.5]),
                         (1.0, 0.0, [0.5, 0.0])]:
        out = kto_loss(x, x, good, 0.0, desirable_weight=wd, undesirable_weight=wu)
        assert_close(out.losses, t(want), atol=1e-12, rtol=0, msg=f"{wd}, {wu}")


def test_kto_one_negative_weight_is_enough_to_reject():
    x = t([0.0, 0.0])
    good = torch.tensor([True, False])
    assert message(lambda: kto_loss(x, x, good, 0.0, desirable_weight=-1.0), ConfigError) == (
        "KTO weights must be >= 0, got -1.0, 1.0")
    assert message(lambda: kto_loss(x, x, good, 0.0, undesirable_weight=-0.5), ConfigError) == (
        "KTO weights must be >= 0, got 1.0, -0.5")


# ------------------------------------------------------------------------------- KTO class means


def test_kto_class_means_count_each_class_on_its_own():
    """β = 1, ref = 0, KL 0, so the rewards are the policy log-probs.
    [1, 2, 3 | 4] with the first three desirable: desirable (1 + 2 + 3)/3 = 2, undesirable 4/1.
    [1 | 2, 3] with only the first desirable: desirable 1/1 = 1, undesirable (2 + 3)/2 = 2.5."""
    out = kto_loss(t([1.0, 2.0, 3.0, 4.0]), t([0.0, 0.0, 0.0, 0.0]),
                   torch.tensor([True, True, True, False]), 0.0, beta=1.0)
    assert_close(out.metrics["kto/rewards_desirable"], t(2.0), atol=1e-12, rtol=0)
    assert_close(out.metrics["kto/rewards_undesirable"], t(4.0), atol=1e-12, rtol=0)
    out = kto_loss(t([1.0, 2.0, 3.0]), t([0.0, 0.0, 0.0]), torch.tensor([True, False, False]),
                   0.0, beta=1.0)
    assert_close(out.metrics["kto/rewards_desirable"], t(1.0), atol=1e-12, rtol=0)
    assert_close(out.metrics["kto/rewards_undesirable"], t(2.5), atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------- dtype and device


def test_kto_kl_given_as_a_float_is_put_on_the_inputs_device():
    """`meta` is a second device on any machine: a float KL estimate becomes a tensor on the
    log-probs' device, and so does everything returned."""
    x = torch.zeros(2, dtype=D, device="meta")
    out = kto_loss(x, x, torch.tensor([True, False], device="meta"), 0.5)
    assert out.metrics["kto/kl"].device.type == "meta"
    assert out.losses.device.type == "meta"


def test_length_normalised_losses_keep_the_logps_dtype():
    """Lengths given in float64 (or int64) are cast to the log-probs' dtype: float32 log-probs
    give float32 losses and rewards. y⁺ −2 over 2, y⁻ −4 over 4, β = 1, γ = 0: logit 0, loss
    ln 2 (SimPO)."""
    pc, pr = torch.tensor([-2.0]), torch.tensor([-4.0])
    for lengths in ((t([2.0]), t([4.0])), (torch.tensor([2]), torch.tensor([4]))):
        for variant in ("simpo", "orpo"):
            out = dpo_loss(pc, pr, None, None, variant=variant, beta=1.0, simpo_gamma=0.0,
                           chosen_tokens=lengths[0], rejected_tokens=lengths[1])
            assert out.losses.dtype == torch.float32, variant
            assert out.chosen_rewards.dtype == torch.float32, variant
            if variant == "simpo":
                assert_close(out.losses, torch.tensor([math.log(2.0)]), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------- error texts


def test_bradley_terry_errors_name_the_argument_and_its_reference():
    c = t([1.0, 2.0])
    assert message(lambda: bradley_terry_loss(c, t([1.0, 2.0, 3.0]))) == mismatch(
        "rejected_scores", "chosen_scores")
    assert message(lambda: bradley_terry_loss(c, c, margin=t([1.0, 2.0, 3.0]))) == mismatch(
        "margin", "chosen_scores")


def test_dpo_shape_errors_name_the_argument_and_its_reference():
    x, long = t([-1.0, -2.0]), t([-1.0, -2.0, -3.0])
    ref = "policy_chosen_logp"
    assert message(lambda: dpo_loss(x, long, x, x)) == mismatch("policy_rejected_logp", ref)
    assert message(lambda: dpo_loss(x, x, long, x)) == mismatch("ref_chosen_logp", ref)
    assert message(lambda: dpo_loss(x, x, x, long)) == mismatch("ref_rejected_logp", ref)
    assert message(lambda: dpo_loss(x, x, x, x, sft_alpha=0.1, chosen_nll=long)) == mismatch(
        "chosen_nll", ref)
    n = t([1.0, 1.0])
    assert message(lambda: dpo_loss(x, x, None, None, variant="simpo", chosen_tokens=long,
                                    rejected_tokens=n)) == mismatch("chosen_tokens", ref)
    assert message(lambda: dpo_loss(x, x, None, None, variant="orpo", chosen_tokens=n,
                                    rejected_tokens=long)) == mismatch("rejected_tokens", ref)


def test_dpo_config_errors_read_as_documented():
    x = t([-1.0])
    assert message(lambda: dpo_loss(x, x, None, x), ConfigError) == (
        "dpo_loss needs reference log-probs unless reference_free=True")
    assert message(lambda: dpo_loss(x, x, x, x, sft_alpha=0.1), ConfigError) == (
        "DPO+SFT (sft_alpha > 0) needs `chosen_nll`")
    assert message(lambda: dpo_loss(x, x, None, None, variant="simpo"), ConfigError) == (
        "DPO variant 'simpo' is length-normalised and needs `chosen_tokens` (B,)")
    assert message(lambda: dpo_loss(x, x, None, None, variant="orpo", chosen_tokens=t([1.0])),
                   ConfigError) == (
        "DPO variant 'orpo' is length-normalised and needs `rejected_tokens` (B,)")


def test_kto_kl_estimate_errors_name_the_argument():
    x = t([-1.0, -2.0])
    assert message(lambda: kto_kl_estimate([-1.0, -2.0], x)) == (
        "`kl_policy_logp` must be a torch.Tensor, got list")
    assert message(lambda: kto_kl_estimate(t([[-1.0, -2.0]]), t([[-1.0, -2.0]]))) == (
        "`kl_policy_logp` must have 1 dimensions, got shape (1, 2)")
    assert message(lambda: kto_kl_estimate(torch.tensor([-1, -2]), x)) == (
        "`kl_policy_logp` must be a floating-point tensor, got dtype torch.int64")
    assert message(lambda: kto_kl_estimate(x, t([-1.0, -2.0, -3.0]))) == mismatch(
        "kl_ref_logp", "kl_policy_logp")


def test_kto_loss_errors_name_the_argument():
    x = t([-1.0, -2.0])
    good = torch.tensor([True, False])
    assert message(lambda: kto_loss([-1.0, -2.0], x, good, 0.0)) == (
        "`policy_logp` must be a torch.Tensor, got list")
    assert message(lambda: kto_loss(t([[-1.0, -2.0]]), t([[-1.0, -2.0]]),
                                    torch.tensor([[True, False]]), 0.0)) == (
        "`policy_logp` must have 1 dimensions, got shape (1, 2)")
    assert message(lambda: kto_loss(torch.tensor([-1, -2]), x, good, 0.0)) == (
        "`policy_logp` must be a floating-point tensor, got dtype torch.int64")
    assert message(lambda: kto_loss(x, t([-1.0, -2.0, -3.0]), good, 0.0)) == mismatch(
        "ref_logp", "policy_logp")
    assert message(lambda: kto_loss(x, x, torch.tensor([True, False, True]), 0.0)) == mismatch(
        "desirable", "policy_logp")
    assert message(lambda: kto_loss(x, x, torch.tensor([1, 0]), 0.0)) == (
        "`desirable` must be a bool tensor, got dtype torch.int64")
