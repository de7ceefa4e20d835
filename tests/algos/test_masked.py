"""masked_* reductions and aggregate_loss: hand values, loop references, invariances."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from posttrain.algos import aggregate_loss, masked_mean, masked_sum, masked_var, masked_whiten
from posttrain.errors import ConfigError, ShapeError

D = torch.float64


def t(x):
    return torch.tensor(x, dtype=D)


X = t([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -7.0, -9.0]])
M = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)


def test_masked_sum_and_mean_by_hand():
    # counted entries: 1, 2, 3 | 4  -> sum 10, mean 10/4 = 2.5
    assert_close(masked_sum(X, M), t(10.0), atol=0, rtol=0)
    assert_close(masked_mean(X, M), t(2.5), atol=0, rtol=0)
    # per row: (1+2+3)/3 = 2, 4/1 = 4
    assert_close(masked_mean(X, M, dim=1), t([2.0, 4.0]), atol=0, rtol=0)
    assert_close(masked_sum(X, M, dim=1), t([6.0, 4.0]), atol=0, rtol=0)


def test_masked_mean_of_an_empty_row_is_zero():
    empty = torch.zeros_like(M)
    assert_close(masked_mean(X, empty, dim=1), t([0.0, 0.0]), atol=0, rtol=0)


def test_masked_var_by_hand():
    # entries 1, 2, 3, 4: mean 2.5, squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5
    # unbiased 5/3, biased 5/4
    assert_close(masked_var(X, M), t(5.0 / 3.0), atol=1e-15, rtol=0)
    assert_close(masked_var(X, M, unbiased=False), t(1.25), atol=1e-15, rtol=0)


def test_masked_var_with_reduce_sums_statistics_across_ranks():
    # Two "ranks" each hold half the batch; a reduce that adds the other rank's partial
    # statistics must give the variance of the whole batch.
    a, b = X[:1], X[1:]
    ma, mb = M[:1], M[1:]

    def stats(x, m):
        m = m.to(D)
        return torch.stack([(x * m).sum(), m.sum()])

    other = {"stats": stats(b, mb)}

    def reduce(v):
        if v.dim() == 1:  # first call: [sum, count]
            return v + other["stats"]
        mean = (stats(X, M)[0] / stats(X, M)[1])
        return v + ((b - mean) ** 2 * mb.to(D)).sum()

    assert_close(masked_var(a, ma, reduce=reduce), masked_var(X, M), atol=1e-15, rtol=0)


def test_masked_whiten_has_zero_mean_unit_variance_and_zero_padding():
    w = masked_whiten(X, M, eps=0.0)
    # (x - 2.5) / sqrt(5/3)
    expected = (t([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]]) - 2.5) / math.sqrt(5 / 3)
    expected = expected * M.to(D)
    assert_close(w, expected, atol=1e-15, rtol=0)
    assert_close(masked_mean(w, M), t(0.0), atol=1e-15, rtol=0)
    assert_close(masked_var(w, M), t(1.0), atol=1e-15, rtol=0)


def test_masked_whiten_without_shifting_keeps_the_mean():
    w = masked_whiten(X, M, shift_mean=False, eps=0.0)
    # scale only: (x - 2.5)/s + 2.5 on the mask
    assert_close(masked_mean(w, M), t(2.5), atol=1e-14, rtol=0)
    assert_close(masked_var(w, M), t(1.0), atol=1e-14, rtol=0)


def _aggregate_loop(loss, mask, mode, norm_len=None):
    """Plain-Python reference of the three modes."""
    rows = []
    total, count = 0.0, 0
    for i in range(loss.shape[0]):
        vals = [float(loss[i, j]) for j in range(loss.shape[1]) if mask[i, j]]
        total += sum(vals)
        count += len(vals)
        if mode == "seq-mean-token-mean" and vals:  # a row with no token is not a sequence
            rows.append(sum(vals) / len(vals))
        elif mode == "seq-mean-token-sum-norm":  # Dr. GRPO's 1/G counts every row
            rows.append(sum(vals) / (norm_len or loss.shape[1]))
    if mode == "token-mean":
        return total / count
    return sum(rows) / len(rows)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_aggregate_loss_matches_loop(mode):
    g = torch.Generator().manual_seed(0)
    loss = torch.randn(6, 9, generator=g, dtype=D)
    lengths = [9, 1, 4, 0, 7, 2]  # a row with no token: no sequence, but a row (Dr. GRPO)
    mask = torch.tensor([[j < n for j in range(9)] for n in lengths])
    got = aggregate_loss(loss, mask, mode)
    assert_close(got, t(_aggregate_loop(loss, mask, mode)), atol=1e-14, rtol=0)


def test_aggregate_loss_modes_by_hand():
    loss = t([[1.0, 3.0, 0.0], [6.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # token-mean: (1 + 3 + 6) / 3
    assert_close(aggregate_loss(loss, mask, "token-mean"), t(10 / 3), atol=1e-15, rtol=0)
    # seq-mean-token-mean: ((1+3)/2 + 6/1) / 2 = (2 + 6)/2 = 4
    assert_close(aggregate_loss(loss, mask, "seq-mean-token-mean"), t(4.0), atol=0, rtol=0)
    # seq-mean-token-sum-norm, constant 4: ((1+3)/4 + 6/4) / 2 = 1.25
    got = aggregate_loss(loss, mask, "seq-mean-token-sum-norm", norm_len=4)
    assert_close(got, t(1.25), atol=0, rtol=0)
    # default constant is T = 3: (4/3 + 6/3)/2 = 5/3
    got = aggregate_loss(loss, mask, "seq-mean-token-sum-norm")
    assert_close(got, t(5 / 3), atol=1e-15, rtol=0)


def test_seed_example_token_weights_short_and_long_sequence():
    # Seed 001: sequence A has 10 tokens, B has 1000. The gradient of the aggregated loss
    # with respect to each token's loss is that token's weight.
    loss = torch.zeros(2, 1000, dtype=D, requires_grad=True)
    mask = torch.zeros(2, 1000, dtype=torch.bool)
    mask[0, :10] = True
    mask[1, :] = True
    aggregate_loss(loss, mask, "token-mean").backward()
    # token-mean: every token weighs 1/1010, whichever sequence it is in
    assert_close(loss.grad[0, 0], t(1 / 1010), atol=1e-18, rtol=0)
    assert_close(loss.grad[1, 0], t(1 / 1010), atol=1e-18, rtol=0)
    loss.grad = None
    aggregate_loss(loss, mask, "seq-mean-token-mean").backward()
    # seq-mean-token-mean: a token of A weighs 1/2 · 1/10, a token of B 1/2 · 1/1000: 100x less
    assert_close(loss.grad[0, 0], t(1 / 20), atol=1e-18, rtol=0)
    assert_close(loss.grad[1, 0], t(1 / 2000), atol=1e-18, rtol=0)
    assert_close(loss.grad[0, 0] / loss.grad[1, 0], t(100.0), atol=1e-12, rtol=0)
    assert float(loss.grad[0, 10:].abs().sum()) == 0.0  # padding gets no gradient


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_padding_changes_nothing(mode):
    g = torch.Generator().manual_seed(1)
    loss = torch.randn(3, 5, generator=g, dtype=D)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    # extra columns (with garbage loss) and an all-padding row
    padded = torch.cat([loss, torch.randn(3, 4, generator=g, dtype=D)], dim=1)
    padded = torch.cat([padded, torch.randn(1, 9, generator=g, dtype=D)], dim=0)
    pmask = torch.zeros(4, 9, dtype=torch.bool)
    pmask[:3, :5] = mask
    # Dr. GRPO divides by the rows of the step, so a row added only as padding is left out of
    # the count the caller gives (num_rows = 3 real rows)
    kw = {"norm_len": 5, "num_rows": 3} if mode == "seq-mean-token-sum-norm" else {}
    assert_close(
        aggregate_loss(padded, pmask, mode, **kw), aggregate_loss(loss, mask, mode, **kw),
        atol=1e-15, rtol=0,
    )



@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batches_with_global_counts_equal_the_full_batch(mode):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(8, 6, generator=g, dtype=D, requires_grad=True)  # "parameters"
    x = torch.randn(8, 6, generator=g, dtype=D)
    lengths = torch.tensor([6, 1, 3, 5, 2, 6, 4, 1])
    mask = torch.arange(6)[None, :] < lengths[:, None]

    def loss_mat(rows):
        return (w[rows] * x[rows]) ** 2

    full = aggregate_loss(loss_mat(slice(None)), mask, mode, norm_len=6)
    (full_grad,) = torch.autograd.grad(full, w)

    n_tokens, n_seqs = mask.sum(), (mask.sum(-1) > 0).sum()
    total = torch.zeros((), dtype=D)
    for rows in (slice(0, 3), slice(3, 4), slice(4, 8)):  # uneven micro-batches
        total = total + aggregate_loss(
            loss_mat(rows), mask[rows], mode, num_tokens=n_tokens, num_seqs=n_seqs, norm_len=6,
            num_rows=8,
        )
    (micro_grad,) = torch.autograd.grad(total, w)
    assert_close(total, full, atol=1e-14, rtol=0)
    assert_close(micro_grad, full_grad, atol=1e-14, rtol=0)


def test_micro_batches_without_global_count_differ_for_token_mean():
    # The reason num_tokens exists: averaging per micro-batch weighs tokens unequally.
    loss = t([[1.0, 1.0, 1.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    full = aggregate_loss(loss, mask, "token-mean")  # 7/4
    naive = (aggregate_loss(loss[:1], mask[:1], "token-mean")
             + aggregate_loss(loss[1:], mask[1:], "token-mean")) / 2  # (1 + 4)/2
    assert_close(full, t(1.75), atol=0, rtol=0)
    assert_close(naive, t(2.5), atol=0, rtol=0)


def test_errors_name_the_argument():
    with pytest.raises(ConfigError, match="token-sum"):
        aggregate_loss(X, M, "token-sum")
    with pytest.raises(ShapeError, match="`mask`"):
        masked_mean(X, M[:, :3])
    with pytest.raises(ShapeError, match="`loss_mat`"):
        aggregate_loss(X[0], M[0], "token-mean")
    with pytest.raises(ShapeError, match="`x`"):
        masked_whiten(torch.ones(2, 2, dtype=torch.long), torch.ones(2, 2))


# --------------------------------------------------------------------------------------------
# Dr. GRPO's denominator, and the aggregation registry


def test_dr_grpo_divides_by_every_row_including_empty_ones():
    # Row 1 has no counted token (an overlong response masked out). Dr. GRPO's objective is
    # 1/G Σ_i Σ_t ℓ_{i,t} / L over all G samples: (1 + 3)/4 + 0 + 6/4 over 3 rows = 2.5/3.
    # (Dividing by the 2 rows with tokens would give 1.25.)
    loss = t([[1.0, 3.0, 0.0], [5.0, 7.0, 9.0], [6.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]], dtype=torch.bool)
    got = aggregate_loss(loss, mask, "seq-mean-token-sum-norm", norm_len=4)
    assert_close(got, t(2.5 / 3), atol=1e-15, rtol=0)
    # num_seqs is not its denominator; num_rows is (a whole step of 10 rows)
    got = aggregate_loss(loss, mask, "seq-mean-token-sum-norm", norm_len=4, num_seqs=1)
    assert_close(got, t(2.5 / 3), atol=1e-15, rtol=0)
    got = aggregate_loss(loss, mask, "seq-mean-token-sum-norm", norm_len=4, num_rows=10)
    assert_close(got, t(0.25), atol=1e-15, rtol=0)
    # seq-mean-token-mean keeps counting sequences: ((1+3)/2 + 6/1) / 2 = 4
    assert_close(aggregate_loss(loss, mask, "seq-mean-token-mean"), t(4.0), atol=0, rtol=0)
    assert_close(aggregate_loss(loss, mask, "seq-mean-token-mean", num_rows=99), t(4.0),
                 atol=0, rtol=0)


def test_aggregation_modes_are_a_registry():
    from posttrain.algos import AGGREGATION_MODES, AGGREGATIONS

    assert set(AGGREGATION_MODES) == {"token-mean", "seq-mean-token-mean",
                                      "seq-mean-token-sum-norm"}
    assert set(AGGREGATION_MODES) <= set(AGGREGATIONS.names())
    with pytest.raises(ConfigError, match="Did you mean 'token-mean'"):
        AGGREGATIONS.get("token_mean")
    with pytest.raises(ValueError, match="already registered"):
        AGGREGATIONS.register("token-mean")(lambda *a, **k: None)


def test_a_user_can_register_an_aggregation(monkeypatch):
    from posttrain.algos import AGGREGATIONS

    # the registration is undone after the test
    monkeypatch.setattr(AGGREGATIONS, "_items", dict(AGGREGATIONS._items))
    monkeypatch.setattr(AGGREGATIONS, "_attrs", dict(AGGREGATIONS._attrs))
    seen = {}

    @AGGREGATIONS.register("test-seq-max")
    def seq_max(loss_mat, mask, *, num_tokens, num_seqs, num_rows, norm_len):
        seen.update(num_tokens=num_tokens, num_seqs=num_seqs, num_rows=num_rows,
                    norm_len=norm_len, loss_mat=loss_mat)
        return loss_mat.amax(-1).sum() / num_seqs

    loss = t([[1.0, 3.0, float("nan")], [6.0, float("inf"), 2.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    # the aggregation sees the loss with padding already selected to 0: max(1, 3) + max(6, 2)
    assert_close(aggregate_loss(loss, mask, "test-seq-max"), t(4.5), atol=0, rtol=0)
    assert torch.equal(seen["loss_mat"], t([[1.0, 3.0, 0.0], [6.0, 0.0, 2.0]]))
    # this batch's defaults: 4 tokens, 2 sequences, B = 2 rows, norm_len = T = 3
    assert (int(seen["num_tokens"]), int(seen["num_seqs"]), seen["num_rows"],
            seen["norm_len"]) == (4, 2, 2, 3)
    aggregate_loss(loss, mask, "test-seq-max", num_tokens=40, num_seqs=20, norm_len=7,
                   num_rows=30)
    assert (seen["num_tokens"], seen["num_seqs"], seen["num_rows"], seen["norm_len"]) == (
        40, 20, 30, 7)
