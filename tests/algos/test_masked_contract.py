"""Masked statistics and aggregation at the small counts (one sequence, one or two tokens, a
constant), the documented defaults, and the errors users read. Found missing by mutation
testing (docs/testing.md)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from posttrain.algos import aggregate_loss, masked_mean, masked_sum, masked_var, masked_whiten
from posttrain.errors import ShapeError

D = torch.float64


def t(x):
    return torch.tensor(x, dtype=D)


def test_variance_of_one_and_two_tokens():
    """[1, 3]: mean 2, Σ(x − 2)² = 2, so biased 2/2 = 1 and unbiased 2/(2 − 1) = 2. One token
    [5] has mean 5 and biased variance 0 (the padding entry, NaN, is never read)."""
    both = torch.tensor([True, True])
    assert_close(masked_var(t([1.0, 3.0]), both), t(2.0), atol=1e-12, rtol=0)
    assert_close(masked_var(t([1.0, 3.0]), both, unbiased=False), t(1.0), atol=1e-12, rtol=0)
    one = torch.tensor([True, False])
    assert_close(masked_var(t([5.0, float("nan")]), one, unbiased=False), t(0.0), atol=0, rtol=0)


def test_whitening_a_constant_gives_zeros_not_nan():
    """var = 0: (x − mean)·rsqrt(0 + ε) = 0; ε is added, never subtracted, and the default
    ε = 1e-8 is the one documented."""
    x = t([[2.0, 2.0, 2.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    assert_close(masked_whiten(x, mask), t([[0.0, 0.0, 0.0]]), atol=0, rtol=0)
    y = t([[1.0, 2.0, 4.0]])
    assert_close(masked_whiten(y, mask), masked_whiten(y, mask, eps=1e-8), atol=0, rtol=0)


def test_aggregate_loss_of_a_single_sequence_with_the_default_counts():
    """One row [1, 3] over T = 2: seq-mean-token-mean = 2/1 sequence, seq-mean-token-sum-norm
    = (4/2)/1 row, token-mean = 4/2."""
    loss = t([[1.0, 3.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    for mode, want in [("seq-mean-token-mean", 2.0), ("seq-mean-token-sum-norm", 2.0),
                       ("token-mean", 2.0)]:
        assert_close(aggregate_loss(loss, mask, mode), t(want), atol=1e-12, rtol=0, msg=mode)


def test_masked_sum_and_mean_keep_the_masks_float_dtype():
    x = t([[1.0, 2.0], [3.0, float("nan")]])
    mask = torch.tensor([[True, True], [True, False]])
    assert_close(masked_sum(x, mask), t(6.0), atol=0, rtol=0)
    assert_close(masked_sum(x, mask, dim=1), t([3.0, 3.0]), atol=0, rtol=0)
    assert_close(masked_mean(x, mask, dim=1), t([1.5, 3.0]), atol=1e-12, rtol=0)


def message(fn):
    with pytest.raises(ShapeError) as err:
        fn()
    return str(err.value)


def test_errors_name_the_argument_and_its_reference():
    x = t([[1.0, 2.0]])
    wide = torch.ones(1, 3, dtype=torch.bool)
    mismatch = "`mask` has shape (1, 3) but `{}` has shape (1, 2); they must match"
    for fn in (masked_sum, masked_mean, masked_var, masked_whiten):
        assert message(lambda fn=fn: fn([1.0], wide)) == "`x` must be a torch.Tensor, got list"
        assert message(lambda fn=fn: fn(x, wide)) == mismatch.format("x")
    for fn in (masked_var, masked_whiten):
        assert message(lambda fn=fn: fn(x.long(), wide)) == (
            "`x` must be a floating-point tensor, got dtype torch.int64")
    assert message(lambda: aggregate_loss(x, wide, "token-mean")) == mismatch.format("loss_mat")


def test_whitening_uses_the_statistics_of_every_rank():
    """`reduce` = 2·x stands for two ranks holding the same [1, 2, 3]: the global batch is
    [1, 2, 3, 1, 2, 3], mean 2, Σ(x − 2)² = 4, unbiased var 4/5 = 0.8, so with ε = 0 the
    result is (x − 2)/√0.8 = [−√1.25, 0, √1.25] (one rank alone: var 1, [−1, 0, 1]). With
    shift_mean=False the mean 2 is added back."""
    x = t([[1.0, 2.0, 3.0, float("nan")]])
    mask = torch.tensor([[True, True, True, False]])
    s = 1.25**0.5
    out = masked_whiten(x, mask, eps=0.0, reduce=lambda v: 2 * v)
    assert_close(out, t([[-s, 0.0, s, 0.0]]), atol=1e-12, rtol=0)
    out = masked_whiten(x, mask, shift_mean=False, eps=0.0, reduce=lambda v: 2 * v)
    assert_close(out, t([[2.0 - s, 2.0, 2.0 + s, 0.0]]), atol=1e-12, rtol=0)
