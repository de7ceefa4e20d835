"""Masked reductions and loss aggregation.

Every mask here means "True (1) = this position counts"; any non-zero entry counts, and a mask
selects, it never weighs. Padding never changes a result: it is selected away with
`torch.where`, never multiplied by 0 (STYLE habit 14: 0 · inf = NaN), so NaN or inf in padding
reach neither the value nor the gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from posttrain.algos._checks import check_float, check_mask, check_tensor, select
from posttrain.errors import ShapeError
from posttrain.registry import Registry

Reduce = Callable[[Tensor], Tensor]
"""Sums a tensor over all data-parallel ranks (identity on one process)."""


def _keep_and_count(name: str, mask: Tensor, ref_name: str, ref: Tensor) -> tuple[Tensor, Tensor]:
    """The bool mask and the same mask as 0/1 in `ref`'s float dtype (float32 otherwise)."""
    m = check_mask(name, mask, ref_name, ref)
    keep = m != 0
    return keep, keep.to(m.dtype)


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of `x` where `mask` is True, over `dim` (all dims if None)."""
    x = check_tensor("x", x)
    keep, _ = _keep_and_count("mask", mask, "x", x)
    kept = select(x, keep)
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` where `mask` is True. A row (or batch) with no counted entry gives 0."""
    x = check_tensor("x", x)
    keep, m = _keep_and_count("mask", mask, "x", x)
    kept = select(x, keep)
    if dim is None:
        return kept.sum() / m.sum().clamp(min=1)
    return kept.sum(dim) / m.sum(dim).clamp(min=1)


def _moments(x: Tensor, m: Tensor, unbiased: bool, reduce: Reduce | None
             ) -> tuple[Tensor, Tensor]:
    """Masked mean and variance of `x` (already 0 off the mask `m`, a 0/1 float tensor);
    `reduce` (two calls) sums the partial sums over ranks."""
    keep = m != 0
    stats = torch.stack([x.sum(), m.sum()])
    if reduce is not None:
        stats = reduce(stats)
    total, count = stats[0], stats[1]
    mean = total / count.clamp(min=1)
    sq = select((x - mean) ** 2, keep).sum()
    if reduce is not None:
        sq = reduce(sq)
    var = sq / count.clamp(min=1)
    if unbiased:
        var = var * count / (count - 1).clamp(min=1)
    return mean, var


def masked_var(
    x: Tensor, mask: Tensor, unbiased: bool = True, reduce: Reduce | None = None
) -> Tensor:
    """Variance of the entries of `x` where `mask` is True (a scalar).

    `unbiased` applies Bessel's correction n/(n-1). `reduce` sums partial statistics over
    data-parallel ranks, so the result is the variance of the whole global batch.
    """
    x = check_tensor("x", x)
    check_float("x", x)
    keep, m = _keep_and_count("mask", mask, "x", x)
    return _moments(select(x, keep), m, unbiased, reduce)[1]


def masked_whiten(
    x: Tensor,
    mask: Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    reduce: Reduce | None = None,
) -> Tensor:
    """`(x - mean) / sqrt(var + eps)` over the masked entries; masked-out entries become 0.

    With `shift_mean=False` the mean is added back after scaling (only the scale changes), as
    done for rewards in lm-human-preferences. The variance is the unbiased one.
    """
    x = check_tensor("x", x)
    check_float("x", x)
    keep, m = _keep_and_count("mask", mask, "x", x)
    x = select(x, keep)
    mean, var = _moments(x, m, True, reduce)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return select(out, keep)


# ---------------------------------------------------------------------------------- aggregation


class Aggregation(Protocol):
    """Turns a (B, T) per-token loss into the scalar that is back-propagated.

    `loss_mat` is already 0 off the mask (selected, never multiplied); `mask` is bool. The
    counts are resolved by `aggregate_loss` (whole-step values, or this batch's defaults), so an
    aggregation only divides.
    """

    def __call__(
        self,
        loss_mat: Tensor,
        mask: Tensor,
        *,
        num_tokens: Tensor | float,
        num_seqs: Tensor | float,
        num_rows: Tensor | float,
        norm_len: float,
    ) -> Tensor: ...


AGGREGATIONS: Registry[Aggregation] = Registry("loss aggregation mode")


