"""Configuration sections and helpers shared by the SFT, reward-model, DPO and RL trainers."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from torch import nn

from posttrain.config import doc
from posttrain.data.collate import TokenStats, TruncationPolicy
from posttrain.data.formats import Example
from posttrain.data.loading import load_examples, split_examples
from posttrain.errors import ConfigError
from posttrain.models.load import (
    AdapterDisabledReference,
    LoraSpec,
    load_reference,
    max_positions,
)


def check_local_path(path: str, field: str) -> None:
    """Fail at once on a local path that does not exist, instead of letting the hub client
    retry it for a minute and blame the connection. A path is local when it starts with
    `.`, `/` or `~`, has more than one `/` (a hub id is `name` or `owner/name`), or its first
    part is a directory here (`models/qwen` when `models/` exists)."""
    p = Path(path).expanduser()
    local = path.startswith((".", "/", "~")) or len(p.parts) > 2 or (
        len(p.parts) == 2 and Path(p.parts[0]).is_dir())
    if not local or p.exists():
        return
    parent = p.parent if p.parent.is_dir() else None
    close = difflib.get_close_matches(p.name, [c.name for c in parent.iterdir()], n=1) \
        if parent else []
    hint = f" (did you mean {str(parent / close[0])!r}?)" if close else ""
    raise ConfigError(f"{field}: no such directory {path!r}{hint}; give a local model "
                      "directory or a hub id")


@dataclass(frozen=True)
class ModelConfig:
    path: str = doc("Model directory or hub id, in the transformers format.", "")
    tokenizer: str | None = doc("Tokenizer directory or hub id (default: `path`).", None)
    dtype: Literal["float32", "bfloat16", "float16"] = doc("Weights dtype.", "float32")
    trust_remote_code: bool = doc("Run model code shipped with the checkpoint (off unless "
                                  "you trust it).", False)
    lora_r: int = doc("LoRA rank; 0 trains all weights.", 0)
    lora_alpha: int = doc("LoRA alpha.", 16)
    lora_dropout: float = doc("LoRA dropout.", 0.0)
    lora_targets: list[str] | None = doc("Module names that get adapters (default: peft's "
                                         "choice for the architecture).", None)
    chat_template: str | None = doc(
        "Chat template for conversational data when the tokenizer has none (or to replace "
        "its own): the Jinja template itself, or the path of a .jinja file. null: the "
        "tokenizer's own template.", None)
    dropout: bool | None = doc(
        "Keep the model's dropout while training. null: the trainer's choice: SFT keeps it; "
        "RM, DPO, KTO and RL switch every dropout off (LoRA's too), as TRL does, so that "
        "sampling, π_old, π_ref and the update are one function (the first on-policy ratio "
        "is exactly 1, DPO's first loss ln 2).", None)

    def __post_init__(self) -> None:
        if not self.path:
            raise ConfigError("model.path is required: a model directory or hub id")

    @property
    def lora(self) -> LoraSpec | None:
        if self.lora_r <= 0:
            return None
        return LoraSpec(self.lora_r, self.lora_alpha, self.lora_dropout, self.lora_targets)

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.path

    def check_paths(self) -> None:
        """Fail at once on a mistyped local path (when the run starts: a config may name a
        model an earlier stage has not written yet)."""
        check_local_path(self.path, "model.path")
        if self.tokenizer:
            check_local_path(self.tokenizer, "model.tokenizer")


@dataclass(frozen=True)
class DataConfig:
    train: str = doc("Training data: .jsonl/.json/.parquet, a saved dataset dir or hub id.", "")
    eval: str | None = doc("Held-out data (default: `eval_fraction` of `train`).", None)
    eval_fraction: float = doc("Share of `train` held out when `eval` is not given "
                               "(0: no held-out set).", 0.05)
    split: str = doc("Split of a dataset directory or hub dataset.", "train")
    limit: int | None = doc("Read at most this many training records.", None)
    max_prompt_tokens: int | None = doc("Longer prompts are handled by `on_overflow`.", None)
    max_completion_tokens: int | None = doc("Longer completions are handled by `on_overflow`.",
                                            None)
    max_sequence_tokens: int | None = doc(
        "Longest whole sequence: prompt + completion, a text or a conversation (rl: prompt + "
        "rollout.max_new_tokens); longer ones are handled by `on_overflow`. null: the model's "
        "maximum positions (config.max_position_embeddings or its equivalent).", None)
    on_overflow: Literal["truncate", "drop", "error"] = doc(
        "Over-long examples: truncate (prompt start / completion end), drop, or error.",
        "truncate")

    def __post_init__(self) -> None:
        if not self.train:
            raise ConfigError("data.train is required: a data file, dataset dir or hub id")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        for name in ("max_prompt_tokens", "max_completion_tokens", "max_sequence_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"data.{name} must be >= 1 or null, got {value}")

    def sequence_limit(self, model: nn.Module, tokenizer) -> int | None:
        """The whole-sequence limit: `max_sequence_tokens`, else the model's maximum positions."""
        return self.truncation(max_positions(model, tokenizer)).max_sequence_tokens

    def truncation(self, model_positions: int | None) -> TruncationPolicy:
        """The limits, with the whole sequence bounded by `max_sequence_tokens` or, when that
        is not set, by `model_positions` (the model's maximum positions, `max_positions`)."""
        limit = self.max_sequence_tokens if self.max_sequence_tokens is not None \
            else model_positions
        return TruncationPolicy(self.max_prompt_tokens, self.max_completion_tokens,
                                on_overflow=self.on_overflow, max_sequence_tokens=limit)


