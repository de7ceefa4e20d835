"""Tokenisation with completion-only masks, truncation, padding and token-budget batching."""

from __future__ import annotations

import random
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from posttrain.data.collate import (
    CLIP_CHARS_PER_TOKEN,
    CLIP_MARGIN_TOKENS,
    TokenizedUnpaired,
    TokenStats,
    TruncationPolicy,
    collate_pairs,
    collate_sequences,
    collate_unpaired,
    encode_messages,
    kl_pairs,
    micro_batches_by_tokens,
    pad,
    tokenize_preferences,
    tokenize_prompts,
    tokenize_sft,
    tokenize_unpaired,
)
from posttrain.data.formats import validate_record
from posttrain.errors import ConfigError, DataError
from tests.conftest import longest_row


def ex(record, where="t.jsonl line 1"):
    return validate_record(record, where)


def test_completion_only_mask(tiny_tokenizer):
    tok = tiny_tokenizer
    (seq,) = tokenize_sft([ex({"prompt": "12+3=", "completion": "15"})], tok)
    # prompt: 5 characters, completion: "1", "5", EOS
    assert tok.decode(seq.input_ids) == "12+3=15<eos>"
    assert seq.loss_mask == [False] * 5 + [True] * 3
    assert seq.input_ids[-1] == tok.eos_token_id


def test_messages_mask_covers_only_assistant_turns(tiny_tokenizer):
    tok = tiny_tokenizer
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+1"},
            {"role": "assistant", "content": "2"}, {"role": "user", "content": "2+2"},
            {"role": "assistant", "content": "4"}]
    ids, mask = encode_messages(msgs, tok)
    learned = tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert learned == "2<eos>4<eos>"
    assert tok.decode(ids) == ("<|system|>be brief<|user|>1+1<|assistant|>2<eos>"
                               "<|user|>2+2<|assistant|>4<eos>")


def test_conversational_completion_uses_the_chat_template(tiny_tokenizer):
    tok = tiny_tokenizer
    (seq,) = tokenize_sft([ex({"prompt": [{"role": "user", "content": "hi"}],
                               "completion": [{"role": "assistant", "content": "yo"}]})], tok)
    prompt = [i for i, m in zip(seq.input_ids, seq.loss_mask, strict=True) if not m]
    target = [i for i, m in zip(seq.input_ids, seq.loss_mask, strict=True) if m]
    assert tok.decode(prompt) == "<|user|>hi<|assistant|>"
    assert tok.decode(target) == "yo<eos>"


def test_text_records_learn_every_token(tiny_tokenizer):
    (seq,) = tokenize_sft([ex({"text": "abc"})], tiny_tokenizer)
    assert seq.loss_mask == [True] * 4


def test_prompt_only_record_is_rejected_for_sft(tiny_tokenizer):
    with pytest.raises(DataError, match=r"t\.jsonl line 1: a 'prompt' record cannot be used"):
        tokenize_sft([ex({"prompt": "1+1="})], tiny_tokenizer)


def test_truncation_policies(tiny_tokenizer):
    tok = tiny_tokenizer
    record = ex({"prompt": "abcdefgh", "completion": "12345"}, "t.jsonl line 7")
    left = TruncationPolicy(max_prompt_tokens=3, max_completion_tokens=2)
    stats = TokenStats()
    (seq,) = tokenize_sft([record], tok, left, stats)
    assert tok.decode(seq.input_ids) == "fgh12"  # prompt keeps its end, completion its start
    assert stats.counts == {"truncated_prompt": 1, "truncated_completion": 1}
    right = TruncationPolicy(max_prompt_tokens=3, prompt_side="right")
    (seq,) = tokenize_sft([record], tok, right)
    assert tok.decode(seq.input_ids) == "abc12345<eos>"
    stats = TokenStats()
    assert tokenize_sft([record], tok, TruncationPolicy(max_prompt_tokens=3,
                                                        on_overflow="drop"), stats) == []
    assert stats.counts == {"dropped_long_prompt": 1}
    with pytest.raises(DataError, match=r"t.jsonl line 7: the prompt has 8 tokens, more than "
                                        r"the limit of 3"):
        tokenize_sft([record], tok, TruncationPolicy(max_prompt_tokens=3, on_overflow="error"))
    with pytest.raises(ConfigError, match="on_overflow"):
        TruncationPolicy(on_overflow="cut")


