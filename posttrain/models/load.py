"""Load policy, frozen reference, reward model and critic from a path or hub id.

Weights are loaded by `transformers`, from safetensors only: a checkpoint with nothing but
pickle weights (`pytorch_model.bin`) is refused, since unpickling a file can run code.
`trust_remote_code` stays off unless the user asks for it. A directory that cannot be loaded
(no tokenizer, damaged or pickle-only weights) is a one-line `ConfigError` naming it and
saying what to do.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from posttrain.errors import ConfigError, PosttrainError

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


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "vocab.txt", "spiece.model", "sentencepiece.bpe.model", "tekken.json")
SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def _one_line(err: BaseException) -> str:
    """An exception's message on one line (transformers' span several)."""
    return " ".join(str(err).split()) or type(err).__name__


@contextlib.contextmanager
def _explain_load_errors(path: str | Path, what: str, auto_class: str = "AutoModelForCausalLM"):
    from safetensors import SafetensorError

    try:
        yield
    except PosttrainError:
        raise
    except SafetensorError as err:  # a header check passed, the tensors did not
        raise ConfigError(_damaged(path, what, "its .safetensors weights", err)) from None
    except (OSError, ValueError) as err:
        if "use_safetensors" in str(err):  # a hub repository without safetensors weights
            raise ConfigError(_pickle_only(path, what, None, auto_class)) from None
        hint = (" (no such directory; give a local model directory or a hub id)"
                if str(path).startswith((".", "/")) and not Path(path).exists() else "")
        raise ConfigError(f"cannot load the {what} from {str(path)!r}{hint}: "
                          f"{_one_line(err)}") from None


def _damaged(path: str | Path, what: str, part: str, err: BaseException) -> str:
    return (f"cannot load the {what} from {str(path)!r}: {part} cannot be read "
            f"({type(err).__name__}: {_one_line(err)}), so the file is damaged or incomplete; "
            "download or save the model there again")


def _pickle_only(path: str | Path, what: str, files: list[str] | None, auto_class: str
                 ) -> str:
    """What to do about pickle weights: those of a local directory (`files`) or, `files` None,
    of a hub repository without safetensors weights."""
    found = (f"it has pickle weights only ({', '.join(files)}), which posttrain refuses to "
             "load (unpickling a file can run code)" if files else "the repository has no "
             "safetensors weights (model.safetensors), and posttrain refuses pickle weights "
             "(pytorch_model.bin), since unpickling a file can run code")
    out = repr(str(path)) if files else "'LOCAL_DIR'"
    then = "" if files else ", then give LOCAL_DIR as the model path"
    return (f"cannot load the {what} from {str(path)!r}: {found}; if you trust the file, "
            "convert it once in Python with "
            f"`{auto_class}.from_pretrained({str(path)!r}).save_pretrained({out})` "
            "(transformers reads the pickle with torch.load(weights_only=True) and writes "
            f"model.safetensors){then}")


def check_weights(path: str | Path, what: str, auto_class: str = "AutoModelForCausalLM"
                  ) -> None:
    """Refuse a local model directory whose weights posttrain will not load: pickle weights
    only (`pytorch_model.bin`), or a safetensors file whose header does not read (a damaged
    or truncated file; transformers would fail deep in its loader). A hub id is left to
    transformers, which is told to load safetensors only."""
    from safetensors import SafetensorError, safe_open

    local = Path(path)
    if not local.is_dir():
        return
    if not any((local / name).is_file() for name in SAFE_WEIGHTS):
        pickled = sorted(p.name for p in local.glob("pytorch_model*.bin*"))
        if pickled:
            raise ConfigError(_pickle_only(path, what, pickled, auto_class))
        return  # no weights at all: transformers' own message says which file it wanted
    files = [local / SAFE_WEIGHTS[0]]
    if not files[0].is_file():
        index = local / SAFE_WEIGHTS[1]
        try:
            shards = json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise ConfigError(_damaged(path, what, index.name, err)) from None
        files = [local / name for name in sorted(set(shards))]
    for file in files:
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as err:
            raise ConfigError(_damaged(path, what, file.name, err)) from None


def _has_tokenizer_files(directory: Path) -> bool:
    return any((directory / name).exists() for name in TOKENIZER_FILES)


def check_tokenizer_files(path: str | Path) -> None:
    """Refuse a local directory without tokenizer files (transformers would build an empty
    tokenizer from config.json there, or fail deep in its loader)."""
    if Path(path).is_dir() and not _has_tokenizer_files(Path(path)):
        raise ConfigError(
            f"cannot load the tokenizer from {str(path)!r}: the directory has no tokenizer "
            f"files ({', '.join(TOKENIZER_FILES[:2])}, ...); save the model's tokenizer there "
            f"with tokenizer.save_pretrained({str(path)!r}), or give a directory or hub id "
            "that has one (model.tokenizer in a training config)")


def load_model_config(path: str | Path, what: str = "model",
                      trust_remote_code: bool = False):
    """The `config.json` of a model directory or hub id (`AutoConfig`)."""
    from transformers import AutoConfig

    with _explain_load_errors(path, f"{what} config"):
        return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)


def load_tokenizer(path: str | Path, trust_remote_code: bool = False,
                   padding_side: str = "right"):
    """The tokenizer, with a pad token (EOS is used, with a warning, when it has none)."""
    from transformers import AutoTokenizer

    check_tokenizer_files(path)
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

    check_weights(path, "policy model")
    with _explain_load_errors(path, "policy model"):
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code,
            use_safetensors=True,
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

    auto_class = "AutoModelForSequenceClassification"
    check_weights(path, "reward model", auto_class)
    with _explain_load_errors(path, "reward model", auto_class):
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        labels = getattr(config, "num_labels", 1)
        is_classifier = any("SequenceClassification" in a for a in config.architectures or [])
        if is_classifier and labels != 1:
            raise ConfigError(
                f"the reward model at {path} has {labels} labels; a reward model has one"
            )
        model = AutoModelForSequenceClassification.from_pretrained(
            str(path), num_labels=1, dtype=resolve_dtype(dtype),
            trust_remote_code=trust_remote_code, use_safetensors=True,
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


POSITION_ATTRIBUTES = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length",
                       "max_sequence_length")
"""Where model configs state the longest sequence the model takes (GPT-2's `n_positions`,
MPT's `max_seq_len`, ChatGLM's `seq_length`; most say `max_position_embeddings`)."""

TOKENIZER_LENGTH_CEILING = 100_000_000
"""A tokenizer's `model_max_length` above this is transformers' "no limit" stand-in
(`int(1e30)` when the tokenizer files name none), not a length."""


def max_positions(model, tokenizer=None) -> int | None:
    """The longest sequence `model` (a model, peft-wrapped or not, or its config) takes: its
    config's maximum positions (the text part's, for a composite config); else the tokenizer's
    `model_max_length` when that is a real length; None when neither says."""
    model = unwrap_peft(model)
    config = getattr(model, "config", model)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    for name in POSITION_ATTRIBUTES:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value <= TOKENIZER_LENGTH_CEILING:
        return value
    return None


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
    if local.is_dir() and not _has_tokenizer_files(local):
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
