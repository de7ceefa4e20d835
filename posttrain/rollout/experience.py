"""The Experience dataclass: everything one RL step knows about a batch of responses.

It is frozen; each phase of the step adds its fields with `dataclasses.replace`. Tensor
fields carry their shape and meaning; `B` counts responses (prompts x samples per prompt),
`P` the left-padded prompt width and `T` the right-padded response width.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from posttrain.errors import ShapeError

_PER_SAMPLE_TENSORS = (
    "input_ids", "attention_mask", "response_mask", "group_ids", "truncated", "scores",
    "old_logp", "behavior_logp", "ref_logp", "values", "token_rewards", "advantages", "returns",
    "token_scores",
)


@dataclass(frozen=True)
class Experience:
    input_ids: Tensor  # (B, P+T) prompt (left-padded) then response (right-padded)
    attention_mask: Tensor  # (B, P+T) True on real tokens
    response_mask: Tensor  # (B, T) True on response tokens, up to and including the first EOS;
    # in a multi-turn episode True on the policy's tokens only (observations are context)
    group_ids: Tensor  # (B,) index of the prompt each response answers
    truncated: Tensor  # (B,) True when the response hit max_new_tokens without EOS
    prompts: tuple[Any, ...] = ()  # (B,) the prompts as given (strings or message lists)
    texts: tuple[str, ...] = ()  # (B,) decoded responses, without the EOS
    meta: dict[str, list[Any]] = field(default_factory=dict)  # other dataset columns, (B,) each
    scores: Tensor | None = None  # (B,) sequence reward R(x, y)
    old_logp: Tensor | None = None  # (B, T) log π_old(a_t|s_t), recorded before the update
    behavior_logp: Tensor | None = None  # (B, T) log μ(a_t|s_t): the engine that sampled
    ref_logp: Tensor | None = None  # (B, T) log π_ref(a_t|s_t)
    values: Tensor | None = None  # (B, T) V_old(s_t) from the critic
    token_rewards: Tensor | None = None  # (B, T) shaped rewards r_t (score + KL penalty)
    advantages: Tensor | None = None  # (B, T) A_t
    returns: Tensor | None = None  # (B, T) critic targets Ret_t
    # (B, T) multi-turn episodes: each turn's reward at its last token (their sum is `scores`)
    token_scores: Tensor | None = None

    def __post_init__(self) -> None:
        b = self.input_ids.shape[0]
        for name in _PER_SAMPLE_TENSORS:
            value = getattr(self, name)
            if value is not None and value.shape[0] != b:
                raise ShapeError(f"Experience.{name} has {value.shape[0]} rows, expected {b}")
        if self.response_mask.shape[1] > self.input_ids.shape[1]:
            raise ShapeError("Experience.response_mask is wider than input_ids")

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def response_len(self) -> int:
        """T."""
        return self.response_mask.shape[1]

    @property
    def response_ids(self) -> Tensor:
        """(B, T) the response tokens."""
        return self.input_ids[:, -self.response_len :]

    @property
    def response_lengths(self) -> Tensor:
        """(B,) number of real response tokens."""
        return self.response_mask.sum(-1)

    def replace(self, **changes: Any) -> Experience:
        return dataclasses.replace(self, **changes)

    def select(self, index: Sequence[int] | Tensor) -> Experience:
        """The rows `index`, in that order."""
        idx = torch.as_tensor(index, dtype=torch.long)
        rows = idx.tolist()
        changes: dict[str, Any] = {}
        for name in _PER_SAMPLE_TENSORS:
            value = getattr(self, name)
            if value is not None:
                changes[name] = value[idx.to(value.device)]
        changes["prompts"] = tuple(self.prompts[i] for i in rows) if self.prompts else ()
        changes["texts"] = tuple(self.texts[i] for i in rows) if self.texts else ()
        changes["meta"] = {k: [v[i] for i in rows] for k, v in self.meta.items()}
        return dataclasses.replace(self, **changes)

    def split(self, size: int) -> list[Experience]:
        """Consecutive chunks of at most `size` rows."""
        return [self.select(range(s, min(s + size, len(self)))) for s in range(0, len(self), size)]

    def to(self, device: torch.device | str) -> Experience:
        changes = {n: getattr(self, n).to(device) for n in _PER_SAMPLE_TENSORS
                   if getattr(self, n) is not None}
        return dataclasses.replace(self, **changes)

    @staticmethod
    def concat(parts: Sequence[Experience], pad_id: int) -> Experience:
        """Stack experiences whose prompt and response widths may differ (re-padded)."""
        if not parts:
            raise ShapeError("Experience.concat needs at least one part")
        p_width = max(e.input_ids.shape[1] - e.response_len for e in parts)
        t_width = max(e.response_len for e in parts)
        fields: dict[str, Any] = {}
        for name in _PER_SAMPLE_TENSORS:
            values = [getattr(e, name) for e in parts]
            if all(v is None for v in values):
                continue
            if any(v is None for v in values):
                raise ShapeError(f"Experience.concat: field {name} is set in some parts only")
            if values[0].dim() == 1:
                fields[name] = torch.cat(values)
            elif name in ("input_ids", "attention_mask"):
                fill = pad_id if name == "input_ids" else 0
                fields[name] = torch.cat([_pad_both(v, e.input_ids.shape[1] - e.response_len,
                                                    e.response_len, p_width, t_width, fill)
                                          for v, e in zip(values, parts, strict=True)])
            else:
                fields[name] = torch.cat([torch.nn.functional.pad(v, (0, t_width - v.shape[1]))
                                          for v in values])
        keys = parts[0].meta.keys()
        return Experience(
            prompts=tuple(p for e in parts for p in e.prompts),
            texts=tuple(t for e in parts for t in e.texts),
            meta={k: [x for e in parts for x in e.meta[k]] for k in keys},
            **fields,
        )


def _pad_both(x: Tensor, p: int, t: int, p_width: int, t_width: int, fill: int) -> Tensor:
    return torch.nn.functional.pad(x, (p_width - p, t_width - t), value=fill)