def test_prompts_and_preferences(tiny_tokenizer):
    tok = tiny_tokenizer
    [(ids, e)] = tokenize_prompts([ex({"prompt": "7+8=", "answer": "15"})], tok)
    assert tok.decode(ids) == "7+8=" and e.extra["answer"] == "15"
    [pair] = tokenize_preferences([ex({"prompt": "q:", "chosen": "ab", "rejected": "c"})], tok)
    batch = collate_pairs([pair], tok.pad_token_id)
    # chosen row then rejected row, right-padded; loss mask on the completion tokens only
    assert tok.decode(batch["input_ids"][0]) == "q:ab<eos>"
    assert batch["loss_mask"].tolist() == [[False, False, True, True, True],
                                           [False, False, True, True, False]]
    assert batch["attention_mask"].tolist() == [[True] * 5, [True] * 4 + [False]]


def test_pad_both_sides():
    assert pad([[1, 2], [3]], 0).tolist() == [[1, 2], [3, 0]]
    assert pad([[1, 2], [3]], 0, side="left").tolist() == [[1, 2], [0, 3]]


def test_collate_sequences(tiny_tokenizer):
    seqs = tokenize_sft([ex({"prompt": "1=", "completion": "1"}),
                         ex({"prompt": "22=", "completion": "22"})], tiny_tokenizer)
    batch = collate_sequences(seqs, tiny_tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (2, 6)
    assert batch["attention_mask"].sum().item() == 4 + 6
    assert batch["loss_mask"].tolist()[0] == [False, False, True, True, False, False]


def test_micro_batches_respect_the_budget_and_cover_everything():
    rng = random.Random(0)
    lengths = [rng.randint(1, 50) for _ in range(200)]
    batches = micro_batches_by_tokens(lengths, max_tokens=128)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(200))
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) <= 128
    # first-fit decreasing wastes little padding: under 25% of the budget on average here
    used = sum(sum(lengths[i] for i in b) for b in batches)
    assert used / (128 * len(batches)) > 0.75
    # a sequence longer than the budget gets a batch of its own
    assert micro_batches_by_tokens([300, 5, 5], max_tokens=100) == [[0], [1, 2]]
    assert micro_batches_by_tokens([5] * 6, max_tokens=100, max_rows=4) == [[0, 1, 2, 3], [4, 5]]
    with pytest.raises(ConfigError):
        micro_batches_by_tokens([1], 0)


def test_micro_batches_are_deterministic():
    lengths = [3, 9, 9, 1, 4]
    assert micro_batches_by_tokens(lengths, 18) == micro_batches_by_tokens(lengths, 18)
    assert micro_batches_by_tokens(lengths, 18) == [[1, 2], [0, 3, 4]]
    assert torch.equal(pad([[1]], 0), torch.tensor([[1]]))


def test_unpaired_tokenisation_collation_and_kl_pairs(tiny_tokenizer):
    tok = tiny_tokenizer
    exs = [ex({"prompt": "1+2=", "completion": "3", "label": True}, "u line 1"),
           ex({"prompt": "5+5=", "completion": "10", "label": False}, "u line 2"),
           ex({"prompt": "9=", "completion": "777", "label": True}, "u line 3")]
    items = tokenize_unpaired(exs, tok)
    assert [tok.decode(i.prompt_ids) for i in items] == ["1+2=", "5+5=", "9="]
    assert [tok.decode(i.completion_ids) for i in items] == ["3<eos>", "10<eos>", "777<eos>"]
    assert [i.desirable for i in items] == [True, False, True]
    b = collate_unpaired(items, tok.pad_token_id)
    # "1+2=3<eos>" 6 tokens, "5+5=10<eos>" 7, "9=777<eos>" 6: right-padded to 7
    assert b["input_ids"].shape == (3, 7)
    assert b["attention_mask"].sum(1).tolist() == [6, 7, 6]
    assert b["loss_mask"][0].tolist() == [False] * 4 + [True] * 2 + [False]
    assert b["loss_mask"][2].tolist() == [False, False, True, True, True, True, False]
    # KTO's mismatched pairs: prompt i with the completion of i - 1 (TRL's shift by one)
    kl = kl_pairs(items)
    assert [tok.decode(k.prompt_ids + k.completion_ids) for k in kl] == [
        "1+2=777<eos>", "5+5=3<eos>", "9=10<eos>"]
    assert kl[1].where == "u line 2 + completion of u line 1"
    # truncation applies as for pairs; other kinds are refused
    short = tokenize_unpaired(exs, tok, TruncationPolicy(max_completion_tokens=2))
    assert tok.decode(short[2].completion_ids) == "77"
    with pytest.raises(DataError, match="u line 9: expected prompt\\+completion\\+label"):
        tokenize_unpaired([ex({"prompt": "a", "completion": "b"}, "u line 9")], tok)


