"""Tokenisation, truncation, padding and micro-batching by a token budget.

String prompts and completions are tokenised as they are (the completion ends with EOS);
conversational ones (lists of messages) are rendered with the tokenizer's own chat template
(or `model.chat_template`, see `apply_chat_template_option`), and only the assistant's tokens
receive loss: its content and the EOS that ends its turn, not what the template writes after
that EOS (ChatML's "\\n" after `<|im_end|>`), which the model never generates.

Limits are in tokens: per part (`max_prompt_tokens`, `max_completion_tokens`) and for the whole
sequence (`max_sequence_tokens`, which the trainers set to the model's maximum positions unless
told otherwise). A text far longer than its limit is cut, on the side truncation keeps, before
it is tokenised (`_clip_string`), so a 200,000-character record costs about what a record at
the limit does, and keeps the tokens it would have kept.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from posttrain.data.formats import Example, Text
from posttrain.errors import ConfigError, DataError

SIDES = ("left", "right")
OVERFLOW = ("truncate", "drop", "error")


@dataclass(frozen=True)
class TruncationPolicy:
    """What to do with prompts and completions longer than the limits.

    `prompt_side="left"` cuts the start of a long prompt and keeps its end (the part next to
    the response); `completion_side="right"` keeps the start of a long completion.
    `max_sequence_tokens` bounds a whole sequence: prompt + completion (each of a pair's two),
    a text, a conversation, or, for generation, the prompt + the response's token budget. A
    record over it is truncated prompt first (down to what the completion leaves, but not below
    half the limit), then completion. `on_overflow`: "truncate", "drop" the example (counted),
    or raise an "error".
    """

    max_prompt_tokens: int | None = None
    max_completion_tokens: int | None = None
    prompt_side: str = "left"
    completion_side: str = "right"
    on_overflow: str = "truncate"
    max_sequence_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.prompt_side not in SIDES or self.completion_side not in SIDES:
            raise ConfigError(f"truncation sides must be one of {SIDES}")
        if self.on_overflow not in OVERFLOW:
            raise ConfigError(
                f"on_overflow {self.on_overflow!r} is not one of {', '.join(OVERFLOW)}"
            )
        for name in ("max_prompt_tokens", "max_completion_tokens", "max_sequence_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1 or null, got {value}")


@dataclass
class TokenStats:
    """Counts of what truncation did, for the log."""

    counts: Counter = field(default_factory=Counter)

    def add(self, key: str) -> None:
        self.counts[key] += 1


class _Dropped(Exception):
    pass


SEQUENCE_LIMIT = "max_sequence_tokens, by default the model's maximum positions"
"""How errors name the whole-sequence limit: users who set nothing meet it as the model's."""


def _fit(ids: list[int], limit: int | None, side: str, policy: TruncationPolicy, what: str,
         where: str, stats: TokenStats, why: str = "", knob: str | None = None) -> list[int]:
    """`ids` within `limit` as `policy` says; `why` and `knob` explain the limit in the error
    (default: `max_{what}_tokens`)."""
    if limit is None or len(ids) <= limit:
        return ids
    if policy.on_overflow == "error":
        raise DataError(
            f"{where}: the {what} has {len(ids)} tokens, more than the limit of {limit}{why}; "
            f"raise {knob or f'max_{what}_tokens'} or set on_overflow to 'truncate' or 'drop'"
        )
    if policy.on_overflow == "drop":
        stats.add(f"dropped_long_{what}")
        raise _Dropped
    stats.add(f"truncated_{what}")
    return _cut(ids, limit, side)


def _cut(ids: list[int], keep: int, side: str) -> list[int]:
    """The `keep` tokens at the end (side "left": the start is cut) or at the start of `ids`."""
    return ids[len(ids) - keep:] if side == "left" else ids[:keep]


def _loosest(*limits: int | None) -> int | None:
    """The largest of the limits that are set (None: none is). A part clipped to it still
    overflows each limit its whole text overflows, so it is counted under the same one."""
    return max((n for n in limits if n is not None), default=None)


def _fit_record(prompt: list[int], completions: list[list[int]], policy: TruncationPolicy,
                where: str, stats: TokenStats) -> tuple[list[int], list[list[int]]]:
    """A prompt and the completions that each follow it (one, or a pair's two) within the
    per-part limits, then within `max_sequence_tokens` for the longest prompt + completion.

    Over the whole-sequence limit L, truncation cuts the prompt first, to what the longest
    completion leaves but to no fewer than min(its length, L // 2) tokens, so a long completion
    keeps some context; then the completions, to what the prompt leaves. A part is counted
    once, however many limits cut it.
    """
    p = _fit(prompt, policy.max_prompt_tokens, policy.prompt_side, policy, "prompt", where,
             stats)
    cs = [_fit(c, policy.max_completion_tokens, policy.completion_side, policy, "completion",
               where, stats) for c in completions]
    limit = policy.max_sequence_tokens
    longest = max(len(c) for c in cs)
    if limit is None or len(p) + longest <= limit:
        return p, cs
    if policy.on_overflow == "error":
        raise DataError(
            f"{where}: the prompt and completion have {len(p) + longest} tokens together, more "
            f"than the limit of {limit} ({SEQUENCE_LIMIT}); raise max_sequence_tokens, shorten "
            "the record or set on_overflow to 'truncate' or 'drop'"
        )
    if policy.on_overflow == "drop":
        stats.add("dropped_long_sequence")
        raise _Dropped
    keep = max(limit - longest, min(len(p), limit // 2))
    if keep < len(p):
        if len(p) == len(prompt):  # not counted yet
            stats.add("truncated_prompt")
        p = _cut(p, keep, policy.prompt_side)
    room = limit - len(p)
    for i, c in enumerate(cs):
        if len(c) > room:
            if len(c) == len(completions[i]):
                stats.add("truncated_completion")
            cs[i] = _cut(c, room, policy.completion_side)
    return p, cs


CLIP_CHARS_PER_TOKEN = 16
"""Characters per token above which a text is clipped before it is tokenised (text runs 3-5)."""

CLIP_MARGIN_TOKENS = 256
"""Tokens a clipped text must keep beyond its limit, so the cut lies that far from the tokens
truncation keeps."""


def _clip_string(text: str, limit: int, side: str, tokenizer) -> str:
    """`text`, or, when it has more than CLIP_CHARS_PER_TOKEN characters per token of
    `limit + CLIP_MARGIN_TOKENS`, its part that truncation keeps (its end for side "left",
    else its start) cut to that many characters. The cut stands only if the part still has
    more than `limit + CLIP_MARGIN_TOKENS` tokens: it overflows as the whole text does, and the
    tokens truncation keeps lie far from the cut, so they are the whole text's. Otherwise
    (tokens of many characters each) the whole text is kept."""
    cap = CLIP_CHARS_PER_TOKEN * (limit + CLIP_MARGIN_TOKENS)
    if len(text) <= cap:
        return text
    part = text[len(text) - cap:] if side == "left" else text[:cap]
    if len(tokenizer(part, add_special_tokens=False).input_ids) > limit + CLIP_MARGIN_TOKENS:
        return part
    return text


def _clip(text: Text | None, limit: int | None, side: str, policy: TruncationPolicy,
          tokenizer) -> Text | None:
    """`text` (a string or messages, each message's content alone) clipped by `_clip_string`
    to `limit` tokens, so an absurdly long record is not tokenised in full; ordinary text
    comes back as it is. Not under on_overflow "error", whose message counts the whole text."""
    if limit is None or policy.on_overflow == "error" or text is None:
        return text
    if isinstance(text, str):
        return _clip_string(text, limit, side, tokenizer)
    cap = CLIP_CHARS_PER_TOKEN * (limit + CLIP_MARGIN_TOKENS)
    if all(len(m["content"]) <= cap for m in text):
        return text
    return [{**m, "content": _clip_string(m["content"], limit, side, tokenizer)} for m in text]


def _ids(encoded) -> list[int]:
    # apply_chat_template returns a list, or a BatchEncoding in newer transformers.
    if isinstance(encoded, dict) or hasattr(encoded, "input_ids"):
        encoded = encoded["input_ids"]
    return list(encoded)


def apply_chat_template_option(tokenizer, value: str | None):
    """Give `tokenizer` the chat template of the `model.chat_template` option and return it.

    `value` is the Jinja template itself (any text containing `{{` or `{%`) or the path of a
    file holding one (e.g. `template.jinja`); None keeps the tokenizer's own template. It
    replaces the tokenizer's template, so `save_pretrained` stores it with the model.
    Raises `ConfigError` for a path that does not exist or a template that does not parse.
    """
    if value is None:
        return tokenizer
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"model.chat_template: expected a Jinja template or the path of a "
                          f".jinja file, got {value!r:.80}")
    source, text = "the template given", value
    if "{{" not in value and "{%" not in value:
        path = Path(value).expanduser()
        try:
            found = path.is_file()
        except OSError:  # a name too long to be a path
            found = False
        if not found:
            raise ConfigError(
                f"model.chat_template: {value!r:.120} is neither a Jinja template (it has no "
                "'{{' or '{%') nor an existing file; give the template text or the path of a "
                ".jinja file"
            )
        source, text = str(path), path.read_text(encoding="utf-8")
    import jinja2  # a dependency of transformers' chat templates

    try:
        jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(text)
    except jinja2.TemplateSyntaxError as err:
        raise ConfigError(f"model.chat_template ({source}): not a valid Jinja template: "
                          f"{err.message} (line {err.lineno})") from None
    tokenizer.chat_template = text
    return tokenizer


def _render(messages: list[dict[str, str]], tokenizer, where: str, name: str,
            add_generation_prompt: bool = False) -> list[int]:
    """Token ids of `messages` (field `name` of the record at `where`) in the chat template."""
    if hasattr(tokenizer, "chat_template") and tokenizer.chat_template is None:
        model = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        place = f"{where}: " if where else ""
        raise DataError(
            f"{place}field '{name}' holds chat messages, but the tokenizer of {model!r} has no "
            "chat template to render them; set model.chat_template (a Jinja template, or the "
            "path of a .jinja file), or give prompt/completion records with plain strings"
        )
    return _ids(tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                              tokenize=True))


def _through_eos(span: Sequence[int], eos_id: int | None) -> int:
    """How many tokens of an assistant turn's rendering are the model's to learn: all of them
    up to and including its last EOS; what the template writes after that EOS (a "\\n") is
    never generated by the model. A template that closes the turn without EOS keeps it all."""
    last = max((i for i, t in enumerate(span) if t == eos_id), default=None)
    return len(span) if last is None or eos_id is None else last + 1


def encode_prompt(prompt: Text, tokenizer, where: str = "") -> list[int]:
    """Token ids of a prompt; a message list gets the chat template and an open assistant turn."""
    if isinstance(prompt, list):
        return _render(prompt, tokenizer, where, "prompt", add_generation_prompt=True)
    return list(tokenizer(prompt).input_ids)


def encode_prompt_completion(prompt: Text, completion: Text, tokenizer, where: str = "",
                             prompt_ids: list[int] | None = None
                             ) -> tuple[list[int], list[int]]:
    """`(prompt_ids, completion_ids)` such that their concatenation is the full text.

    A string completion is followed by EOS, so the model learns to stop. A conversational one
    is rendered by the chat template, which closes the turn itself; when it ends with the
    assistant, the completion stops at that turn's EOS (template text after it is dropped).
    `prompt_ids`: the prompt's ids when already encoded (a pair's two completions share them).
    """
    if prompt_ids is None:
        prompt_ids = encode_prompt(prompt, tokenizer, where)
    if isinstance(prompt, list) != isinstance(completion, list):
        raise DataError(f"{where}: prompt and completion must both be strings or both messages")
    if isinstance(completion, list):
        full = _render(prompt + completion, tokenizer, where, "completion")
        if full[: len(prompt_ids)] != prompt_ids:
            raise DataError(
                f"{where}: the tokenizer's chat template renders the prompt differently on its "
                "own and inside the conversation, so the completion cannot be separated"
            )
        completion_ids = full[len(prompt_ids):]
        if completion and completion[-1]["role"] == "assistant":
            completion_ids = completion_ids[: _through_eos(completion_ids,
                                                           tokenizer.eos_token_id)]
        return prompt_ids, completion_ids
    completion_ids = list(tokenizer(completion, add_special_tokens=False).input_ids)
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no EOS token; set `eos_token` in its config")
    return prompt_ids, [*completion_ids, tokenizer.eos_token_id]


def encode_messages(messages: list[dict[str, str]], tokenizer,
                    where: str = "") -> tuple[list[int], list[bool]]:
    """Ids of a whole conversation and a mask that is True on the assistants' tokens.

    Each assistant turn counts through its EOS; template text after that EOS stays in the
    sequence (later turns follow it) but is masked out.
    """
    ids: list[int] = []
    mask: list[bool] = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        before = _render(messages[:i], tokenizer, where, "messages",
                         add_generation_prompt=True) if i else []
        upto = _render(messages[: i + 1], tokenizer, where, "messages")
        if upto[: len(ids)] != ids or before[: len(ids)] != ids:
            raise DataError(f"{where}: the chat template is not prefix-stable at message {i}")
        turn = len(upto) - len(before)
        learned = _through_eos(upto[len(before):], tokenizer.eos_token_id)
        mask += ([False] * (len(before) - len(ids)) + [True] * learned
                 + [False] * (turn - learned))
        ids = upto
    full = _render(messages, tokenizer, where, "messages")
    if full[: len(ids)] != ids:
        raise DataError(f"{where}: the chat template is not prefix-stable")
    mask += [False] * (len(full) - len(ids))
    if not any(mask):
        raise DataError(f"{where}: field 'messages': no assistant message to learn from")
    return full, mask


@dataclass(frozen=True)
class TokenizedExample:
    """A training sequence. `loss_mask[i]` is True when token i is a target."""

    input_ids: list[int]
    loss_mask: list[bool]
    where: str


@dataclass(frozen=True)
class TokenizedPair:
    """A preference pair sharing one prompt; `margin` is the record's own reward-model margin
    (its `margin` column), None when it has none."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    where: str
    margin: float | None = None


@dataclass(frozen=True)
class TokenizedUnpaired:
    """A prompt and one completion labelled desirable (True) or undesirable (False), for KTO."""

    prompt_ids: list[int]
    completion_ids: list[int]
    desirable: bool
    where: str


def _encode_record(prompt: Text, completions: Sequence[Text], tokenizer,
                   policy: TruncationPolicy, where: str, stats: TokenStats
                   ) -> tuple[list[int], list[list[int]]]:
    """Prompt ids and the ids of each completion that follows it, within `policy`'s limits.
    Each text is clipped when absurdly long and the prompt is encoded once, however many
    completions share it."""
    seq = policy.max_sequence_tokens
    prompt = _clip(prompt, _loosest(policy.max_prompt_tokens, seq), policy.prompt_side, policy,
                   tokenizer)
    prompt_ids = encode_prompt(prompt, tokenizer, where)
    out = []
    for completion in completions:
        completion = _clip(completion, _loosest(policy.max_completion_tokens, seq),
                           policy.completion_side, policy, tokenizer)
        out.append(encode_prompt_completion(prompt, completion, tokenizer, where,
                                            prompt_ids=prompt_ids)[1])
    return _fit_record(prompt_ids, out, policy, where, stats)


def encode_within(prompt: Text, completion: Text, tokenizer, max_sequence_tokens: int | None,
                  where: str = "") -> tuple[list[int], list[int]]:
    """`encode_prompt_completion` truncated to `max_sequence_tokens` in all (prompt start
    first, as `TruncationPolicy` says; None: no limit)."""
    p, (c,) = _encode_record(prompt, [completion], tokenizer,
                             TruncationPolicy(max_sequence_tokens=max_sequence_tokens), where,
                             TokenStats())
    return p, c


def _whole_limit(policy: TruncationPolicy) -> tuple[int | None, str, str, str | None]:
    """`(limit, what, why, knob)` of a text or conversation, one sequence: the sum of the part
    limits when both are set (counted as a completion, as it always was), or
    `max_sequence_tokens` when that is tighter."""
    parts = _sum_limits(policy)
    seq = policy.max_sequence_tokens
    if seq is not None and (parts is None or seq < parts):
        return seq, "sequence", f" ({SEQUENCE_LIMIT})", "max_sequence_tokens"
    return parts, "completion", "", None


def tokenize_sft(examples: Sequence[Example], tokenizer, policy: TruncationPolicy | None = None,
                 stats: TokenStats | None = None) -> list[TokenizedExample]:
    """`completion`, `messages` and `text` examples -> sequences with completion-only masks."""
    policy = policy or TruncationPolicy()
    stats = stats if stats is not None else TokenStats()
    whole, what, why, knob = _whole_limit(policy)
    out = []
    for ex in examples:
        try:
            if ex.kind == "completion":
                p, (c,) = _encode_record(ex.prompt, [ex.completion], tokenizer, policy,
                                         ex.where, stats)
                out.append(TokenizedExample(p + c, [False] * len(p) + [True] * len(c), ex.where))
            elif ex.kind == "messages":
                messages = _clip(ex.messages, whole, "right", policy, tokenizer)
                ids, mask = encode_messages(messages, tokenizer, ex.where)
                ids = _fit(ids, whole, "right", policy, what, ex.where, stats, why, knob)
                out.append(TokenizedExample(ids, mask[: len(ids)], ex.where))
            elif ex.kind == "text":
                text = _clip(ex.text, whole, "right", policy, tokenizer)
                ids = [*tokenizer(text).input_ids, tokenizer.eos_token_id]
                ids = _fit(ids, whole, "right", policy, what, ex.where, stats, why, knob)
                out.append(TokenizedExample(ids, [True] * len(ids), ex.where))
            else:
                raise DataError(
                    f"{ex.where}: a {ex.kind!r} record cannot be used for supervised training; "
                    "give prompt+completion, messages or text"
                )
        except _Dropped:
            continue
    return out


def _sum_limits(policy: TruncationPolicy) -> int | None:
    if policy.max_prompt_tokens is None or policy.max_completion_tokens is None:
        return None
    return policy.max_prompt_tokens + policy.max_completion_tokens


def tokenize_prompts(examples: Sequence[Example], tokenizer,
                     policy: TruncationPolicy | None = None,
                     stats: TokenStats | None = None,
                     response_tokens: int = 0) -> list[tuple[list[int], Example]]:
    """Prompts for generation (any kind with a prompt), paired with their examples.

    `response_tokens`: the response's budget (max_new_tokens), kept free within
    `max_sequence_tokens`, so a prompt gets at most `max_sequence_tokens - response_tokens`.
    """
    policy = policy or TruncationPolicy()
    stats = stats if stats is not None else TokenStats()
    limit, why, knob = policy.max_prompt_tokens, "", None
    seq = policy.max_sequence_tokens
    if seq is not None:
        room = seq - response_tokens
        if room < 1:
            raise ConfigError(
                f"a response of up to {response_tokens} tokens leaves no room for a prompt "
                f"within {seq} tokens ({SEQUENCE_LIMIT}); lower the response length "
                "(max_new_tokens)"
            )
        if limit is None or room < limit:
            limit = room
            why = (f" ({seq} tokens of max_sequence_tokens, by default the model's maximum "
                   f"positions, less {response_tokens} kept for the response)")
            knob = "max_sequence_tokens, lower the response length"
    out = []
    for ex in examples:
        if ex.prompt is None:
            raise DataError(f"{ex.where}: needs a 'prompt' field for generation")
        try:
            prompt = _clip(ex.prompt, limit, policy.prompt_side, policy, tokenizer)
            ids = _fit(encode_prompt(prompt, tokenizer, ex.where), limit, policy.prompt_side,
                       policy, "prompt", ex.where, stats, why, knob)
        except _Dropped:
            continue
        out.append((ids, ex))
    return out


def tokenize_preferences(examples: Sequence[Example], tokenizer,
                         policy: TruncationPolicy | None = None,
                         stats: TokenStats | None = None) -> list[TokenizedPair]:
    """`preference` examples -> prompt, chosen and rejected ids (each completion ends with EOS)."""
    policy = policy or TruncationPolicy()
    stats = stats if stats is not None else TokenStats()
    out = []
    for ex in examples:
        if ex.kind != "preference":
            raise DataError(
                f"{ex.where}: expected prompt+chosen+rejected, got a {ex.kind!r} record"
            )
        try:
            p, (c, r) = _encode_record(ex.prompt, [ex.chosen, ex.rejected], tokenizer, policy,
                                       ex.where, stats)
        except _Dropped:
            continue
        out.append(TokenizedPair(p, c, r, ex.where, ex.extra.get("margin")))
    return out


def tokenize_unpaired(examples: Sequence[Example], tokenizer,
                      policy: TruncationPolicy | None = None,
                      stats: TokenStats | None = None) -> list[TokenizedUnpaired]:
    """`unpaired` examples -> prompt and completion ids (the completion ends with EOS) and the
    label."""
    policy = policy or TruncationPolicy()
    stats = stats if stats is not None else TokenStats()
    out = []
    for ex in examples:
        if ex.kind != "unpaired":
            raise DataError(
                f"{ex.where}: expected prompt+completion+label, got a {ex.kind!r} record"
            )
        try:
            p, (c,) = _encode_record(ex.prompt, [ex.completion], tokenizer, policy, ex.where,
                                     stats)
        except _Dropped:
            continue
        out.append(TokenizedUnpaired(p, c, bool(ex.label), ex.where))
    return out


def kl_pairs(batch: Sequence[TokenizedUnpaired],
             max_sequence_tokens: int | None = None) -> list[TokenizedUnpaired]:
    """KTO's mismatched pairs: example i's prompt with the completion of example i − 1 (the
    last one's for i = 0), TRL's shift by one within the batch. A batch of one pairs an
    example with itself. With `max_sequence_tokens`, a prompt too long for the other
    completion keeps its end, as truncation keeps it."""
    out = []
    for i, b in enumerate(batch):
        prompt, completion = b.prompt_ids, batch[i - 1].completion_ids
        if max_sequence_tokens is not None and len(prompt) + len(completion) > max_sequence_tokens:
            prompt = _cut(prompt, max(max_sequence_tokens - len(completion), 0), "left")
        out.append(TokenizedUnpaired(prompt, completion, b.desirable,
                                     f"{b.where} + completion of {batch[i - 1].where}"))
    return out


def pad(seqs: Sequence[Sequence[int]], pad_value: int, side: str = "right",
        dtype: torch.dtype = torch.long) -> Tensor:
    """(B, L) tensor of the sequences padded to the longest with `pad_value`."""
    if side not in SIDES:
        raise ConfigError(f"padding side must be one of {SIDES}, got {side!r}")
    width = max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), width), pad_value, dtype=dtype)
    for i, s in enumerate(seqs):
        if len(s):
            row = torch.as_tensor(list(s), dtype=dtype)
            if side == "right":
                out[i, : len(s)] = row
            else:
                out[i, width - len(s):] = row
    return out


def collate_sequences(batch: Sequence[TokenizedExample], pad_id: int) -> dict[str, Tensor]:
    """Right-padded `input_ids`, `attention_mask` and `loss_mask`, each (B, L)."""
    return {
        "input_ids": pad([b.input_ids for b in batch], pad_id),
        "attention_mask": pad([[1] * len(b.input_ids) for b in batch], 0).bool(),
        "loss_mask": pad([b.loss_mask for b in batch], 0).bool(),
    }


def collate_pairs(batch: Sequence[TokenizedPair], pad_id: int) -> dict[str, Tensor]:
    """Chosen rows then rejected rows in one (2B, L) batch, so both go through one forward.

    `loss_mask` marks the completion tokens whose log-probs make the sequence log-prob.
    """
    seqs = [TokenizedExample(b.prompt_ids + b.chosen_ids,
                             [False] * len(b.prompt_ids) + [True] * len(b.chosen_ids), b.where)
            for b in batch]
    seqs += [TokenizedExample(b.prompt_ids + b.rejected_ids,
                              [False] * len(b.prompt_ids) + [True] * len(b.rejected_ids), b.where)
             for b in batch]
    return collate_sequences(seqs, pad_id)


def collate_unpaired(batch: Sequence[TokenizedUnpaired], pad_id: int) -> dict[str, Tensor]:
    """Prompt + completion rows, (B, L); `loss_mask` marks the completion tokens."""
    return collate_sequences(
        [TokenizedExample(b.prompt_ids + b.completion_ids,
                          [False] * len(b.prompt_ids) + [True] * len(b.completion_ids), b.where)
         for b in batch], pad_id)


def micro_batches_by_tokens(lengths: Sequence[int], max_tokens: int,
                            max_rows: int | None = None, packed: bool = False
                            ) -> list[list[int]]:
    """Group indices into micro-batches whose padded size rows x longest <= `max_tokens`
    (`packed`: whose total length <= `max_tokens`, for padding-free forward passes).

    Sequences are taken longest first (first-fit decreasing), which keeps padding small; each
    micro-batch lists its indices in ascending order. A sequence longer than `max_tokens` gets
    a micro-batch of its own. Results do not depend on how a batch is split as long as the
    loss is normalised by the whole step's counts (`aggregate_loss(num_tokens=...)`).
    """
    if max_tokens < 1:
        raise ConfigError(f"micro_batch_tokens must be >= 1, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = total = 0
    for i in order:
        width = max(longest, lengths[i])
        cost = total + lengths[i] if packed else (len(current) + 1) * width
        full = max_rows is not None and len(current) >= max_rows
        if current and (cost > max_tokens or full):
            batches.append(sorted(current))
            current, longest, total = [], 0, 0
            width = lengths[i]
        current.append(i)
        longest = width
        total += lengths[i]
    if current:
        batches.append(sorted(current))
    return batches
