"""Tokenisation with completion-only masks, truncation, padding and token-budget batching."""

from __future__ import annotations

import random

import pytest
import torch

from posttrain.data.collate import (
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
