"""token_logprobs beyond test_logprobs.py: the outputs live on the logits' device, and a
banned token (logit −inf, as a vocabulary mask leaves it) has probability 0 and poisons neither
the log-prob nor the gradient of the allowed tokens. Found missing by mutation testing
(docs/testing.md)."""

from __future__ import annotations

import math

import torch
from torch.testing import assert_close

from posttrain.algos import token_logprobs, token_logprobs_and_entropy

D = torch.float64


def t(x):
    return torch.tensor(x, dtype=D)


def test_outputs_are_on_the_device_of_the_logits():
    """The output buffers are allocated on the logits' device; `meta` is a second device on
    any machine (writing a meta result into a CPU buffer is an error)."""
    logits = torch.zeros(2, 3, 5, device="meta")
    labels = torch.zeros(2, 3, dtype=torch.long, device="meta")
    logp = token_logprobs(logits, labels)
    assert logp.device.type == "meta" and logp.shape == (2, 3)
    logp, ent = token_logprobs_and_entropy(logits, labels)
    assert logp.device.type == "meta" and ent.device.type == "meta"
    assert ent.shape == (2, 3) and ent.dtype == torch.float32


def test_a_banned_token_gets_no_probability_and_no_nan_gradient():
    """Logits [0, 0, −inf], label 0: p = [1/2, 1/2, 0], so log p_0 = −ln 2, and
    d log p_0 / dz_j = 1[j = 0] − p_j = [1/2, −1/2, 0]; with temperature 2 the log-prob is the
    same (z/2 keeps the two finite logits equal) and the gradient is halved, [1/4, −1/4, 0]."""
    for temperature, scale in [(1.0, 1.0), (2.0, 0.5)]:
        logits = t([[[0.0, 0.0, -math.inf]]]).requires_grad_()
        logp = token_logprobs(logits, torch.tensor([[0]]), temperature=temperature)
        assert_close(logp, t([[-math.log(2.0)]]), atol=1e-12, rtol=0)
        logp.sum().backward()
        assert_close(logits.grad, t([[[0.5 * scale, -0.5 * scale, 0.0]]]), atol=1e-12, rtol=0)


def test_a_banned_token_adds_nothing_to_the_entropy_nor_its_gradient():
    """Logits [ln 1, ln 3, −inf]: p = [1/4, 3/4, 0] and 0·log 0 = 0, so
    H = −(¼ ln ¼ + ¾ ln ¾) = ln 4 − ¾ ln 3, and dH/dz_j = −p_j (log p_j + H):
        j = 0: −¼ (−ln 4 + ln 4 − ¾ ln 3) = (3/16) ln 3
        j = 1: −¾ (ln 3 − ln 4 + ln 4 − ¾ ln 3) = −(3/16) ln 3
        j = 2: 0
    The gradient of log p_1 alone (the entropy unused) is 1[j = 1] − p_j = [−¼, ¼, 0]: an
    entropy that is computed but not used must not make it NaN."""
    ln3 = math.log(3.0)
    logits = t([[[0.0, ln3, -math.inf]]]).requires_grad_()
    logp, ent = token_logprobs_and_entropy(logits, torch.tensor([[1]]))
    assert_close(logp, t([[math.log(0.75)]]), atol=1e-12, rtol=0)
    assert_close(ent, t([[math.log(4.0) - 0.75 * ln3]]), atol=1e-12, rtol=0)
    (grad_ent,) = torch.autograd.grad(ent.sum(), logits, retain_graph=True)
    assert_close(grad_ent, t([[[3 / 16 * ln3, -3 / 16 * ln3, 0.0]]]), atol=1e-12, rtol=0)
    (grad_logp,) = torch.autograd.grad(logp.sum(), logits)
    assert_close(grad_logp, t([[[-0.25, 0.25, 0.0]]]), atol=1e-12, rtol=0)
