"""The record kinds posttrain reads, with the column names TRL uses, and their validation.

| kind         | columns                                   | used by          |
|--------------|-------------------------------------------|------------------|
| `prompt`     | prompt (+ any extra columns, e.g. answer) | RL               |
| `preference` | prompt, chosen, rejected (+ margin)       | reward model, DPO|
|              | or chosen, rejected (implicit prompt)     |                  |
| `unpaired`   | prompt, completion, label (true/false)    | KTO              |
| `completion` | prompt, completion                        | SFT              |
| `messages`   | messages                                  | SFT              |
| `text`       | text                                      | SFT, PPO-ptx     |

`prompt`, `chosen`, `rejected` and `completion` are either strings (standard) or lists of
`{"role", "content"}` messages (conversational, rendered with the tokenizer's chat template).
`label` of an `unpaired` record says whether the completion is desirable (true) or not (false),
as in TRL's unpaired preference format; `unpair_preferences` turns pairs into such records. An
optional `margin` column of a preference record (a number, TRL's name) is the per-pair margin of
the reward-model loss. A preference record without `prompt` is TRL's implicit-prompt format:
the prompt is what `chosen` and `rejected` share at their start (`split_implicit_prompt`).
Every error names where the record came from (file and line, or row) and the field. A pair
whose `chosen` equals `rejected` (`identical_pair`) is left out by the loader, with a warning.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from posttrain.errors import DataError

KINDS = ("prompt", "preference", "unpaired", "completion", "messages", "text")
ROLES = ("system", "user", "assistant", "tool")

Text = str | list[dict[str, str]]
"""A string, or a list of chat messages."""


@dataclass(frozen=True)
class Example:
    """One validated record.

    `where` says where it came from ("data/train.jsonl line 7"), for later error messages.
    `extra` holds every other column (e.g. `answer`), passed to reward functions by name.
    """

    kind: str
    where: str
    prompt: Text | None = None
    completion: Text | None = None
    chosen: Text | None = None
    rejected: Text | None = None
    messages: list[dict[str, str]] | None = None
    text: str | None = None
    label: bool | None = None  # unpaired: True when the completion is desirable
    extra: dict[str, Any] = field(default_factory=dict)


_REQUIRED = {
    "preference": ("prompt", "chosen", "rejected"),
    "unpaired": ("prompt", "completion", "label"),
    "completion": ("prompt", "completion"),
    "messages": ("messages",),
    "text": ("text",),
    "prompt": ("prompt",),
}


_IMPLICIT = ("chosen", "rejected")
"""The columns of an implicit-prompt preference record."""


def detect_kind(columns: Iterable[str]) -> str:
    """The kind of a record from its columns (most specific first)."""
    cols = set(columns)
    for kind in ("preference", "unpaired", "completion", "messages", "text", "prompt"):
        if set(_REQUIRED[kind]) <= cols or (kind == "preference" and set(_IMPLICIT) <= cols):
            return kind
    raise DataError(
        f"cannot tell the record kind from the columns {sorted(cols)}; expected one of: "
        "prompt+chosen+rejected, chosen+rejected, prompt+completion+label, prompt+completion, "
        "messages, text, prompt"
    )


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _check_messages(value: object, where: str, name: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataError(
            f"{where}: field '{name}': expected a non-empty list of messages "
            f"{{'role': ..., 'content': ...}}, got {_type_name(value)}"
        )
    for i, msg in enumerate(value):
        if not isinstance(msg, Mapping) or "role" not in msg or "content" not in msg:
            raise DataError(
                f"{where}: field '{name}[{i}]': expected a message with 'role' and 'content', "
                f"got {msg!r:.80}"
            )
        if msg["role"] not in ROLES:
            raise DataError(
                f"{where}: field '{name}[{i}].role': {msg['role']!r} is not one of {ROLES}"
            )
        if not isinstance(msg["content"], str):
            raise DataError(
                f"{where}: field '{name}[{i}].content': expected a string, "
                f"got {_type_name(msg['content'])}"
            )
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _check_text(value: object, where: str, name: str, allow_messages: bool = True) -> Text:
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field '{name}': is empty; give a non-empty string")
        return value
    if allow_messages and isinstance(value, list):
        return _check_messages(value, where, name)
    expected = "a string or a list of messages" if allow_messages else "a string"
    raise DataError(f"{where}: field '{name}': expected {expected}, got {_type_name(value)}")


def validate_record(record: object, where: str, kind: str | None = None) -> Example:
    """Check one record and return it as an `Example`.

    Args:
        record: the parsed record (a mapping of column -> value).
        where: where it came from, e.g. "train.jsonl line 3".
        kind: the kind the caller needs; None to detect it from the columns.
    """
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: expected an object with named fields, got {_type_name(record)}")
    if kind is None:
        try:
            kind = detect_kind(record.keys())
        except DataError as err:
            raise DataError(f"{where}: {err}") from None
    elif kind not in KINDS:
        raise DataError(f"unknown record kind {kind!r}; choose one of {', '.join(KINDS)}")
    if kind == "preference" and "prompt" not in record and set(_IMPLICIT) <= set(record):
        prompt, chosen, rejected = split_implicit_prompt(
            _check_text(record["chosen"], where, "chosen"),
            _check_text(record["rejected"], where, "rejected"), where)
        record = {**record, "prompt": prompt, "chosen": chosen, "rejected": rejected}
    missing = [c for c in _REQUIRED[kind] if c not in record]
    if missing:
        # a column name with a line break in it is quoted, so the message stays one line
        names = sorted(k if k.isprintable() else repr(k) for k in record)
        raise DataError(
            f"{where}: missing field '{missing[0]}' (a {kind!r} record needs "
            f"{', '.join(_REQUIRED[kind])}; it has {', '.join(names) or 'nothing'})"
        )
    extra = {k: v for k, v in record.items() if k not in _REQUIRED[kind]}
    if kind == "messages":
        return Example(kind, where, messages=_check_messages(record["messages"], where,
                                                             "messages"), extra=extra)
    if kind == "text":
        text = _check_text(record["text"], where, "text", allow_messages=False)
        return Example(kind, where, text=text, extra=extra)
    label = None
    if kind == "unpaired":
        label = record["label"]
        if not isinstance(label, bool):
            raise DataError(
                f"{where}: field 'label': expected true (desirable) or false (undesirable), "
                f"got {label!r:.40}"
            )
    if kind == "preference" and "margin" in extra:
        extra["margin"] = _check_margin(extra["margin"], where)
    fields = {c: _check_text(record[c], where, c) for c in _REQUIRED[kind] if c != "label"}
    shapes = {c: isinstance(v, list) for c, v in fields.items()}
    if kind != "prompt" and len(set(shapes.values())) > 1:
        raise DataError(
            f"{where}: fields {', '.join(fields)} mix strings and message lists; "
            "use strings for all of them or message lists for all of them"
        )
    return Example(kind, where, label=label, extra=extra, **fields)


def identical_pair(record: object, where: str) -> bool:
    """Whether `record` is a preference pair whose `chosen` and `rejected` are the same
    response: it says nothing about which is better (its DPO and reward-model losses are
    constant), so the loader leaves it out. The pair is checked first as `validate_record`
    would check it, so a malformed one is still an error (two nulls are not a pair)."""
    if not (isinstance(record, Mapping) and "chosen" in record and "rejected" in record
            and record["chosen"] == record["rejected"]):
        return False
    if "prompt" in record:
        validate_record(record, where, "preference")
    else:  # an implicit prompt cannot be split from two equal responses
        _check_text(record["chosen"], where, "chosen")
    return True


def split_implicit_prompt(chosen: Text, rejected: Text, where: str) -> tuple[Text, Text, Text]:
    """`(prompt, chosen, rejected)` of a preference pair whose prompt is implicit: the start
    that `chosen` and `rejected` share.

    Message lists: the prompt is the longest run of leading messages the two have in common
    (same role and content); the completions are the remaining messages, and each must start
    with an assistant message (the answers being compared).

    Strings: the prompt is their longest common prefix, cut back to the last whitespace in it
    and stripped of that whitespace, so it ends after a whole word and each completion starts
    with the whitespace before its first word ("Q: 2+2? A: four" and "Q: 2+2? A: five" share
    "Q: 2+2? A: f"; the prompt is "Q: 2+2? A:", the completions " four" and " five"). A word
    the two share is not split between prompt and completion, and the completion keeps its
    leading space, as BPE and SentencePiece tokenizers attach it to the word that follows.

    Raises `DataError` naming `where` when the two are identical or share no prompt.
    """
    if chosen == rejected:
        raise DataError(
            f"{where}: fields 'chosen' and 'rejected' are identical; a preference pair needs two "
            "different responses"
        )
    if isinstance(chosen, list) != isinstance(rejected, list):
        raise DataError(
            f"{where}: fields chosen, rejected mix strings and message lists; use strings for "
            "both or message lists for both"
        )
    if isinstance(chosen, list) and isinstance(rejected, list):
        n = _common_length(chosen, rejected)
        if n == 0:
            raise DataError(
                f"{where}: no 'prompt' field, and 'chosen' and 'rejected' share no leading "
                "message to serve as the prompt; give a 'prompt' field"
            )
        for name, messages in (("chosen", chosen), ("rejected", rejected)):
            if len(messages) == n or messages[n]["role"] != "assistant":
                got = ("ends there" if len(messages) == n
                       else f"goes on with a {messages[n]['role']!r} message")
                raise DataError(
                    f"{where}: no 'prompt' field, and after the {n} shared message(s) "
                    f"'{name}' {got}; an implicit prompt must be followed by the assistant's "
                    "answer in both; give a 'prompt' field"
                )
        return chosen[:n], chosen[n:], rejected[n:]
    assert isinstance(chosen, str) and isinstance(rejected, str)
    shared = chosen[: _common_length(chosen, rejected)]
    cut = max((i for i, ch in enumerate(shared) if ch.isspace()), default=0)
    prompt = shared[:cut].rstrip()
    if not prompt.strip():
        raise DataError(
            f"{where}: no 'prompt' field, and 'chosen' and 'rejected' share no leading words to "
            "serve as the prompt; give a 'prompt' field"
        )
    return prompt, chosen[len(prompt):], rejected[len(prompt):]


def _common_length(a: Sequence, b: Sequence) -> int:
    """How many leading items `a` and `b` have in common."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _check_margin(value: object, where: str) -> float | None:
    if value is None:  # a column that is empty for some rows: the configured margin applies
        return None
    if (isinstance(value, bool) or not isinstance(value, int | float)
            or (isinstance(value, int) and abs(value) > 2**1023) or not math.isfinite(value)):
        raise DataError(
            f"{where}: field 'margin': expected a finite number (the reward-model margin m of "
            f"this pair) or null, got {value!r:.40}"
        )
    return float(value)


