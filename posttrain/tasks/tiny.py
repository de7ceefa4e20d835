"""The tiny-model factory: a random-init Llama-style causal LM and a character tokenizer,
saved in the Hugging Face format so that `AutoModelForCausalLM.from_pretrained(dir)` and
`AutoTokenizer.from_pretrained(dir)` load them offline.

Nothing here is a toy of our own: the tokenizer is a `tokenizers` WordLevel model over single
characters wrapped in `PreTrainedTokenizerFast`, the model is `transformers`' LlamaForCausalLM.
"""

from __future__ import annotations

import string
from dataclasses import asdict, dataclass
from pathlib import Path

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
DEFAULT_CHARSET = string.digits + string.ascii_lowercase + " +-*=#;,.:?!()"

# Roles become one token each; the assistant's turn ends with EOS, which is what generation
# stops on. `add_generation_prompt` opens the assistant turn. A tool's result is a user turn
# that starts with "=" (the vocabulary has no tool role: the tasks' models stay as they were).
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}{{ eos_token }}"
    "{% elif m['role'] == 'tool' %}<|user|>={{ m['content'] }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass(frozen=True)
class TinyModelSpec:
    """Size of the tiny Llama. The default has about 0.27 M parameters and two attention
    heads of dimension 32: vLLM's CPU attention serves head_dim 32, 64, 80, ... but not 16,
    which four heads over this hidden size gave (measured: two heads of 32 reach 0.84 exact
    match on arithmetic after the task's SFT, one head of 64 only 0.13)."""

    hidden_size: int = 64
    intermediate_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 2
    head_dim: int = 32
    max_position_embeddings: int = 256
    tie_word_embeddings: bool = True


def build_char_tokenizer(charset: str = DEFAULT_CHARSET):
    """A character-level `PreTrainedTokenizerFast` with pad/eos/bos/unk, role tokens and a
    chat template. Every character of `charset` is one token; others map to <unk>."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list(dict.fromkeys(charset))  # keep order, drop repeats
    specials = [PAD, EOS, BOS, UNK, *ROLE_TOKENS]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        bos_token=BOS,
        unk_token=UNK,
        additional_special_tokens=list(ROLE_TOKENS),
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_causal_lm(tokenizer, spec: TinyModelSpec | None = None, seed: int = 0):
    """A random-init LlamaForCausalLM sized by `spec`, for `tokenizer`'s vocabulary."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = spec or TinyModelSpec()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        num_key_value_heads=spec.num_attention_heads,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **asdict(spec),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def make_tiny_model(
    out_dir: str | Path,
    seed: int = 0,
    spec: TinyModelSpec | None = None,
    charset: str = DEFAULT_CHARSET,
) -> Path:
    """Build the tokenizer and model and `save_pretrained` both into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_char_tokenizer(charset)
    model = build_tiny_causal_lm(tokenizer, spec, seed)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
