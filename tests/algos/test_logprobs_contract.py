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