def test_preference_margin_reaches_the_tokenized_pair(tiny_tokenizer):
    pairs = tokenize_preferences([ex({"prompt": "1=", "chosen": "1", "rejected": "2",
                                      "margin": 1.5}),
                                  ex({"prompt": "1=", "chosen": "1", "rejected": "2"})],
                                 tiny_tokenizer)
    assert [p.margin for p in pairs] == [1.5, None]


# --- the whole-sequence limit and absurdly long records (issue 17, item 2) -------------------

LONG = "12+34=46; " * 20_000  # 200,000 characters, one token each for the tiny tokenizer
LIMIT = 256  # the tiny model's maximum positions


def long_and_valid(kind):
    """Valid records of `kind` with a 200,000-character one (line 9) among them."""
    valid = {
        "completion": [{"prompt": "1+2=", "completion": "3"},
                       {"prompt": "40+2=", "completion": "42"}],
        "preference": [{"prompt": "1+2=", "chosen": "3", "rejected": "4"},
                       {"prompt": "7+7=", "chosen": "14", "rejected": "41"}],
        "unpaired": [{"prompt": "1+2=", "completion": "3", "label": True},
                     {"prompt": "7+7=", "completion": "41", "label": False}],
        "prompt": [{"prompt": "1+2="}, {"prompt": "7+7="}],
    }[kind]
    long = {"completion": {"prompt": LONG, "completion": "46"},
            "preference": {"prompt": LONG, "chosen": "46", "rejected": "47"},
            "unpaired": {"prompt": LONG, "completion": "46", "label": True},
            "prompt": {"prompt": LONG}}[kind]
    exs = [ex(r, f"t.jsonl line {i + 1}") for i, r in enumerate(valid)]
    return exs, ex(long, "t.jsonl line 9")


def prompt_of(item):
    """The prompt ids of any tokenised item (an SFT sequence's are its unmasked start)."""
    if isinstance(item, tuple):  # tokenize_prompts
        return item[0]
    if hasattr(item, "prompt_ids"):
        return item.prompt_ids
    return item.input_ids[: item.loss_mask.index(True)]


TOKENIZERS = {"completion": tokenize_sft, "preference": tokenize_preferences,
              "unpaired": tokenize_unpaired, "prompt": tokenize_prompts}


@pytest.mark.parametrize("kind", list(TOKENIZERS))
def test_a_200000_character_prompt_is_truncated_to_the_sequence_limit(kind, tiny_tokenizer):
    tok = tiny_tokenizer
    valid, long = long_and_valid(kind)
    tokenize = TOKENIZERS[kind]
    extra = {"response_tokens": 16} if kind == "prompt" else {}
    stats = TokenStats()
    policy = TruncationPolicy(max_sequence_tokens=LIMIT)
    *kept, cut = tokenize([*valid, long], tok, policy, stats, **extra)
    assert stats.counts == {"truncated_prompt": 1}
    # the prompt keeps its end and makes room for the longest completion: 256 in all; RL's
    # prompts leave 16 for the response
    assert longest_row(cut) == (LIMIT - 16 if kind == "prompt" else LIMIT)
    assert prompt_of(cut) == list(tok(LONG).input_ids)[-len(prompt_of(cut)):]
    # the other records are tokenised exactly as without a limit
    assert kept == tokenize(valid, tok)


