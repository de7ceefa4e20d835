"""The benchmark's model, tokenizer and data, built locally and identically for both libraries.

This module imports only torch, tokenizers and transformers, so that it runs in posttrain's
virtual environment and in TRL's. Everything is seeded: two builds give the same files.

- A 512-token byte-level BPE tokenizer trained with `tokenizers` on synthetic arithmetic text,
  saved as a `PreTrainedTokenizerFast` (pad, eos; no BOS is added, no chat template).
- A random-init Llama: `tiny` (hidden 64, 4 layers, 2 heads, the built-in model's shape),
  `small` (hidden 256, 4 layers, 4 heads, intermediate 688, ~3.4 M
  parameters) and `large` (~8x: hidden 512, 8 layers, 8 heads, intermediate 1376).
- Records whose tokenised lengths are exact: 16-token prompts and 31-token completions (32 with
  the EOS both libraries append), so every sequence is 48 tokens in both libraries.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SIZES = {
    # the built-in tiny model's shape (two heads of 32: vLLM's CPU attention refuses 16)
    "tiny": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=2,
                 intermediate_size=256),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                  intermediate_size=688),
    "large": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                  intermediate_size=1376),
}
VOCAB = 512
PROMPT_TOKENS = 16
COMPLETION_TOKENS = 31  # + EOS = 32
N_RECORDS = 256


def _corpus(rng: random.Random, n: int) -> list[str]:
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        op = rng.choice("+-*")
        c = eval_op(a, b, op)
        out.append(f"Question: what is {a} {op} {b}? Answer: {a} {op} {b} = {c}. "
                   f"So the result is {c}, and {a} plus {b} is {a + b}.")
    return out


def eval_op(a: int, b: int, op: str) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def build_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_corpus(random.Random(0), 4000), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    fast.save_pretrained(out)
    return fast


def build_model(out: Path, size: str, tokenizer) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                         tie_word_embeddings=False, **SIZES[size])
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = None
    model.save_pretrained(out)
    return non_embedding_params(model)


def build_reward_model(model_dir: Path, out: Path, tokenizer) -> None:
    """The policy's weights with a seeded scalar head: the reward model and the critic."""
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(1)
    rm = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    rm.config.pad_token_id = tokenizer.pad_token_id
    rm.save_pretrained(out)
    tokenizer.save_pretrained(out)


def non_embedding_params(model) -> int:
    """N of the FLOP estimate: every parameter but the input embedding (the output projection
    is a matmul and counts)."""
    emb = model.get_input_embeddings().weight.numel()
    return sum(p.numel() for p in model.parameters()) - emb


def _exact(tokenizer, rng: random.Random, n_tokens: int, words: list[str]) -> str:
    """A text of exactly `n_tokens` tokens: words while they fit, then single digits."""
    text = ""
    while True:
        cand = text + rng.choice(words)
        if len(tokenizer(cand).input_ids) > n_tokens:
            break
        text = cand
    while len(tokenizer(text).input_ids) < n_tokens:
        text += rng.choice("0123456789")
    ids = tokenizer(text).input_ids
    if len(ids) != n_tokens:  # a digit merged with the previous one: retry from scratch
        return _exact(tokenizer, rng, n_tokens, words)
    return text


def build_data(out: Path, tokenizer) -> None:
    rng = random.Random(1)
    words = [f" {w}" for w in "what is the result so and plus minus times answer question"
             .split()] + [f" {rng.randint(0, 999)}" for _ in range(50)] + [" =", " +", " ?"]
    rows = []
    for i in range(N_RECORDS):
        prompt = _exact(tokenizer, rng, PROMPT_TOKENS, words)
        chosen = _exact(tokenizer, rng, COMPLETION_TOKENS, words)
        rejected = _exact(tokenizer, rng, COMPLETION_TOKENS, words)
        rows.append({"prompt": prompt, "completion": chosen, "chosen": chosen,
                     "rejected": rejected, "answer": str(i % 10)})
    with open(out / "records.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def build(root: Path) -> dict:
    """Write tokenizer, both model sizes (policy; the reward model and critic start from the
    same weights with a fresh scalar head) and the records under `root`; returns the N's."""
    root.mkdir(parents=True, exist_ok=True)
    info_file = root / "assets.json"
    if info_file.exists():
        return json.loads(info_file.read_text())
    tokenizer = build_tokenizer(root / "tokenizer")
    info = {"n_params": {}}
    for size in SIZES:
        model_dir = root / size
        n = build_model(model_dir, size, tokenizer)
        tokenizer.save_pretrained(model_dir)
        info["n_params"][size] = n
        build_reward_model(model_dir, root / f"{size}-rm", tokenizer)
    build_data(root, tokenizer)
    info_file.write_text(json.dumps(info, indent=1))
    return info


def records(root: Path, n: int) -> list[dict]:
    rows = [json.loads(line) for line in (root / "records.jsonl").read_text().splitlines()]
    return rows[:n]


def digit_reward(completions: list[str]) -> list[float]:
    """The GRPO/PPO reward both libraries use: the share of digits among characters."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def matmul_peak(dtype_name: str, seconds: float = 1.0, n: int = 1024) -> float:
    """This machine's best n x n matmul throughput in FLOP/s, measured now."""
    import time

    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t0))
    return best
