"""token_logprobs / token_logprobs_and_entropy: hand values, the plain computation, gradients,
dtypes, masked labels, that the chunking really bounds the rows seen at once, and errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from posttrain.algos import logprobs as logprobs_module
from posttrain.algos import token_logprobs, token_logprobs_and_entropy
from posttrain.errors import ShapeError

D = torch.float64


def t(x):
    return torch.tensor(x, dtype=D)


def plain(logits, labels, temperature=1.0):
    """The reference: the full (B, T, V) log-softmax at once."""
    logp_all = (logits / temperature).log_softmax(-1)
    logp = logp_all.gather(-1, labels[..., None].long())[..., 0]
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp, ent


def random_case(b=3, t_=5, v=11, seed=0, dtype=D):
    g = torch.Generator().manual_seed(seed)
    logits = (3.0 * torch.randn(b, t_, v, generator=g, dtype=D)).to(dtype)
    labels = torch.randint(0, v, (b, t_), generator=g)
    return logits, labels


# B*T = 15 rows: 1, 2, 4 and 7 do not divide 15 (or give a ragged last chunk), 15 is exact,
# 100 is larger than B*T, None is the default (16M logits per chunk, here one chunk).
CHUNKS = [1, 2, 4, 7, 15, 100, None]


# ---------------------------------------------------------------------------------------------
# Hand-derived values


def test_hand_derived_logprob_and_entropy():
    # logits [0, ln 2, ln 3] -> exp = [1, 2, 3], sum 6 -> softmax p = [1/6, 2/6, 3/6].
    # log p(label 2) = ln(3/6) = ln(1/2); log p(label 0) = ln(1/6).
    # H = -(1/6 ln 1/6 + 1/3 ln 1/3 + 1/2 ln 1/2).
    logits = torch.log(t([[[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]]))  # (1, 2, 3)
    labels = torch.tensor([[2, 0]])
    h = -(1 / 6 * math.log(1 / 6) + 1 / 3 * math.log(1 / 3) + 1 / 2 * math.log(1 / 2))
    logp, ent = token_logprobs_and_entropy(logits, labels)
    assert_close(logp, t([[math.log(1 / 2), math.log(1 / 6)]]), atol=1e-14, rtol=0)
    assert_close(ent, t([[h, h]]), atol=1e-14, rtol=0)
    assert_close(token_logprobs(logits, labels), logp, atol=0, rtol=0)


def test_hand_derived_is_shift_invariant_and_stable_for_large_logits():
    # softmax(z + c) = softmax(z): adding 1000 (exp(1000) overflows float64) changes nothing.
    logits = 1000.0 + torch.log(t([[[1.0, 2.0, 3.0]]]))
    h = -(1 / 6 * math.log(1 / 6) + 1 / 3 * math.log(1 / 3) + 1 / 2 * math.log(1 / 2))
    logp, ent = token_logprobs_and_entropy(logits, torch.tensor([[2]]))
    assert_close(logp, t([[math.log(1 / 2)]]), atol=1e-12, rtol=0)
    assert_close(ent, t([[h]]), atol=1e-12, rtol=0)


def test_float32_entropy_is_as_accurate_as_the_plain_computation_for_offset_logits():
    # LM logits often sit around a large common offset (here 50). Entropy is shift-invariant,
    # so the float32 result should be as close to the float64 truth as the plain float32
    # -sum(p log p) is (about 2e-6 here). H = lse - sum(p z) cancels two numbers of size ~50
    # and loses that accuracy; H = -sum(p (z - lse)) does not.
    g = torch.Generator().manual_seed(5)
    x = 50.0 + 2.0 * torch.randn(2, 4, 4096, generator=g)
    labels = torch.zeros(2, 4, dtype=torch.long)
    truth = plain(x.double(), labels)[1]
    plain32 = plain(x, labels)[1]
    assert_close(plain32.double(), truth, atol=1e-5, rtol=0)  # the bar is reachable
    _, ent = token_logprobs_and_entropy(x, labels)
    assert_close(ent.double(), truth, atol=1e-5, rtol=0)


def test_hand_derived_with_temperature():
    # logits [0, ln 2, ln 3], temperature 0.5 -> z = logits / 0.5 = [0, 2 ln 2, 2 ln 3]
    # -> exp = [1, 4, 9], sum 14 -> p = [1/14, 4/14, 9/14].
    # log p(label 1) = ln(4/14) = ln(2/7);  H = -sum p ln p.
    logits = torch.log(t([[[1.0, 2.0, 3.0]]]))
    p = [1 / 14, 4 / 14, 9 / 14]
    h = -sum(pi * math.log(pi) for pi in p)
    logp, ent = token_logprobs_and_entropy(logits, torch.tensor([[1]]), temperature=0.5)
    assert_close(logp, t([[math.log(2 / 7)]]), atol=1e-14, rtol=0)
    assert_close(ent, t([[h]]), atol=1e-14, rtol=0)
    # temperature 2 on logits [0, 2 ln 2, 2 ln 3] gives back z = [0, ln 2, ln 3]: p(2) = 1/2.
    logits2 = 2.0 * torch.log(t([[[1.0, 2.0, 3.0]]]))
    out = token_logprobs(logits2, torch.tensor([[2]]), temperature=2.0)
    assert_close(out, t([[math.log(1 / 2)]]), atol=1e-14, rtol=0)


def test_hand_derived_gradients():
    # p = [1/6, 1/3, 1/2], label y = 2, temperature 1:
    #   d logp / dz_j = 1[j = y] - p_j           = [-1/6, -1/3, 1/2]
    #   d H / dz_j    = -p_j (ln p_j + H)
    # and with temperature tau both are divided by tau (z = logits / tau).
    p = [1 / 6, 1 / 3, 1 / 2]
    h = -sum(pi * math.log(pi) for pi in p)
    for tau in (1.0, 0.5):
        # choose logits so that z = logits / tau = [0, ln 2, ln 3] for every tau
        logits = (tau * torch.log(t([[[1.0, 2.0, 3.0]]]))).requires_grad_()
        logp, ent = token_logprobs_and_entropy(logits, torch.tensor([[2]]), temperature=tau)
        (g_logp,) = torch.autograd.grad(logp.sum(), logits, retain_graph=True)
        (g_ent,) = torch.autograd.grad(ent.sum(), logits)
        assert_close(g_logp, t([[[-1 / 6, -1 / 3, 1 / 2]]]) / tau, atol=1e-14, rtol=0)
        expected = [-pi * (math.log(pi) + h) / tau for pi in p]
        assert_close(g_ent, t([[expected]]), atol=1e-14, rtol=0)


# ---------------------------------------------------------------------------------------------
# Equality to the plain computation


@pytest.mark.parametrize("chunk_rows", CHUNKS)
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
def test_equals_the_plain_computation(chunk_rows, temperature):
    logits, labels = random_case()
    ref_logp, ref_ent = plain(logits, labels, temperature)
    logp, ent = token_logprobs_and_entropy(logits, labels, temperature, chunk_rows=chunk_rows)
    assert logp.shape == ent.shape == (3, 5)
    assert_close(logp, ref_logp, atol=1e-12, rtol=0)
    assert_close(ent, ref_ent, atol=1e-12, rtol=0)
    only = token_logprobs(logits, labels, temperature, chunk_rows=chunk_rows)
    assert_close(only, ref_logp, atol=1e-12, rtol=0)


def test_splitting_the_batch_changes_nothing():
    logits, labels = random_case(b=4)
    logp, ent = token_logprobs_and_entropy(logits, labels, chunk_rows=3)
    for i in range(4):
        li, ei = token_logprobs_and_entropy(logits[i : i + 1], labels[i : i + 1], chunk_rows=2)
        assert_close(li, logp[i : i + 1], atol=0, rtol=0)
        assert_close(ei, ent[i : i + 1], atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# Gradients


@pytest.mark.parametrize("chunk_rows", CHUNKS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_gradients_equal_the_plain_computation(chunk_rows, temperature):
    logits, labels = random_case(seed=1)
    g = torch.Generator().manual_seed(2)
    up_logp = torch.randn(3, 5, generator=g, dtype=D)
    up_ent = torch.randn(3, 5, generator=g, dtype=D)

    x_ref = logits.clone().requires_grad_()
    ref_logp, ref_ent = plain(x_ref, labels, temperature)
    (ref_both,) = torch.autograd.grad((ref_logp * up_logp + ref_ent * up_ent).sum(), x_ref)
    x_ref2 = logits.clone().requires_grad_()
    (ref_only,) = torch.autograd.grad((plain(x_ref2, labels, temperature)[0] * up_logp).sum(),
                                      x_ref2)

    x = logits.clone().requires_grad_()
    logp, ent = token_logprobs_and_entropy(x, labels, temperature, chunk_rows=chunk_rows)
    (both,) = torch.autograd.grad((logp * up_logp + ent * up_ent).sum(), x)
    assert_close(both, ref_both, atol=1e-12, rtol=0)

    x2 = logits.clone().requires_grad_()
    logp2 = token_logprobs(x2, labels, temperature, chunk_rows=chunk_rows)
    (only,) = torch.autograd.grad((logp2 * up_logp).sum(), x2)
    assert_close(only, ref_only, atol=1e-12, rtol=0)

    # Using only the log-prob output of token_logprobs_and_entropy gives the same gradient.
    x3 = logits.clone().requires_grad_()
    logp3, _ = token_logprobs_and_entropy(x3, labels, temperature, chunk_rows=chunk_rows)
    (only3,) = torch.autograd.grad((logp3 * up_logp).sum(), x3)
    assert_close(only3, ref_only, atol=1e-12, rtol=0)


@pytest.mark.parametrize("chunk_rows", [1, 4, None])
def test_gradcheck(chunk_rows):
    logits, labels = random_case(b=2, t_=3, v=5, seed=3)
    x = logits.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda z: token_logprobs(z, labels, 0.8, chunk_rows=chunk_rows), (x,)
    )
    assert torch.autograd.gradcheck(
        lambda z: token_logprobs_and_entropy(z, labels, 0.8, chunk_rows=chunk_rows), (x,)
    )


def test_no_grad_needed_when_logits_do_not_require_it():
    logits, labels = random_case()
    logp, ent = token_logprobs_and_entropy(logits, labels)
    assert not logp.requires_grad and not ent.requires_grad


# ---------------------------------------------------------------------------------------------
# Dtypes


@pytest.mark.parametrize(
    ("dtype", "out_dtype"),
    [
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
    ],
)
def test_output_and_grad_dtypes(dtype, out_dtype):
    logits, labels = random_case(dtype=dtype)
    x = logits.clone().requires_grad_()
    logp, ent = token_logprobs_and_entropy(x, labels, chunk_rows=4)
    assert logp.dtype == out_dtype and ent.dtype == out_dtype
    assert token_logprobs(x, labels, chunk_rows=4).dtype == out_dtype
    (grad,) = torch.autograd.grad((logp + ent).sum(), x)
    assert grad.dtype == dtype

    # Values: the plain computation on the logits upcast to out_dtype (exactly what the rows
    # of a chunk are), so the low-precision input adds no error of its own.
    xr = logits.to(out_dtype).requires_grad_()
    ref_logp, ref_ent = plain(xr, labels)
    (ref_grad,) = torch.autograd.grad((ref_logp + ref_ent).sum(), xr)
    tol = 1e-12 if out_dtype == torch.float64 else 1e-5
    assert_close(logp, ref_logp, atol=tol, rtol=0)
    assert_close(ent, ref_ent, atol=tol, rtol=0)
    # The grad is computed in out_dtype and rounded once to the logits' dtype.
    assert_close(grad, ref_grad.to(dtype), atol=tol, rtol=torch.finfo(dtype).eps)


# ---------------------------------------------------------------------------------------------
# Masked-out labels


@pytest.mark.parametrize("pad_id", [-100, -1])
def test_masked_label_ids_do_not_crash_and_leave_valid_positions_alone(pad_id):
    logits, labels = random_case(seed=4)
    masked = labels.clone()
    masked[0, 3:] = pad_id
    masked[2, :2] = pad_id
    valid = masked != pad_id
    x = logits.clone().requires_grad_()
    logp, ent = token_logprobs_and_entropy(x, masked, chunk_rows=4)
    ref_logp, ref_ent = plain(logits, labels)
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all()
    assert_close(logp[valid], ref_logp[valid], atol=1e-12, rtol=0)
    # Entropy does not depend on the label at all.
    assert_close(ent, ref_ent, atol=1e-12, rtol=0)
    # With the usual masked loss (zero upstream grad off the mask), masked rows get zero grad.
    (grad,) = torch.autograd.grad((logp * valid).sum(), x)
    assert torch.isfinite(grad).all()
    assert (grad[~valid] == 0).all()
    xr = logits.clone().requires_grad_()
    (ref_grad,) = torch.autograd.grad((plain(xr, labels)[0] * valid).sum(), xr)
    assert_close(grad, ref_grad, atol=1e-12, rtol=0)


def test_int32_labels_work():
    logits, labels = random_case()
    assert_close(
        token_logprobs(logits, labels.int()), plain(logits, labels)[0], atol=1e-12, rtol=0
    )


# ---------------------------------------------------------------------------------------------
# The chunking really happens: no softmax over more than chunk_rows rows at once


def _spy(monkeypatch, name):
    rows: list[int] = []
    real = getattr(torch, name)

    def spy(z, *args, **kwargs):
        rows.append(z.shape[0])
        return real(z, *args, **kwargs)

    monkeypatch.setattr(torch, name, spy)
    return rows


@pytest.mark.parametrize("chunk_rows", [1, 4, 7])
def test_forward_and_backward_see_at_most_chunk_rows_rows(monkeypatch, chunk_rows):
    logits, labels = random_case()  # 15 rows of 11 logits
    x = logits.clone().requires_grad_()
    fwd_rows = _spy(monkeypatch, "logsumexp")
    bwd_rows = _spy(monkeypatch, "log_softmax")
    logp, ent = token_logprobs_and_entropy(x, labels, chunk_rows=chunk_rows)
    n_chunks = math.ceil(15 / chunk_rows)
    # forward: one logsumexp per chunk, every row covered once, none bigger than chunk_rows
    assert len(fwd_rows) == n_chunks and sum(fwd_rows) == 15
    assert max(fwd_rows) <= chunk_rows
    assert bwd_rows == []
    (logp + ent).sum().backward()
    assert len(bwd_rows) == n_chunks and sum(bwd_rows) == 15
    assert max(bwd_rows) <= chunk_rows
    monkeypatch.undo()
    ref_logp, ref_ent = plain(logits, labels)
    assert_close(logp, ref_logp, atol=1e-12, rtol=0)
    assert_close(ent, ref_ent, atol=1e-12, rtol=0)


def test_default_chunk_is_sized_by_the_vocabulary(monkeypatch):
    # Default chunk = max(1, elements // V) rows; with a budget of 40 logits and V = 11
    # that is 3 rows, so 15 rows take 5 chunks.
    monkeypatch.setattr(logprobs_module, "_DEFAULT_CHUNK_ELEMENTS", 40)
    rows = _spy(monkeypatch, "logsumexp")
    logits, labels = random_case()
    token_logprobs(logits, labels)
    assert rows == [3, 3, 3, 3, 3]
    # A vocabulary larger than the budget still makes progress one row at a time.
    rows.clear()
    logits, labels = random_case(b=1, t_=2, v=50)
    token_logprobs(logits, labels)
    assert rows == [1, 1]


# ---------------------------------------------------------------------------------------------
# Errors


def test_wrong_ndim_of_logits():
    with pytest.raises(ShapeError, match="`logits` must have 3 dimensions"):
        token_logprobs(torch.zeros(4, 5, dtype=D), torch.zeros(4, dtype=torch.long))


def test_wrong_ndim_of_labels():
    with pytest.raises(ShapeError, match="`labels` must have 2 dimensions"):
        token_logprobs(torch.zeros(2, 3, 5, dtype=D), torch.zeros(6, dtype=torch.long))


def test_mismatched_shapes():
    with pytest.raises(ShapeError, match="`labels` has shape \\(2, 4\\) but `logits`"):
        token_logprobs_and_entropy(torch.zeros(2, 3, 5, dtype=D), torch.zeros(2, 4).long())


def test_non_float_logits():
    with pytest.raises(ShapeError, match="`logits` must be a floating-point tensor"):
        token_logprobs(torch.zeros(2, 3, 5, dtype=torch.long), torch.zeros(2, 3).long())


def test_non_tensor_logits():
    with pytest.raises(ShapeError, match=r"`logits` must be a torch\.Tensor"):
        token_logprobs([[[0.0]]], torch.zeros(1, 1).long())


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_non_positive_temperature(temperature):
    with pytest.raises(ShapeError, match="`temperature` must be > 0"):
        token_logprobs(torch.zeros(2, 3, 5, dtype=D), torch.zeros(2, 3).long(), temperature)


def test_non_positive_chunk_rows():
    with pytest.raises(ShapeError, match="`chunk_rows` must be >= 1"):
        token_logprobs(torch.zeros(2, 3, 5, dtype=D), torch.zeros(2, 3).long(), chunk_rows=0)


def test_shape_error_is_a_value_error():
    with pytest.raises(ValueError):
        token_logprobs(torch.zeros(2, 3, 5, dtype=D), torch.zeros(2, 3).long(), 0.0)