@AGGREGATIONS.register("token-mean")
def _token_mean(loss_mat, mask, *, num_tokens, num_seqs, num_rows, norm_len):
    """Σ over counted tokens / number of counted tokens (DAPO, VAPO): every token weighs the
    same, whatever its sequence's length."""
    return loss_mat.sum() / num_tokens


@AGGREGATIONS.register("seq-mean-token-mean")
def _seq_mean_token_mean(loss_mat, mask, *, num_tokens, num_seqs, num_rows, norm_len):
    """Mean over sequences of each sequence's token mean (PPO, GRPO): each sequence weighs the
    same, so tokens of short sequences weigh more. A row with no counted token is no sequence."""
    per_seq = loss_mat.sum(-1) / mask.sum(-1).clamp(min=1)
    return per_seq.sum() / num_seqs


@AGGREGATIONS.register("seq-mean-token-sum-norm")
def _seq_mean_token_sum_norm(loss_mat, mask, *, num_tokens, num_seqs, num_rows, norm_len):
    """Each row's token sum / a constant `norm_len`, then / the number of ALL rows (Dr. GRPO,
    Liu et al. 2025: the 1/G runs over every sample of the group, a sample with no
    counted token included, so no weight depends on a count of the batch)."""
    if norm_len <= 0:
        raise ShapeError(f"`norm_len` must be positive, got {norm_len}")
    return (loss_mat.sum(-1) / norm_len).sum() / num_rows


AGGREGATION_MODES = tuple(AGGREGATIONS.names())
"""The aggregation names registered at import (the registry is `AGGREGATIONS`)."""


def aggregate_loss(
    loss_mat: Tensor,
    mask: Tensor,
    mode: str,
    num_tokens: Tensor | float | None = None,
    num_seqs: Tensor | float | None = None,
    norm_len: float | None = None,
    *,
    num_rows: Tensor | float | None = None,
) -> Tensor:
    """Turn a per-token loss matrix into the scalar that is back-propagated.

    Args:
        loss_mat: (B, T) per-token loss. Its value off the mask is never read (NaN is fine).
        mask: (B, T) True where the token counts.
        mode: a name in `AGGREGATIONS`:
            `token-mean`: sum over all counted tokens / `num_tokens` (DAPO, VAPO);
            every token weighs the same, whatever its sequence's length.
            `seq-mean-token-mean`: each sequence's token mean, summed, / `num_seqs`
            (PPO, GRPO); each sequence weighs the same, so tokens of short sequences weigh more.
            `seq-mean-token-sum-norm`: each row's token sum / `norm_len`, summed, / `num_rows`
            (Dr. GRPO).
        num_tokens: for `token-mean`, the number of counted tokens in the whole optimiser step
            (all micro-batches, all ranks). Default: this batch's count.
        num_seqs: for `seq-mean-token-mean`, the number of sequences in the whole step.
            Default: this batch's rows that have at least one counted token (a row with none,
            such as a fully masked overlong response or a padding row, is not a sequence).
        norm_len: the constant of `seq-mean-token-sum-norm` (the maximum response length);
            default T.
        num_rows: for `seq-mean-token-sum-norm`, the number of rows in the whole step, rows
            with no counted token included (Dr. GRPO's 1/G is over every sample). Default:
            this batch's B. A padding row added only to fill a batch must be left out of the
            count the caller gives.

    With the global counts given, the per-micro-batch results sum to the loss of the whole
    step, so gradient accumulation gives the gradient of the full batch.
    """
    loss_mat = check_tensor("loss_mat", loss_mat, ndim=2)
    keep, m = _keep_and_count("mask", mask, "loss_mat", loss_mat)
    aggregate = AGGREGATIONS.get(mode)
    if num_tokens is None:
        num_tokens = m.sum().clamp(min=1)
    if num_seqs is None:
        num_seqs = keep.any(-1).sum().clamp(min=1)
    if num_rows is None:
        num_rows = max(loss_mat.shape[0], 1)
    if norm_len is None:
        norm_len = loss_mat.shape[-1]
    return aggregate(
        select(loss_mat, keep), keep, num_tokens=num_tokens, num_seqs=num_seqs,
        num_rows=num_rows, norm_len=norm_len,
    )