def load_train_eval(data: DataConfig, kind: str | Sequence[str] | None,
                    seed: int) -> tuple[list[Example], list[Example]]:
    """Training and held-out examples as `data` says (all of one of the `kind`s)."""
    kinds = [kind] if isinstance(kind, str) or kind is None else list(kind)
    train = load_examples(data.train, None, data.split, data.limit)
    _check_kind(train, kinds, data.train)
    if data.eval:
        held = load_examples(data.eval, None, data.split)
        _check_kind(held, kinds, data.eval)
        return train, held
    if data.eval_fraction == 0:
        return train, []
    return split_examples(train, data.eval_fraction, seed)


def _check_kind(examples: list[Example], kinds: list[str | None], source: str) -> None:
    if None in kinds:
        return
    bad = next((e for e in examples if e.kind not in kinds), None)
    if bad is not None:
        raise ConfigError(f"{bad.where}: this trainer needs {' or '.join(map(str, kinds))} "
                          f"records, got a {bad.kind!r} record ({source})")


def greedy_completions(model: nn.Module, tokenizer, examples: Sequence[Example],
                       max_new_tokens: int) -> list[str]:
    """Greedy responses to the examples' prompts, decoded without special tokens."""
    from posttrain.evaluation import EvalSettings, generate

    exp = generate(model, tokenizer, examples, EvalSettings(max_new_tokens=max_new_tokens,
                                                            temperature=0))
    return list(exp.texts)


def completion_text(completion: Any) -> str:
    if isinstance(completion, list):
        return "".join(m["content"] for m in completion if m["role"] == "assistant")
    return completion


def report_truncation(stats: TokenStats, data: DataConfig, policy: TruncationPolicy,
                      label: str = "data", response_tokens: int = 0) -> None:
    """Say what truncation did to the data (counts), once, when a trainer starts: `label`
    names the data ("data", "held-out data"); `response_tokens` is the room RL keeps for the
    response within the whole-sequence limit."""
    if not stats.counts:
        return
    parts = [f"{n} {key.replace('_', ' ')}" for key, n in sorted(stats.counts.items())]
    sequence = f"max_sequence_tokens={policy.max_sequence_tokens}"
    if data.max_sequence_tokens is None and policy.max_sequence_tokens is not None:
        sequence += " (the model's maximum positions)"
    if response_tokens and policy.max_sequence_tokens is not None:
        sequence += f" with {response_tokens} kept for the response (rollout.max_new_tokens)"
    print(f"{label}: {', '.join(parts)} (limits: max_prompt_tokens={policy.max_prompt_tokens}, "
          f"max_completion_tokens={policy.max_completion_tokens}, {sequence}, "
          f"on_overflow={policy.on_overflow})", flush=True)


def tokenize_train_eval(tokenize: Callable[..., list], train: Sequence[Example],
                        held: Sequence[Example], tokenizer, data: DataConfig, model: nn.Module,
                        response_tokens: int = 0) -> tuple[list, list]:
    """The training and held-out examples through `tokenize` (a `tokenize_*` of
    `posttrain.data.collate`) within `data`'s limits and the model's maximum positions, each
    set's truncation reported (`report_truncation`). `response_tokens`: for prompts to
    generate from, the room kept for the response."""
    policy = data.truncation(max_positions(model, tokenizer))
    extra = {"response_tokens": response_tokens} if response_tokens else {}
    out = []
    for label, examples in (("data", train), ("held-out data", held)):
        stats = TokenStats()
        out.append(tokenize(examples, tokenizer, policy, stats, **extra))
        report_truncation(stats, data, policy, label, response_tokens)
    return out[0], out[1]


def reference_model(model: ModelConfig, policy: nn.Module, path: str | None, device
                    ) -> nn.Module:
    """The frozen reference of a policy: `path` if given; else, under LoRA, the policy with
    its adapters switched off (no second copy of the base weights); else `model.path`."""
    if model.lora is not None and path is None:
        return AdapterDisabledReference(policy)
    return load_reference(path or model.path, model.dtype, device, model.trust_remote_code)
