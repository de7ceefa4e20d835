"""TRL users' data, unchanged (issue 20, item 4): chat data on a tokenizer without a chat
template is one clear error (or gets `model.chat_template`), implicit-prompt preference pairs
are split at their shared start, reward functions written for TRL are called TRL's way, and
chat SFT learns the assistant's content and EOS but not template text after the EOS."""

from __future__ import annotations

import json

import pytest

from posttrain.data.collate import (
    apply_chat_template_option,
    encode_messages,
    encode_prompt_completion,
    tokenize_preferences,
    tokenize_prompts,
    tokenize_sft,
)
from posttrain.data.formats import split_implicit_prompt, validate_record
from posttrain.errors import ConfigError, DataError, RewardError
from posttrain.models.load import load_tokenizer
from posttrain.rewards.combine import WeightedSum, call_reward, calling_convention
from posttrain.trainers.common import DataConfig, ModelConfig, load_train_eval

CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "what is 3 + 4?"},
        {"role": "assistant", "content": "7."},
        {"role": "user", "content": "and 12 - 5?"},
        {"role": "assistant", "content": "The answer is 7."}]

# A ChatML template that ends each turn with EOS and nothing after it.
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
            "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def gpt2_tok(arch_model):
    return load_tokenizer(arch_model("gpt2"))


@pytest.fixture(scope="module")
def qwen2_tok(arch_model):
    return load_tokenizer(arch_model("qwen2"))


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# --- chat data on a tokenizer without a chat template ------------------------------------------


def test_messages_without_a_chat_template_is_one_line_naming_tokenizer_record_and_fix(gpt2_tok):
    ex = validate_record({"messages": CHAT}, "data/train.jsonl line 3")
    with pytest.raises(DataError) as err:
        tokenize_sft([ex], gpt2_tok)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("data/train.jsonl line 3: field 'messages' holds chat messages")
    assert repr(gpt2_tok.name_or_path) in message  # the model directory
    assert "model.chat_template" in message and "prompt/completion" in message


def test_conversational_prompts_without_a_chat_template_fail_the_same_way(gpt2_tok):
    # RL's prompts and a conversational prompt/completion pair
    ex = validate_record({"prompt": CHAT[:2], "completion": [CHAT[2]]}, "rl.jsonl line 2")
    for call in (lambda: tokenize_prompts([ex], gpt2_tok), lambda: tokenize_sft([ex], gpt2_tok)):
        with pytest.raises(DataError, match=r"^rl.jsonl line 2: field 'prompt' holds chat "
                                            r"messages, but the tokenizer of .* has no chat"):
            call()


def test_chat_template_option_from_text_or_file_renders_messages(gpt2_tok, tmp_path):
    eos = gpt2_tok.eos_token
    msgs = CHAT[1:3]
    (tmp_path / "chat.jinja").write_text(TEMPLATE)
    for value in (TEMPLATE, str(tmp_path / "chat.jinja")):
        tok = load_tokenizer(gpt2_tok.name_or_path)
        assert apply_chat_template_option(tok, value) is tok
        ids, mask = encode_messages(msgs, tok, "t.jsonl line 1")
        assert tok.decode(ids) == f"<|user|>what is 3 + 4?{eos}<|assistant|>7.{eos}"
        assert tok.decode([i for i, m in zip(ids, mask, strict=True) if m]) == f"7.{eos}"
    tok = load_tokenizer(gpt2_tok.name_or_path)
    assert apply_chat_template_option(tok, None).chat_template is None


@pytest.mark.parametrize(("value", "match"), [
    ("templates/chat.jinja", r"model.chat_template: 'templates/chat.jinja' is neither a Jinja "
                             r"template .* nor an existing file"),
    ("{% for m in messages %}{{ m['content'] }}", r"model.chat_template \(the template given\): "
                                                 r"not a valid Jinja template"),
    ("", "model.chat_template: expected a Jinja template"),
])
def test_chat_template_option_errors(gpt2_tok, value, match):
    with pytest.raises(ConfigError, match=match):
        apply_chat_template_option(gpt2_tok, value)


def test_model_config_has_a_chat_template_option(tmp_path):
    config = ModelConfig(path=str(tmp_path), chat_template="chat.jinja")
    assert config.chat_template == "chat.jinja"
    assert ModelConfig(path=str(tmp_path)).chat_template is None


