"""Load policy, frozen reference, reward model and critic from a path or hub id.

Weights are loaded by `transformers` (safetensors when the checkpoint has them) and
`trust_remote_code` stays off unless the user asks for it.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from posttrain.errors import ConfigError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


@dataclass(frozen=True)
class LoraSpec:
    """LoRA adapters through `peft`. `target_modules=None` lets peft pick for the model type."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | None = field(default=None)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ConfigError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}") from None


@contextlib.contextmanager
def _explain_load_errors(path: str | Path, what: str):
    try:
        yield
    except OSError as err:
        hint = (" (no such directory; give a local model directory or a hub id)"
                if str(path).startswith((".", "/")) and not Path(path).exists() else "")
        raise ConfigError(f"cannot load the {what} from {str(path)!r}{hint}: {err}") from None


def load_tokenizer(path: str | Path, trust_remote_code: bool = False,
                   padding_side: str = "right"):
    """The tokenizer, with a pad token (EOS is used, with a warning, when it has none)."""
    from transformers import AutoTokenizer

    with _explain_load_errors(path, "tokenizer"):
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ConfigError(f"the tokenizer at {path} has neither a pad nor an EOS token")
        log.warning("tokenizer at %s has no pad token; using EOS %r", path, tok.eos_token)
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def load_causal_lm(path: str | Path, dtype: str | torch.dtype = "float32",
                   device: str | torch.device = "cpu", trust_remote_code: bool = False,
                   lora: LoraSpec | None = None) -> nn.Module:
    """A causal LM to train, optionally with fresh LoRA adapters."""
    from transformers import AutoModelForCausalLM

    with _explain_load_errors(path, "policy model"):
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code
        )
    if lora is not None:
        model = apply_lora(model, lora, task_type="CAUSAL_LM")
    return model.to(device)


def apply_lora(model: nn.Module, spec: LoraSpec, task_type: str) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        target_modules=spec.target_modules, task_type=task_type)
    return get_peft_model(model, config)


def enable_gradient_checkpointing(model: nn.Module) -> nn.Module:
    """Turn on `transformers`' gradient checkpointing: each decoder layer keeps only its
    input and recomputes the rest in the backward (in training mode only, so generation and
    no-grad scoring are untouched). Non-reentrant, so LoRA needs no input gradients."""
    # a peft model answers these attributes from the model it wraps
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"run.gradient_checkpointing: {type(model).__name__} does not "
                          "support gradient checkpointing; set run.gradient_checkpointing "
                          "to false")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients: for the reference and a reward model during RL."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_reference(path: str | Path, dtype: str | torch.dtype = "float32",
                   device: str | torch.device = "cpu",
                   trust_remote_code: bool = False) -> nn.Module:
    """A frozen copy of the SFT model, π_ref."""
    return freeze(load_causal_lm(path, dtype, device, trust_remote_code))


class AdapterDisabledReference(nn.Module):
    """π_ref of a LoRA policy: the policy itself with its adapters switched off, so the base
    weights are not held twice in memory."""

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        if not hasattr(policy, "disable_adapter"):
            raise ConfigError("an adapter-disabled reference needs a peft (LoRA) policy")
        self._policy = [policy]  # a list, so the policy's parameters are not registered twice

    def forward(self, *args, **kwargs):
        policy = self._policy[0]
        with torch.no_grad(), policy.disable_adapter():
            return policy(*args, **kwargs)


def load_reward_model(path: str | Path, dtype: str | torch.dtype = "float32",
                      device: str | torch.device = "cpu", trust_remote_code: bool = False,
                      lora: LoraSpec | None = None) -> nn.Module:
    """`AutoModelForSequenceClassification` with one label: a backbone and a scalar head.

    Loading a causal-LM checkpoint here gives its backbone with a fresh head (to train a
    reward model from the SFT model). Scores are read at the last real token
    (`posttrain.models.forward.sequence_scores`), whatever the padding side.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    with _explain_load_errors(path, "reward model"):
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        labels = getattr(config, "num_labels", 1)
        is_classifier = any("SequenceClassification" in a for a in config.architectures or [])
        if is_classifier and labels != 1:
            raise ConfigError(
                f"the reward model at {path} has {labels} labels; a reward model has one"
            )
        model = AutoModelForSequenceClassification.from_pretrained(
            str(path), num_labels=1, dtype=resolve_dtype(dtype),
            trust_remote_code=trust_remote_code,
        )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    if lora is not None:
        model = apply_lora(model, lora, task_type="SEQ_CLS")
    return model.to(device)


def load_critic(path: str | Path, init: str = "reward_model",
                dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu",
                trust_remote_code: bool = False) -> nn.Module:
    """The value model V(s_t): a backbone and a scalar head, read at every token.

    `init="reward_model"`: `path` is a reward model; its head becomes the value head
    (InstructGPT). `init="policy"`: `path` is the policy/SFT model; its backbone gets a
    zero-initialised head, so every value starts at 0.
    """
    if init not in ("reward_model", "policy"):
        raise ConfigError(f"critic init {init!r} is not one of reward_model, policy")
    model = load_reward_model(path, dtype, device, trust_remote_code)
    if init == "policy":
        with torch.no_grad():
            value_head(model).weight.zero_()
            bias = getattr(value_head(model), "bias", None)
            if bias is not None:
                bias.zero_()
    return model


def value_head(model: nn.Module) -> nn.Linear:
    """The scalar head of a sequence-classification model (`score` in most architectures)."""
    for name in ("score", "classifier", "v_head"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Linear):
            return head
    raise ConfigError(f"cannot find the scalar head of {type(model).__name__}")


def backbone(model: nn.Module) -> nn.Module:
    """The transformer under a task head (`model.model` for Llama)."""
    prefix = getattr(model, "base_model_prefix", "model")
    inner = getattr(model, prefix, None)
    if inner is None:
        raise ConfigError(f"cannot find the backbone ({prefix!r}) of {type(model).__name__}")
    return inner


def save_model(model: nn.Module, out_dir: str | Path, tokenizer=None,
               merge_lora: bool = True) -> Path:
    """Save in the Hugging Face format (safetensors). A LoRA model is merged into its base
    first (when `merge_lora`), so the directory loads with plain `from_pretrained`; its
    adapters are saved beside it in `adapter/`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "merge_and_unload"):
        model.save_pretrained(out / "adapter")
        if merge_lora:
            import copy

            copy.deepcopy(model).merge_and_unload().save_pretrained(out)
    else:
        model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
