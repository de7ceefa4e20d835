"""Tiny models of real architectures with their own kind of tokenizer, built locally.

What a user brings is not the built-in tiny Llama with a character tokenizer: it is GPT-2 (a
byte-level BPE with no pad token and no chat template, dropout 0.1), Qwen2 (its own pad token
and a ChatML template that adds a newline after `<|im_end|>`), Mistral (no pad token, an
`[INST]` template) or OPT (dropout 0.1, BOS prepended). `make_arch_model` builds each of them
small enough for a CPU test, trains its BPE on a few lines of text with `tokenizers`, and saves
both with `save_pretrained`, so they are loaded back through the real `from_pretrained`.

Sizes keep head_dim = 64 (what vLLM's CPU attention supports).
"""

from __future__ import annotations

from pathlib import Path

ARCHS = ("gpt2", "qwen2", "mistral", "opt")

QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}"
    "{% elif m['role'] == 'system' %}{{ m['content'] }}\n\n{% endif %}{% endfor %}"
)

# The tokenizers' training text: the built-in tasks' alphabet and some English.
CORPUS = [
    "what is 3 + 4? 7. what is 12 - 5? 7. compute 6 * 7 = 42.",
    "The quick brown fox jumps over the lazy dog. A helpful answer is short and true.",
    "user: please answer the question. assistant: the answer is 9.",
    "0123456789 + - * = ? ! . , : ; ( ) # abcdefghijklmnopqrstuvwxyz",
    "Reward models score a response; the policy learns to write better ones.",
]


def _bpe(specials: list[str], vocab_size: int = 400):
    """A byte-level BPE (GPT-2's kind) trained on CORPUS, with `specials` first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    return tok


def build_arch_tokenizer(arch: str):
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    if arch == "gpt2":
        tok = _bpe(["<|endoftext|>"])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                       eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    if arch == "qwen2":
        tok = _bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>",
                                       eos_token="<|im_end|>",
                                       additional_special_tokens=["<|im_start|>", "<|im_end|>"])
        fast.chat_template = QWEN_TEMPLATE
        return fast
    if arch == "mistral":
        tok = _bpe(["<unk>", "<s>", "</s>"])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                       unk_token="<unk>")
        fast.chat_template = MISTRAL_TEMPLATE
        return fast
    if arch == "opt":
        tok = _bpe(["<s>", "<pad>", "</s>", "<unk>"])
        # OPT prepends </s> (its BOS) to every text
        tok.post_processor = processors.TemplateProcessing(single="</s> $A",
                                                           special_tokens=[("</s>", 2)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>",
                                       pad_token="<pad>", unk_token="<unk>")
    raise ValueError(f"unknown architecture {arch!r}; one of {', '.join(ARCHS)}")


def build_arch_model(arch: str, tokenizer, seed: int = 0, dropout: float | None = None):
    """A random-init causal LM of `arch` (2 layers, hidden 128, head_dim 64). `dropout`
    overrides the architecture's default (GPT-2 and OPT: 0.1; Qwen2 and Mistral: 0)."""
    import torch
    import transformers as tf

    v = len(tokenizer)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    if arch == "gpt2":
        p = 0.1 if dropout is None else dropout
        config = tf.GPT2Config(vocab_size=v, n_positions=256, n_embd=128, n_layer=2, n_head=2,
                               resid_pdrop=p, embd_pdrop=p, attn_pdrop=p, **ids)
        cls = tf.GPT2LMHeadModel
    elif arch == "qwen2":
        config = tf.Qwen2Config(vocab_size=v, hidden_size=128, intermediate_size=256,
                                num_hidden_layers=2, num_attention_heads=2,
                                num_key_value_heads=1, max_position_embeddings=256,
                                attention_dropout=dropout or 0.0, tie_word_embeddings=True,
                                **ids)
        cls = tf.Qwen2ForCausalLM
    elif arch == "mistral":
        config = tf.MistralConfig(vocab_size=v, hidden_size=128, intermediate_size=256,
                                  num_hidden_layers=2, num_attention_heads=2,
                                  num_key_value_heads=1, max_position_embeddings=256,
                                  attention_dropout=dropout or 0.0, sliding_window=None, **ids)
        cls = tf.MistralForCausalLM
    elif arch == "opt":
        p = 0.1 if dropout is None else dropout
        config = tf.OPTConfig(vocab_size=v, hidden_size=128, ffn_dim=256, num_hidden_layers=2,
                              num_attention_heads=2, max_position_embeddings=256,
                              word_embed_proj_dim=128, dropout=p, attention_dropout=p, **ids)
        cls = tf.OPTForCausalLM
    else:
        raise ValueError(f"unknown architecture {arch!r}; one of {', '.join(ARCHS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def make_arch_model(arch: str, out_dir: str | Path, seed: int = 0,
                    dropout: float | None = None) -> Path:
    """Build `arch`'s tokenizer and model and `save_pretrained` both into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_arch_tokenizer(arch)
    build_arch_model(arch, tokenizer, seed, dropout).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