@pytest.mark.parametrize("kind", list(TOKENIZERS))
def test_a_200000_character_prompt_is_dropped_and_counted(kind, tiny_tokenizer):
    valid, long = long_and_valid(kind)
    tokenize = TOKENIZERS[kind]
    extra = {"response_tokens": 16} if kind == "prompt" else {}
    stats = TokenStats()
    policy = TruncationPolicy(max_sequence_tokens=LIMIT, on_overflow="drop")
    assert tokenize([*valid, long], tiny_tokenizer, policy, stats, **extra) == \
        tokenize(valid, tiny_tokenizer)
    assert stats.counts == {("dropped_long_prompt" if kind == "prompt"
                             else "dropped_long_sequence"): 1}


def test_a_200000_character_prompt_is_an_error_that_says_which_limit(tiny_tokenizer):
    valid, long = long_and_valid("preference")
    policy = TruncationPolicy(max_sequence_tokens=LIMIT, on_overflow="error")
    with pytest.raises(DataError) as err:
        tokenize_preferences([*valid, long], tiny_tokenizer, policy)
    # 200,000 prompt tokens + "47<eos>"
    assert str(err.value) == (
        "t.jsonl line 9: the prompt and completion have 200003 tokens together, more than the "
        "limit of 256 (max_sequence_tokens, by default the model's maximum positions); raise "
        "max_sequence_tokens, shorten the record or set on_overflow to 'truncate' or 'drop'")
    valid, long = long_and_valid("prompt")
    with pytest.raises(DataError) as err:
        tokenize_prompts([*valid, long], tiny_tokenizer, policy, response_tokens=16)
    assert str(err.value) == (
        "t.jsonl line 9: the prompt has 200000 tokens, more than the limit of 240 (256 tokens "
        "of max_sequence_tokens, by default the model's maximum positions, less 16 kept for "
        "the response); raise max_sequence_tokens, lower the response length or set "
        "on_overflow to 'truncate' or 'drop'")
    with pytest.raises(ConfigError, match="a response of up to 256 tokens leaves no room"):
        tokenize_prompts(valid, tiny_tokenizer, policy, response_tokens=256)


def test_long_completions_texts_and_conversations_meet_the_sequence_limit(tiny_tokenizer):
    tok = tiny_tokenizer
    policy = TruncationPolicy(max_sequence_tokens=LIMIT)
    stats = TokenStats()
    completion, text, chat = tokenize_sft([
        ex({"prompt": "1+1=", "completion": LONG}),
        ex({"text": LONG}),
        ex({"messages": [{"role": "user", "content": "hi"},
                         {"role": "assistant", "content": LONG}]}),
    ], tok, policy, stats)
    # a short prompt stays whole (it is under half the limit); the completion keeps its start
    start = list(tok(LONG).input_ids)[:LIMIT]
    assert completion.input_ids == list(tok("1+1=").input_ids) + start[: LIMIT - 4]
    assert completion.loss_mask == [False] * 4 + [True] * (LIMIT - 4)
    assert text.input_ids == start and all(text.loss_mask)
    assert tok.decode(chat.input_ids[:4]) == "<|user|>hi<|assistant|>"
    assert chat.input_ids[4:] == start[: LIMIT - 4]
    assert chat.loss_mask == [False] * 4 + [True] * (LIMIT - 4)
    assert stats.counts == {"truncated_completion": 1, "truncated_sequence": 2}
    # the per-part limits still come first, and a part cut by both is counted once
    stats = TokenStats()
    both = TruncationPolicy(max_prompt_tokens=300, max_sequence_tokens=LIMIT)
    (seq,) = tokenize_sft([ex({"prompt": LONG, "completion": "46"})], tok, both, stats)
    assert len(seq.input_ids) == LIMIT and stats.counts == {"truncated_prompt": 1}
    with pytest.raises(DataError, match=r"the sequence has 200001 tokens, more than the limit "
                                        r"of 256 \(max_sequence_tokens, by default the model's "
                                        r"maximum positions\); raise max_sequence_tokens"):
        tokenize_sft([ex({"text": LONG})], tok, replace(policy, on_overflow="error"))


