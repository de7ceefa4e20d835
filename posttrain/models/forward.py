"""Forward passes that turn models into the tensors the algorithms need.

Layout of a rollout batch: `input_ids (B, P+T)` is the prompt, left-padded to P, followed by
the response, right-padded to T. Position ids are counted over real tokens only, as
`generate` does, so a forward pass here reproduces the log-probs of generation.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from posttrain.algos import token_logprobs, token_logprobs_and_entropy
from posttrain.models.load import backbone, unwrap_peft, value_head


def position_ids(attention_mask: Tensor) -> Tensor:
    """(B, L) positions 0, 1, ... over the real tokens (padding gets position 0... as in HF)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)


def pack_rows(lengths: list[int], width: int) -> list[list[int]]:
    """First-fit decreasing: the sequences (by index) that share each packed row of `width`."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(width - lengths[i])
    return rows


def packed_logprobs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, first: int,
                    temperature: float = 1.0, with_entropy: bool = False
                    ) -> tuple[Tensor, Tensor | None]:
    """log π of the tokens `input_ids[:, first:]`, computed padding-free.

    The real tokens of each row (one contiguous run per row, padding on either side) are
    packed, first-fit decreasing, into rows as wide as the longest sequence; position ids
    restart at 0 for each sequence and no attention mask is passed, so `transformers` attends
    within each sequence only (a block-diagonal causal mask per row, or variable-length
    kernels with flash-attention). Padding is left only at the ends of packed rows, which
    are fewer than the input's. Logits are computed only at the columns that predict a
    scored token.

    Returns (B, L - first) log-probs (and entropy), 0 where a token is padding or has no
    real predecessor; otherwise equal to the padded forward pass up to float rounding.
    """
    att = attention_mask.bool()
    b = att.shape[0]
    lengths = att.sum(-1).tolist()
    starts = att.long().argmax(-1).tolist()  # first real token of each row
    width = max(lengths)
    groups = pack_rows(lengths, width)
    device = input_ids.device
    ids = torch.zeros(len(groups), width, dtype=input_ids.dtype, device=device)
    pos = torch.zeros(len(groups), width, dtype=torch.long, device=device)
    row_of, offset_of = [0] * b, [0] * b
    for r, members in enumerate(groups):
        o = 0
        for i in members:
            n = lengths[i]
            ids[r, o : o + n] = input_ids[i, starts[i] : starts[i] + n]
            pos[r, o : o + n] = torch.arange(n, device=device)
            row_of[i], offset_of[i] = r, o
            o += n
    # scored grid tokens (b, j), j >= first: real, with a real token before it
    scored = att[:, first:] & att[:, first - 1 : -1]
    grid_b, grid_j = torch.nonzero(scored, as_tuple=True)
    j = grid_j + first - 1  # the predicting token's column in the input grid
    src = torch.as_tensor(offset_of, device=device)[grid_b] + j - \
        torch.as_tensor(starts, device=device)[grid_b]
    src_row = torch.as_tensor(row_of, device=device)[grid_b]
    columns, col_index = torch.unique(src, sorted=True, return_inverse=True)
    out = model(input_ids=ids, position_ids=pos, logits_to_keep=columns, use_cache=False)
    logits = out.logits[src_row, col_index][None]  # (1, K, V)
    labels = input_ids[:, first:][scored][None]
    fn = token_logprobs_and_entropy if with_entropy else token_logprobs
    result = fn(logits, labels, temperature)
    logp, ent = result if with_entropy else (result, None)
    grid = logp.new_zeros(scored.shape).masked_scatter(scored, logp[0])
    if ent is not None:
        ent = ent.new_zeros(scored.shape).masked_scatter(scored, ent[0])
    return grid, ent


def response_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_len: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
    packed: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """log π(a_t | s_t) of the last `response_len` tokens of every row, and their entropy.

    Args:
        input_ids: (B, P+T) prompt then response.
        attention_mask: (B, P+T) True on real tokens.
        response_len: T.

    Returns:
        (B, T) log-probs and (B, T) entropy (None unless `with_entropy`). Only the T logits
        that score response tokens are computed (`logits_to_keep`), never the prompt's.
        `packed`: padding-free (`packed_logprobs`); padded response positions are 0.
    """
    if packed:
        return packed_logprobs(model, input_ids, attention_mask,
                               input_ids.shape[1] - response_len, temperature, with_entropy)
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=position_ids(attention_mask), logits_to_keep=response_len + 1,
                use_cache=False)
    logits = out.logits[:, :-1]  # position P+t-1 scores token P+t
    labels = input_ids[:, -response_len:]
    if with_entropy:
        return token_logprobs_and_entropy(logits, labels, temperature)
    return token_logprobs(logits, labels, temperature), None


def sequence_logprobs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                      loss_mask: Tensor, packed: bool = False) -> tuple[Tensor, Tensor]:
    """Per-token log-probs of right-padded sequences: `(logp (B, L-1), mask (B, L-1))` where
    `logp[:, i]` is log π(input_ids[:, i+1] | ...) and `mask = loss_mask[:, 1:]`.
    `packed`: padding-free (`packed_logprobs`)."""
    if packed:
        return packed_logprobs(model, input_ids, attention_mask, 1)[0], loss_mask[:, 1:]
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=position_ids(attention_mask), use_cache=False)
    logp = token_logprobs(out.logits[:, :-1], input_ids[:, 1:])
    return logp, loss_mask[:, 1:]


def token_values(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """The scalar head read at every position, (B, L), float32 or wider."""
    hidden = backbone(model)(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids(attention_mask),
                             use_cache=False).last_hidden_state
    values = value_head(model)(hidden).squeeze(-1)
    return values.to(torch.promote_types(values.dtype, torch.float32))


class TokenValues(nn.Module):
    """A sequence-classification model read at every token, as one module: the thing to
    wrap in DDP, so that the scalar head's gradients are synchronised with the backbone's."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return token_values(self.model, input_ids, attention_mask)


def _values(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    inner = getattr(model, "module", model)  # DDP keeps the wrapped module here
    if isinstance(inner, TokenValues):
        return model(input_ids, attention_mask)
    return token_values(model, input_ids, attention_mask)


def response_values(model: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                    response_len: int) -> Tensor:
    """V(s_t) for every response token t, (B, T): read at the position before a_t, whose
    hidden state has seen exactly s_t = (x, a_<t)."""
    return _values(model, input_ids, attention_mask)[:, -response_len - 1 : -1]


def sequence_scores(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Reward-model score R(x, y), (B,), read where `transformers`' own sequence
    classification reads it (and so TRL, and whoever loads the saved model): at the last real
    token that is not the pad token `config.pad_token_id`. With a pad token of its own that is
    the response's EOS; when the pad token is the EOS (GPT-2, Mistral), the token before it.
    Padding may be on either side."""
    inner = getattr(model, "module", model)  # DDP keeps the wrapped module here
    if isinstance(inner, TokenValues):
        inner = inner.model
    pad_id = getattr(getattr(unwrap_peft(inner), "config", None), "pad_token_id", None)
    values = _values(model, input_ids, attention_mask)
    real = attention_mask.bool()
    if pad_id is not None:
        real = real & (input_ids != pad_id)
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (positions * real).argmax(-1)
    return values.gather(1, last[:, None])[:, 0]