def test_cli_sft_on_gpt2_with_messages_ends_with_that_one_line(arch_model, tmp_path, capsys):
    from posttrain.cli import main

    data = write_jsonl(tmp_path / "train.jsonl", [{"messages": CHAT}] * 4)
    code = main(["sft", "--model.path", str(arch_model("gpt2")), "--data.train", str(data),
                 "--data.eval_fraction", "0", "--run.steps", "1",
                 "--run.output_dir", str(tmp_path / "runs")])
    assert code != 0
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith(f"posttrain sft: error: {data} line 1: field 'messages' holds chat "
                           "messages, but the tokenizer of ")
    assert last.endswith("set model.chat_template (a Jinja template, or the path of a .jinja "
                         "file), or give prompt/completion records with plain strings")


# --- implicit-prompt preference pairs ----------------------------------------------------------


@pytest.mark.parametrize(("chosen", "rejected", "prompt", "rest"), [
    # diverging mid-word: the shared "f" goes back to the completions
    ("Q: 2+2? A: four", "Q: 2+2? A: five", "Q: 2+2? A:", (" four", " five")),
    # diverging at a word start: the space before it starts the completions
    ("The answer is 7.", "The answer is 9.", "The answer is", (" 7.", " 9.")),
    # one a prefix of the other: "4" is a whole shared word, still not the prompt's
    ("Q: 2+2?\nA: 4", "Q: 2+2?\nA: 45", "Q: 2+2?\nA:", (" 4", " 45")),
    # a run of whitespace goes to the completions whole
    ("Question\n\nyes", "Question\n\nno", "Question", ("\n\nyes", "\n\nno")),
])
def test_implicit_prompt_of_strings_ends_after_a_whole_word(chosen, rejected, prompt, rest):
    ex = validate_record({"chosen": chosen, "rejected": rejected, "margin": 0.5},
                         "pairs.jsonl line 4")
    assert ex.kind == "preference"
    assert (ex.prompt, ex.chosen, ex.rejected) == (prompt, *rest)
    assert ex.prompt + ex.chosen == chosen and ex.prompt + ex.rejected == rejected
    assert ex.extra == {"margin": 0.5}


def test_implicit_prompt_of_conversations_is_the_shared_messages():
    chosen = [*CHAT[:4], {"role": "assistant", "content": "7."}]
    rejected = [*CHAT[:4], {"role": "assistant", "content": "8."}]
    ex = validate_record({"chosen": chosen, "rejected": rejected}, "pairs.jsonl line 1")
    assert ex.kind == "preference"
    assert ex.prompt == CHAT[:4]
    assert ex.chosen == [chosen[-1]] and ex.rejected == [rejected[-1]]


@pytest.mark.parametrize(("chosen", "rejected", "match"), [
    ("same answer", "same answer", "pairs.jsonl line 9: fields 'chosen' and 'rejected' are "
                                   "identical"),
    (CHAT, CHAT, "pairs.jsonl line 9: fields 'chosen' and 'rejected' are identical"),
    ("seven", "nine", "pairs.jsonl line 9: no 'prompt' field, and 'chosen' and 'rejected' "
                      "share no leading words"),
    ("sev en", "seven", "pairs.jsonl line 9: no 'prompt' field, and 'chosen' and 'rejected' "
                        "share no leading words"),
    (CHAT[1:3], CHAT[3:5], "pairs.jsonl line 9: no 'prompt' field, and 'chosen' and 'rejected' "
                           "share no leading message"),
    (CHAT[:3], CHAT[:2], r"pairs.jsonl line 9: .* 'rejected' ends there"),
    (CHAT[:3], [*CHAT[:1], {"role": "user", "content": "hi"}],
     r"pairs.jsonl line 9: .* 'chosen' goes on with a 'user' message"),
    ("a string", CHAT, "pairs.jsonl line 9: fields chosen, rejected mix strings"),
])
def test_implicit_prompt_errors_name_the_line(chosen, rejected, match):
    with pytest.raises(DataError, match=match):
        validate_record({"chosen": chosen, "rejected": rejected}, "pairs.jsonl line 9")


def test_split_implicit_prompt_is_the_rule_alone():
    assert split_implicit_prompt("Say hi: hello", "Say hi: hey", "x") == ("Say hi:", " hello",
                                                                          " hey")