class CountingTokenizer:
    """The tiny tokenizer, recording the length of every text it is called on."""

    def __init__(self, tok):
        self.tok, self.lengths = tok, []

    def __call__(self, text, **kwargs):
        self.lengths.append(len(text))
        return self.tok(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_a_200000_character_prompt_is_clipped_before_it_is_tokenised(tiny_tokenizer):
    valid, long = long_and_valid("preference")
    tok = CountingTokenizer(tiny_tokenizer)
    pairs = tokenize_preferences([*valid, long], tok, TruncationPolicy(max_sequence_tokens=LIMIT))
    # no text longer than the clip was tokenised: the 200,000 characters never were
    assert max(tok.lengths) == CLIP_CHARS_PER_TOKEN * (LIMIT + CLIP_MARGIN_TOKENS) < len(LONG)
    # each prompt is tokenised once for its two completions; the long one once more, to check
    # that its clipped part still overflows
    assert len(tok.lengths) == 3 * len(valid) + 4
    assert pairs[-1].prompt_ids == list(tiny_tokenizer(LONG).input_ids)[-(LIMIT - 3):]


class WordTokenizer:
    """One token per space-separated word, the word's number its id, so what truncation kept
    can be read off; records the length of every text it is called on."""

    eos_token_id = 0

    def __init__(self):
        self.lengths = []

    def __call__(self, text, add_special_tokens=True):
        self.lengths.append(len(text))
        return SimpleNamespace(input_ids=[int(w) for w in text.split()])


@pytest.mark.parametrize(("width", "clipped"), [(6, True), (99, False)])
def test_clipping_keeps_the_tokens_of_the_whole_text(width, clipped):
    # 6-digit words: 7 characters a token, so the clip keeps plenty of tokens and is used;
    # 99-digit words: 100 characters a token, so the clip would keep too few and the whole
    # text is tokenised instead. Either way the prompt keeps the last 10 words.
    words = 40_000 if width == 6 else 3_000
    text = " ".join(f"{i:0{width}d}" for i in range(words))
    tok = WordTokenizer()
    stats = TokenStats()
    [(ids, _)] = tokenize_prompts([ex({"prompt": text})], tok,
                                  TruncationPolicy(max_sequence_tokens=16), stats,
                                  response_tokens=6)
    assert ids == list(range(words - 10, words))
    assert stats.counts == {"truncated_prompt": 1}
    assert (max(tok.lengths) < len(text)) == clipped


def test_records_under_the_limits_are_tokenised_as_without_them(tiny_tokenizer):
    records = [ex(r) for r in ({"prompt": "12+3=", "completion": "15"},
                               {"prompt": [{"role": "user", "content": "hi"}],
                                "completion": [{"role": "assistant", "content": "yo"}]},
                               {"text": "abc"},
                               {"messages": [{"role": "user", "content": "1+1"},
                                             {"role": "assistant", "content": "2"}]})]
    policy = TruncationPolicy(max_sequence_tokens=LIMIT)
    assert tokenize_sft(records, tiny_tokenizer, policy) == tokenize_sft(records, tiny_tokenizer)
    pairs = [ex({"prompt": [{"role": "user", "content": "q"}],
                 "chosen": [{"role": "assistant", "content": "ab"}],
                 "rejected": [{"role": "assistant", "content": "c"}]})]
    assert tokenize_preferences(pairs, tiny_tokenizer, policy) == \
        tokenize_preferences(pairs, tiny_tokenizer)


def test_kto_mismatched_pairs_fit_the_sequence_limit_too():
    # a prompt cut to fit its own 3-token completion meets a 10-token one in the KL pairs
    items = [TokenizedUnpaired(list(range(253)), [7] * 3, True, "u line 1"),
             TokenizedUnpaired([5] * 4, [8] * 10, False, "u line 2")]
    kl = kl_pairs(items, max_sequence_tokens=LIMIT)
    # pair 0: prompt 1 + completion 2 = 263 tokens > 256, so the prompt keeps its last 246
    assert kl[0].prompt_ids == list(range(7, 253)) and kl[0].completion_ids == [8] * 10
    assert (kl[1].prompt_ids, kl[1].completion_ids) == ([5] * 4, [7] * 3)
    assert kl_pairs(items)[0].prompt_ids == list(range(253))  # no limit: as before
