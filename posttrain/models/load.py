"""Load policy, frozen reference, reward model and critic from a path or hub id.

Weights are loaded by `transformers` (safetensors when the checkpoint has them) and
`trust_remote_code` stays off unless the user asks for it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

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
    """Fresh LoRA adapters through peft. GPT-2-style models store their projections as
    `Conv1D` (weights transposed), which peft must be told (`fan_in_fan_out`)."""
    import warnings

    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    conv1d = any(isinstance(m, Conv1D) for m in model.modules())
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        target_modules=spec.target_modules, task_type=task_type,
                        fan_in_fan_out=conv1d)
    with warnings.catch_warnings():
        # peft reads transformers' deprecated `is_gradient_checkpointing` when it wraps a
        # model (peft 0.21); nothing of ours uses it, and every LoRA run would print it
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                                category=FutureWarning)
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
    reward model from the SFT model). Scores are read where `transformers` reads them, at the
    last real token that is not `config.pad_token_id` (set to the EOS when the config has
    none), whatever the padding side (`posttrain.models.forward.sequence_scores`). A reward
    model posttrain trained and saved scores the same in plain `transformers`, except on
    RMSNorm architectures (Llama, Qwen2, Mistral), where the normalisation offset could not be
    folded into a bias and stays as config.json's `reward_offset`, which posttrain subtracts.
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
            head_linear(model).weight.zero_()
            bias = getattr(head_linear(model), "bias", None)
            if bias is not None:
                bias.zero_()
    return model


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (LoRA layers stay injected in it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "vocab.txt", "spiece.model")


def check_same_tokenizer(tokenizer, path: str | Path, what: str,
                         trust_remote_code: bool = False) -> None:
    """A model that reads the policy's token ids (a critic) must share its vocabulary:
    refuse one whose embedding is smaller than the policy's tokenizer, or whose directory has
    a tokenizer with another vocabulary (`get_vocab()`). A local directory without tokenizer
    files is checked by size only (`transformers` would build an empty tokenizer there)."""
    from transformers import AutoConfig, AutoTokenizer

    policy = getattr(tokenizer, "name_or_path", "") or "?"
    with _explain_load_errors(path, what):
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    size = getattr(config, "vocab_size", None)
    if size is not None and size < len(tokenizer):
        raise ConfigError(f"the {what} at {path} has a vocabulary of {size} tokens but the "
                          f"policy's tokenizer at {policy} has {len(tokenizer)}: it must share "
                          "the policy's tokenizer (train it from the policy's SFT model)")
    local = Path(path)
    if local.is_dir() and not any((local / f).exists() for f in TOKENIZER_FILES):
        return
    try:
        other = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError):  # no tokenizer saved there: the size check is all we have
        return
    if other.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(f"the {what} at {path} has another tokenizer than the policy's at "
                          f"{policy} ({len(other)} vs {len(tokenizer)} tokens, different ids): "
                          "it reads the policy's token ids, so it must share the policy's "
                          "tokenizer (train it from the policy's SFT model)")


def value_head(model: nn.Module) -> nn.Module:
    """The scalar head of a sequence-classification model (`score` in most architectures).
    Under peft (LoRA on a reward model) it is peft's wrapper, which calls the trainable copy
    of the head; `head_linear` gives the `nn.Linear` that is called."""
    inner = unwrap_peft(model)
    for name in ("score", "classifier", "v_head"):
        head = getattr(inner, name, None)
        if isinstance(head, nn.Linear) or hasattr(head, "modules_to_save"):
            return head
    raise ConfigError(f"cannot find the scalar head of {type(model).__name__}")


def head_linear(model: nn.Module) -> nn.Linear:
    """The `nn.Linear` the scalar head runs (peft's active trainable copy under LoRA)."""
    head = value_head(model)
    if hasattr(head, "modules_to_save"):
        return head.modules_to_save[head.active_adapter]
    return head


def backbone(model: nn.Module) -> nn.Module:
    """The transformer under a task head (`model.model` for Llama), under peft too."""
    inner = unwrap_peft(model)
    prefix = getattr(inner, "base_model_prefix", "model")
    body = getattr(inner, prefix, None)
    if body is None:
        raise ConfigError(f"cannot find the backbone ({prefix!r}) of {type(model).__name__}")
    return body


def fold_score_offset(model: nn.Module, offset: float, probe: Callable[[], Tensor]
                      ) -> str | None:
    """Shift every score of a reward model by −offset in its weights, so that plain
    `transformers` scores as posttrain does: into the head's bias when it has one, else into
    the bias of the final LayerNorm, the last one to run before the head (GPT-2's `ln_f`,
    OPT's `decoder.final_layer_norm`): its output h enters the score as w·h, so adding
    δ = −offset·w/‖w‖² to its bias shifts every score by −offset.

    `probe()` returns the scores of a fixed batch; a shift is kept only when they all moved by
    −offset (to float32 rounding), else undone. Returns the parameter changed, or None: RMSNorm
    models (Llama, Qwen2, Mistral) have no bias to carry the offset, which then stays in
    config.json's `reward_offset` (posttrain subtracts it; plain transformers does not)."""
    head = head_linear(model)
    ran: list[tuple[str, nn.LayerNorm]] = []  # LayerNorms in the order the probe runs them
    hooks = [m.register_forward_hook(lambda mod, args, out, n=n: ran.append((n, mod)))
             for n, m in backbone(model).named_modules()
             if isinstance(m, nn.LayerNorm) and m.bias is not None]
    try:
        before = probe()
    finally:
        for h in hooks:
            h.remove()
    tol = 1e-4 * max(1.0, abs(offset), float(before.abs().max()))
    candidates = []
    if head.bias is not None:
        candidates.append(("head bias", head.bias, torch.full_like(head.bias, -offset)))
    if ran and head.weight.shape[0] == 1 and ran[-1][1].bias.shape == head.weight[0].shape:
        w = head.weight[0].detach()
        name, norm = ran[-1]
        candidates.append((f"{name}.bias", norm.bias, -offset * w / w.dot(w).clamp(min=1e-12)))
    for name, param, delta in candidates:
        with torch.no_grad():
            param.add_(delta.to(param.dtype))
        moved = probe() - before
        if bool(((moved + offset).abs() <= tol).all()):
            return name
        with torch.no_grad():
            param.sub_(delta.to(param.dtype))
    return None


def save_model(model: nn.Module, out_dir: str | Path, tokenizer=None,
               merge_lora: bool = True) -> Path:
    """Save in the Hugging Face format (safetensors). A LoRA model is merged into its base
    first (when `merge_lora`), so the directory loads with plain `from_pretrained`; its
    adapters are saved beside it in `adapter/`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "merge_and_unload"):
        config = model.peft_config[model.active_adapter]
        base = config.base_model_name_or_path
        if base and Path(base).exists():
            # an absolute path: the adapter loads (AutoPeftModel*) from any directory
            config.base_model_name_or_path = str(Path(base).resolve())
        model.save_pretrained(out / "adapter")
        if merge_lora:
            import copy

            copy.deepcopy(model).merge_and_unload().save_pretrained(out)
    else:
        model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
