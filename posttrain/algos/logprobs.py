"""Token log-probabilities and entropy from logits, without the whole float32 log-softmax.

A (B, T, V) float32 log-softmax is the largest tensor of a training step (8 x 1024 x 152k x 4
bytes = 5 GB). Here the softmax is taken over chunks of rows, in the forward pass and again in
the backward pass (a custom autograd function), so at most `chunk_rows x V` float32 values
exist at once beyond the logits themselves. Results equal the plain computation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from posttrain.algos._checks import check_float, check_tensor
from posttrain.errors import ShapeError

_DEFAULT_CHUNK_ELEMENTS = 1 << 24  # 16M float32 values = 64 MiB per chunk


def _chunk_rows(vocab: int, chunk_rows: int | None) -> int:
    if chunk_rows is not None:
        if chunk_rows < 1:
            raise ShapeError(f"`chunk_rows` must be >= 1, got {chunk_rows}")
        return chunk_rows
    return max(1, _DEFAULT_CHUNK_ELEMENTS // vocab)


class _ChunkedLogProbs(torch.autograd.Function):
    """logp[n] = z[n, y_n] - logsumexp(z[n]) and H[n] = logsumexp(z[n]) - sum_v p[n,v] z[n,v],
    with z = logits / temperature, for flattened rows n.

    Gradients (p = softmax(z), derivation: d lse / dz_j = p_j):
        d logp / dz_j = 1[j = y] - p_j
        d H / dz_j    = -p_j (log p_j + H)
    and d/dlogits = d/dz / temperature.
    """

    @staticmethod
    def forward(ctx, logits, labels, temperature, chunk_rows, with_entropy):
        n = logits.shape[0]
        out_dtype = torch.promote_types(logits.dtype, torch.float32)
        logp = torch.empty(n, dtype=out_dtype, device=logits.device)
        ent = torch.empty(n if with_entropy else 0, dtype=out_dtype, device=logits.device)
        for s in range(0, n, chunk_rows):
            z = logits[s : s + chunk_rows].to(out_dtype) / temperature
            lse = torch.logsumexp(z, dim=-1)
            logp[s : s + chunk_rows] = z.gather(-1, labels[s : s + chunk_rows, None])[:, 0] - lse
            if with_entropy:
                # −Σ p·log p, not lse − Σ p·z: the latter cancels digits for large logits.
                log_p = z - lse[:, None]
                # a −inf logit (a banned token) has p = 0: its p·log p is 0, not 0·(−inf) = NaN
                p_log_p = torch.where(log_p.isneginf(), 0.0, log_p.exp() * log_p)
                ent[s : s + chunk_rows] = -p_log_p.sum(-1)
        ctx.save_for_backward(logits, labels, ent)
        ctx.temperature = temperature
        ctx.chunk_rows = chunk_rows
        ctx.with_entropy = with_entropy
        if not with_entropy:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        logits, labels, ent = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        grad = torch.empty_like(logits)
        step = ctx.chunk_rows
        out_dtype = grad_logp.dtype
        for s in range(0, logits.shape[0], step):
            z = logits[s : s + step].to(out_dtype) / ctx.temperature
            log_p = torch.log_softmax(z, dim=-1)
            p = log_p.exp()
            g = -p * grad_logp[s : s + step, None]
            g.scatter_add_(-1, labels[s : s + step, None], grad_logp[s : s + step, None])
            if ctx.with_entropy:
                # p = 0 where log p = −inf: that entry's dH/dz is 0, not 0·(−inf) = NaN
                dh = torch.where(log_p.isneginf(), 0.0, p * (log_p + ent[s : s + step, None]))
                g -= grad_ent[s : s + step, None] * dh
            grad[s : s + step] = (g / ctx.temperature).to(logits.dtype)
        return grad, None, None, None, None


def _run(logits, labels, temperature, chunk_rows, with_entropy):
    logits = check_tensor("logits", logits, ndim=3)
    check_float("logits", logits)
    labels = check_tensor("labels", labels, ndim=2)
    if labels.shape != logits.shape[:2]:
        raise ShapeError(
            f"`labels` has shape {tuple(labels.shape)} but `logits` has shape "
            f"{tuple(logits.shape)}; labels must be (B, T) for logits (B, T, V)"
        )
    if temperature <= 0:
        raise ShapeError(f"`temperature` must be > 0, got {temperature}")
    b, t, v = logits.shape
    # Positions the caller masks out may hold any id (e.g. -100); clamp so gather stays valid.
    flat_labels = labels.reshape(-1).clamp(min=0).long()
    logp, ent = _ChunkedLogProbs.apply(
        logits.reshape(b * t, v), flat_labels, float(temperature), _chunk_rows(v, chunk_rows),
        with_entropy,
    )
    return logp.view(b, t), (ent.view(b, t) if with_entropy else None)


def token_logprobs(
    logits: Tensor, labels: Tensor, temperature: float = 1.0, chunk_rows: int | None = None
) -> Tensor:
    """log π(labels | ·) per position.

    Args:
        logits: (B, T, V) logits whose position t scores `labels[:, t]` (already shifted).
        labels: (B, T) token ids; masked-out positions may hold any value.
        temperature: the sampling temperature; log-probs are of softmax(logits / temperature).
        chunk_rows: rows of B*T handled at once (default: 16M logits per chunk).

    Returns:
        (B, T) log-probs in float32 (float64 for float64 logits).
    """
    return _run(logits, labels, temperature, chunk_rows, with_entropy=False)[0]


def token_logprobs_and_entropy(
    logits: Tensor, labels: Tensor, temperature: float = 1.0, chunk_rows: int | None = None
) -> tuple[Tensor, Tensor]:
    """Like `token_logprobs`, and also the entropy H(π(· | s_t)) per position, both (B, T)."""
    logp, ent = _run(logits, labels, temperature, chunk_rows, with_entropy=True)
    return logp, ent
