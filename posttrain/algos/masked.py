"""Masked reductions and loss aggregation.

Every mask here means "True (1) = this position counts". Padding never changes a result.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from posttrain.algos._checks import check_float, check_mask, check_tensor
from posttrain.errors import ConfigError, ShapeError

Reduce = Callable[[Tensor], Tensor]
"""Sums a tensor over all data-parallel ranks (identity on one process)."""

AGGREGATION_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of `x` where `mask` is True, over `dim` (all dims if None)."""
    x = check_tensor("x", x)
    m = check_mask("mask", mask, "x", x)
    prod = x * m
    return prod.sum() if dim is None else prod.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` where `mask` is True. A row (or batch) with no counted entry gives 0."""
    x = check_tensor("x", x)
    m = check_mask("mask", mask, "x", x)
    if dim is None:
        return (x * m).sum() / m.sum().clamp(min=1)
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1)


def _moments(x: Tensor, m: Tensor, unbiased: bool, reduce: Reduce | None
             ) -> tuple[Tensor, Tensor]:
    """Masked mean and variance; `reduce` (two calls) sums the partial sums over ranks."""
    stats = torch.stack([(x * m).sum(), m.sum()])
    if reduce is not None:
        stats = reduce(stats)
    total, count = stats[0], stats[1]
    mean = total / count.clamp(min=1)
    sq = ((x - mean) ** 2 * m).sum()
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
    m = check_mask("mask", mask, "x", x)
    return _moments(x, m, unbiased, reduce)[1]


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
    m = check_mask("mask", mask, "x", x)
    mean, var = _moments(x, m, True, reduce)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def aggregate_loss(
    loss_mat: Tensor,
    mask: Tensor,
    mode: str,
    num_tokens: Tensor | float | None = None,
    num_seqs: Tensor | float | None = None,
    norm_len: float | None = None,
) -> Tensor:
    """Turn a per-token loss matrix into the scalar that is back-propagated.

    Args:
        loss_mat: (B, T) per-token loss.
        mask: (B, T) True where the token counts.
        mode: `token-mean`: sum over all counted tokens / number of counted tokens (DAPO, VAPO);
            every token weighs the same, whatever its sequence's length.
            `seq-mean-token-mean`: mean over sequences of each sequence's token mean
            (PPO, GRPO); each sequence weighs the same, so tokens of short sequences weigh more.
            `seq-mean-token-sum-norm`: each sequence's token sum / `norm_len`, then mean over
            sequences (Dr. GRPO); `norm_len` defaults to T.
        num_tokens: for `token-mean`, the number of counted tokens in the whole optimiser step
            (all micro-batches, all ranks). Default: this batch's count.
        num_seqs: for the two `seq-mean` modes, the number of sequences in the whole step.
            Default: this batch's rows that have at least one counted token (a row with none,
            such as a fully masked overlong response or a padding row, is not a sequence).
        norm_len: the constant of `seq-mean-token-sum-norm` (the maximum response length).

    With the global counts given, the per-micro-batch results sum to the loss of the whole
    step, so gradient accumulation gives the gradient of the full batch.
    """
    loss_mat = check_tensor("loss_mat", loss_mat, ndim=2)
    m = check_mask("mask", mask, "loss_mat", loss_mat)
    if mode == "token-mean":
        denom = m.sum().clamp(min=1) if num_tokens is None else num_tokens
        return (loss_mat * m).sum() / denom
    if mode == "seq-mean-token-mean":
        per_seq = (loss_mat * m).sum(-1) / m.sum(-1).clamp(min=1)
    elif mode == "seq-mean-token-sum-norm":
        length = loss_mat.shape[-1] if norm_len is None else norm_len
        if length <= 0:
            raise ShapeError(f"`norm_len` must be positive, got {length}")
        per_seq = (loss_mat * m).sum(-1) / length
    else:
        raise ConfigError(
            f"unknown loss aggregation mode {mode!r}; choose one of {', '.join(AGGREGATION_MODES)}"
        )
    denom = (m.sum(-1) > 0).sum().clamp(min=1) if num_seqs is None else num_seqs
    return per_seq.sum() / denom
