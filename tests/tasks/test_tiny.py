"""The tiny model a task writes under model/: it loads offline with the Auto classes, its
tokenizer covers every character of every task, generation is reproducible, and the chat
template and special ids are set."""

from __future__ import annotations

import json

import pytest

from posttrain.tasks import TASKS, make_task

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return make_task("arithmetic_cot", tmp_path_factory.mktemp("cot"), seed=0, model=True)


@pytest.fixture(scope="module")
def tokenizer(task_dir):
    return transformers.AutoTokenizer.from_pretrained(task_dir / "model", local_files_only=True)


@pytest.fixture(scope="module")
def model(task_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(task_dir / "model",
                                                              local_files_only=True)
    return model.eval()


def all_texts(out) -> list[str]:
    info = json.loads((out / "task.json").read_text())
    texts = []
    for f in info["files"].values():
        for line in (out / f["path"]).read_text().splitlines():
            for v in json.loads(line).values():  # strings, and the contents of messages
                texts += [v] if isinstance(v, str) else [m["content"] for m in v]
    return texts


def test_task_json_names_the_model(task_dir):
    info = json.loads((task_dir / "task.json").read_text())
    assert info["model"]["path"] == "model"
    assert (task_dir / "model" / "config.json").exists()


@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_character_is_a_token(tmp_path, tokenizer, name):
    out = make_task(name, tmp_path, seed=0, model=False)
    texts = sorted(set(all_texts(out)))
    unk = tokenizer.unk_token_id
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert unk not in ids, f"{name}: {text!r} has characters the tokenizer lacks"
        # One token per character, and decoding gives the text back.
        assert len(ids) == len(text) and tokenizer.decode(ids) == text


def test_special_ids_and_chat_template(tokenizer, model):
    ids = {tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id}
    assert None not in ids and len(ids) == 3
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "7+5="}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<|user|>7+5=<|assistant|>"
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": "7+5="}, {"role": "assistant", "content": "7+5=12;#12"}],
        tokenize=False,
    )
    assert full == "<|user|>7+5=<|assistant|>7+5=12;#12<eos>"
    # A tool's result is a user turn starting with "=" (no tool role in the vocabulary).
    tool = tokenizer.apply_chat_template(
        [{"role": "user", "content": "37*48"}, {"role": "assistant", "content": "calc(37*48)"},
         {"role": "tool", "content": "1776"}], tokenize=False, add_generation_prompt=True)
    assert tool == "<|user|>37*48<|assistant|>calc(37*48)<eos><|user|>=1776<|assistant|>"
    # The role markers are single tokens, not spelled out character by character.
    assert len(tokenizer(rendered, add_special_tokens=False)["input_ids"]) == 2 + 4


def test_generate_is_reproducible(tokenizer, model):
    # Left padding: a decoder-only model continues from the end of each prompt.
    batch = tokenizer(["7+5=", "347+85="], return_tensors="pt", padding=True,
                      padding_side="left", add_special_tokens=False)
    assert batch["attention_mask"][0].tolist() == [0, 0, 0, 1, 1, 1, 1]

    def sample():
        torch.manual_seed(123)
        with torch.no_grad():
            return model.generate(**batch, do_sample=True, max_new_tokens=12, top_k=0)

    first, second = sample(), sample()
    assert first.shape[0] == 2 and first.shape[1] > batch["input_ids"].shape[1]
    assert torch.equal(first, second)


def test_model_size():
    from posttrain.tasks.tiny import TinyModelSpec, build_char_tokenizer, build_tiny_causal_lm

    model = build_tiny_causal_lm(build_char_tokenizer(), TinyModelSpec())
    n = sum(p.numel() for p in model.parameters())
    assert 0.2e6 < n < 0.35e6, n  # "about 0.27 M parameters"
