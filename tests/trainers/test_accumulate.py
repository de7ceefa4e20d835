"""The accumulation primitive on a model small enough to check by hand."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from posttrain.distributed import Dist
from posttrain.errors import NonFiniteError
from posttrain.trainers.accumulate import Accumulator, backward

X = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5], [-2.0, 1.0]])
Y = torch.tensor([1.0, -1.0, 0.0, 2.0])


def linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(2, 1)


def mse_job(model, rows, n_total, poison=1.0):
    """A micro-batch's squared error, divided by the whole step's row count."""

    def job():
        err = model(X[rows]).squeeze(-1) - Y[rows]
        loss = (err**2).sum() / n_total * poison
        return loss, {"rows": torch.tensor(float(len(rows))), "debug/abs": err.abs().sum()}

    return job


def accumulator(model, **kw) -> Accumulator:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return Accumulator("model", opt, model, Dist(), contextlib.nullcontext, **kw)


def test_micro_batches_give_the_full_batch_gradient_and_one_sgd_step():
    whole, split = linear(), linear()
    out_w = accumulator(whole, max_grad_norm=None).step([mse_job(whole, [0, 1, 2, 3], 4)], 1)
    out_s = accumulator(split, max_grad_norm=None).step(
        [mse_job(split, [0], 4), mse_job(split, [1, 2], 4), mse_job(split, [3], 4)], 1)
    for p, q in zip(whole.parameters(), split.parameters(), strict=True):
        assert_close(p, q, atol=1e-7, rtol=0)
    assert_close(out_w["train/loss"], out_s["train/loss"], atol=1e-6, rtol=0)
    # metric sums over the jobs; a key without a namespace gets the prefix
    assert out_s["train/rows"] == 4.0 and "debug/abs" in out_s
    # the step is SGD on the mean squared error: w -= lr · ∂/∂w mean((w·x + b − y)²)
    ref = linear()
    loss = ((ref(X).squeeze(-1) - Y) ** 2).mean()
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    for p, q, g in zip(whole.parameters(), ref.parameters(), grads, strict=True):
        assert_close(p, q - 0.1 * g, atol=1e-6, rtol=0)
    assert_close(out_w["train/grad_norm"],
                 float(torch.cat([g.flatten() for g in grads]).norm()), atol=1e-5, rtol=0)


def test_clipping_caps_the_norm_of_the_step():
    model = linear()
    before = [p.detach().clone() for p in model.parameters()]
    out = accumulator(model, max_grad_norm=0.01).step([mse_job(model, [0, 1, 2, 3], 4)], 1)
    moved = torch.cat([(p - b).flatten() for p, b in zip(model.parameters(), before,
                                                         strict=True)])
    assert out["train/grad_norm"] > 0.01  # the unclipped norm is reported
    assert_close(moved.norm(), torch.tensor(0.1 * 0.01), atol=1e-7, rtol=1e-4)


def test_a_non_finite_step_is_skipped_and_counted_or_stops():
    model = linear()
    before = [p.detach().clone() for p in model.parameters()]
    acc = accumulator(model, on_nonfinite="skip", prefix="value/")
    out = acc.step([mse_job(model, [0, 1], 4), mse_job(model, [2, 3], 4, float("nan"))], 7)
    assert out["value/skipped"] == 1.0 and acc.skipped == 1 and "value/grad_norm" not in out
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)
        assert p.grad is None  # nothing left over for the next step
    acc = accumulator(model, on_nonfinite="stop", hint=lambda: "Last good checkpoint: x. ")
    acc.name = "critic"
    with pytest.raises(NonFiniteError, match=r"step 9: the loss is inf \(critic\).*checkpoint: x"):
        acc.step([mse_job(model, [0], 4, float("inf"))], 9)


def test_backward_without_jobs_on_one_process_is_a_zero_loss():
    model = linear()
    loss, sums = backward([], model, Dist(), contextlib.nullcontext)
    assert float(loss) == 0.0 and sums == {}