def test_implicit_prompt_pairs_load_for_rm_and_dpo(tmp_path, gpt2_tok, qwen2_tok):
    conv = [{"chosen": [*CHAT[1:2], {"role": "assistant", "content": a}],
             "rejected": [*CHAT[1:2], {"role": "assistant", "content": b}]}
            for a, b in (("7.", "8."), ("seven", "eight"), ("7", "It is 9."))]
    plain = [{"chosen": f"Q: {q}? A: {a}", "rejected": f"Q: {q}? A: {b}"}
             for q, a, b in (("3 + 4", "7", "8"), ("6 * 7", "42", "41"), ("1 + 1", "2", "two"))]
    for records, tok in ((conv, qwen2_tok), (plain, gpt2_tok)):
        path = write_jsonl(tmp_path / "pairs.jsonl", records)
        train, held = load_train_eval(DataConfig(train=str(path), eval_fraction=0),
                                      "preference", seed=0)
        assert [e.kind for e in train] == ["preference"] * 3 and held == []
        pairs = tokenize_preferences(train, tok)
        for pair, ex in zip(pairs, train, strict=True):
            assert pair.chosen_ids[-1] == pair.rejected_ids[-1] == tok.eos_token_id
            assert pair.chosen_ids != pair.rejected_ids
            if isinstance(ex.prompt, list):
                assert ex.prompt == CHAT[1:2]
            else:
                assert ex.prompt == records[train.index(ex)]["chosen"].rsplit(" ", 1)[0]
    # KTO reads pairs as unpaired examples
    train, _ = load_train_eval(DataConfig(train=str(path), eval_fraction=0),
                               ("unpaired", "preference"), seed=0)
    assert all(e.kind == "preference" and e.prompt.endswith("A:") for e in train)


# --- reward functions written for TRL ----------------------------------------------------------


def test_trl_reward_function_is_called_by_keyword_with_its_columns():
    seen = {}

    def trl_style(completions, **kwargs):
        seen.update(kwargs, completions=completions)
        return [float(c == a) for c, a in zip(completions, kwargs["answer"], strict=True)]

    scores, n_errors = call_reward(trl_style, ["1+1=", "2+2="], ["2", "5"], {"answer": ["2", "4"]})
    assert (scores, n_errors) == ([1.0, 0.0], 0)
    assert seen == {"prompts": ["1+1=", "2+2="], "completions": ["2", "5"],
                    "answer": ["2", "4"]}


def test_trl_reward_function_gets_chat_completions_as_message_lists():
    got = []

    def trl_style(prompts, completions, **kwargs):
        got.extend(completions)
        return [len(c[0]["content"]) if isinstance(c, list) else len(c) for c in completions]

    chat = [{"role": "user", "content": "hi"}]
    scores, _ = call_reward(trl_style, [chat, "plain"], ["hello", "hey"])
    assert scores == [5.0, 3.0]
    assert got == [[{"role": "assistant", "content": "hello"}], "hey"]


def test_trl_keyword_only_function_gets_only_what_it_names():
    def strict(*, prompts, completions, answer):
        return [float(c == a) for c, a in zip(completions, answer, strict=True)]

    def only_kwargs(**kwargs):
        return [float(len(kwargs["completions"][0]))] * len(kwargs["prompts"])

    columns = {"answer": ["4"], "difficulty": [3]}
    assert call_reward(strict, ["2+2="], ["4"], columns) == ([1.0], 0)
    assert call_reward(only_kwargs, ["2+2="], ["four"], columns) == ([4.0], 0)


def test_posttrain_style_functions_are_called_positionally():
    def ours(prompts, responses, **columns):
        return [float(len(r)) for r in responses]

    def loose(*args, **kwargs):  # positional arguments: posttrain's way
        return [float(len(r)) for r in args[1]]

    chat = [{"role": "user", "content": "hi"}]
    for fn in (ours, loose, lambda p, r, **c: [float(len(x)) for x in r]):
        assert not calling_convention(fn).trl
        assert call_reward(fn, [chat], ["hello"], {"answer": ["x"]}) == ([5.0], 0)


def test_calling_convention_rule_and_cache():
    def trl(completions, **kwargs): ...
    def trl_prompts_first(prompts, completions): ...
    def kwargs_only(**kwargs): ...
    def ours(prompts, responses, **columns): ...
    def ours_renamed(p, r): ...

    class Scorer:
        def __call__(self, prompts, completions, **kwargs): ...

    assert [calling_convention(f).trl for f in (trl, trl_prompts_first, kwargs_only, Scorer())] \
        == [True] * 4
    assert [calling_convention(f).trl for f in (ours, ours_renamed, print)] == [False] * 3
    assert calling_convention(trl_prompts_first).accepts == {"prompts", "completions"}
    assert calling_convention(trl) is calling_convention(trl)  # read once per function