def unpair_preferences(examples: Iterable[Example]) -> list[Example]:
    """Preference pairs as unpaired examples, as TRL's `unpair_preference_dataset` does: each
    pair gives its chosen response with label true and its rejected one with label false (in
    that order); the other columns are kept."""
    out = []
    for ex in examples:
        if ex.kind == "unpaired":
            out.append(ex)
            continue
        if ex.kind != "preference":
            raise DataError(f"{ex.where}: expected a preference or unpaired record, got a "
                            f"{ex.kind!r} record")
        for completion, label in ((ex.chosen, True), (ex.rejected, False)):
            out.append(replace(ex, kind="unpaired", completion=completion, chosen=None,
                               rejected=None, label=label,
                               where=f"{ex.where} ({'chosen' if label else 'rejected'})"))
    return out


def distinct_prompts(examples: Iterable[Example]) -> list[Example]:
    """The examples whose prompt was not seen before, in order (unpaired data, for one, holds
    each prompt twice)."""
    seen, out = set(), []
    for ex in examples:
        if ex.prompt is None:
            raise DataError(f"{ex.where}: a {ex.kind!r} record has no prompt; give records "
                            "with a 'prompt' field")
        key = json.dumps(ex.prompt)
        if key not in seen:
            seen.add(key)
            out.append(ex)
    return out