def test_trl_function_single_sample_recall_uses_the_same_convention():
    calls = []

    def fragile(completions, **kwargs):
        calls.append(sorted(kwargs))
        if any("boom" in c for c in completions):
            raise ZeroDivisionError("boom")
        return [1.0] * len(completions)

    cols = {"answer": ["a", "b", "c"]}
    scores, n_errors = call_reward(fragile, ["p"] * 3, ["ok", "boom", "fine"], cols,
                                   on_error="score", error_score=-1.0)
    assert (scores, n_errors) == ([1.0, -1.0, 1.0], 1)
    assert calls == [["answer", "prompts"]] * 4  # the batch, then each sample alone, by keyword
    with pytest.raises(RewardError, match=r"fragile failed on sample 1 \(of 3\): raised "
                                          r"ZeroDivisionError"):
        call_reward(fragile, ["p"] * 3, ["ok", "boom", "fine"], cols)


def test_trl_function_needing_a_missing_argument_or_clashing_column_raises():
    def needs_answer(completions, answer, **kwargs):
        return [1.0] * len(completions)

    def trl(completions, **kwargs):
        return [1.0] * len(completions)

    with pytest.raises(RewardError, match=r"needs the argument\(s\) 'answer', which are neither "
                                          r"prompts, completions, completion_ids .*it has: "
                                          r"level"):
        call_reward(needs_answer, ["p"], ["r"], {"level": [1]}, on_error="score")
    with pytest.raises(RewardError, match="a dataset column is named 'completions'"):
        call_reward(trl, ["p"], ["r"], {"completions": ["x"]})
    # the posttrain convention's own argument name is free for TRL-style functions
    assert call_reward(trl, ["p"], ["r"], {"responses": ["x"]}) == ([1.0], 0)


def test_weighted_sum_mixes_conventions_and_passes_completion_ids_to_trl_terms():
    got = {}

    def by_ids(prompts, completions, completion_ids, **kwargs):
        got["ids"] = completion_ids
        return [float(len(ids)) for ids in completion_ids]

    def ours(prompts, responses, **columns):
        assert "completion_ids" not in columns
        return [1.0] * len(responses)

    ws = WeightedSum([("length", by_ids, 1.0), ("ours", ours, 2.0)])
    assert ws(["a", "b"], ["x", "y"], completion_ids=[[1, 2], [3]], answer=["1", "2"]) \
        == [4.0, 3.0]
    assert got["ids"] == [[1, 2], [3]]
    with pytest.raises(RewardError, match=r"'completion_ids', which are neither prompts, "
                                          r"completions, completion_ids \(not available here\)"):
        ws.score(["a"], ["x"])


# --- what the chat template writes after the assistant's EOS -----------------------------------


def test_chat_sft_masks_template_text_after_the_assistant_eos(qwen2_tok, tiny_tokenizer):
    tok = qwen2_tok
    ids, mask = encode_messages(CHAT, tok, "chat.jsonl line 1")
    learned = tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert learned == "7.<|im_end|>The answer is 7.<|im_end|>"
    # the "\n" after the first <|im_end|> stays in the sequence, before the next user turn
    full = tok.decode(ids)
    assert "7.<|im_end|>\n<|im_start|>user\nand 12 - 5?" in full and full.endswith("<|im_end|>\n")
    ends = [i for i, t in enumerate(ids) if t == tok.eos_token_id and mask[i]]
    assert len(ends) == 2 and not any(mask[ends[-1] + 1:])
    assert tok.decode(ids[ends[0] + 1: ends[0] + 2]) == "\n" and not mask[ends[0] + 1]
    # a conversational completion stops at the assistant's EOS
    _, completion = encode_prompt_completion(CHAT[:2], [CHAT[2]], tok, "chat.jsonl line 1")
    assert tok.decode(completion) == "7.<|im_end|>"
    (seq,) = tokenize_sft([validate_record({"prompt": CHAT[:2], "completion": [CHAT[2]]},
                                           "x")], tok)
    assert seq.input_ids[-1] == tok.eos_token_id

    # a template that ends the turn with EOS (the built-in tiny tokenizer) is unchanged
    tiny = [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"},
            {"role": "user", "content": "2+2"}, {"role": "assistant", "content": "4"}]
    ids, mask = encode_messages(tiny, tiny_tokenizer)
    assert tiny_tokenizer.decode(ids) == ("<|user|>1+1<|assistant|>2<eos>"
                                          "<|user|>2+2<|assistant|>4<eos>")
    assert mask == ([False] * 5 + [True] * 2) * 2  # "<|user|>1+1<|assistant|>" then "2<eos>"
