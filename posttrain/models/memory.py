"""How much memory a training run needs, checked before the first step.

The estimate (bytes), for trained models with P parameters of which P_t are trained, frozen
models (reference, reward model) with P_f, and micro-batches of m tokens:

    weights      = bytes(dtype) · (P + P_f)
    gradients    = bytes(dtype) · P_t
    optimiser    = 8 · P_t                       (AdamW: two float32 moments)
    activations  = m · Σ_trained L · h · 34 · a/2   (Korthikanti et al. 2022, per token per
                   layer, a = bytes of the activation dtype; the s×s attention scores are
                   not counted: SDPA kernels do not keep them)
                   with gradient checkpointing: m · Σ (L · h · a + h · 34 · a/2), every
                   layer's input kept and one layer's activations rebuilt at a time
                 + m · V · a                     (the logits, kept for the backward)
                 + m · V · 4 · 2                 (one float32 log-softmax chunk and its grad,
                                                  at most, see algos.logprobs)

It is an estimate of the peak, not an accounting of the allocator: it errs on the high side
(no fused kernels), and it is used to refuse a configuration that
cannot fit and to say what would, never to size anything silently.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from posttrain.errors import ConfigError

GiB = 1024**3


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    gradients: int
    optimizer: int
    activations_per_token: float

    def total(self, micro_batch_tokens: int) -> int:
        return self.static + int(self.activations_per_token * micro_batch_tokens)

    @property
    def static(self) -> int:
        return self.weights + self.gradients + self.optimizer

    def max_tokens(self, available: int) -> int:
        """The largest micro-batch (tokens) that fits in `available` bytes (0: none)."""
        if available <= self.static:
            return 0
        return int((available - self.static) // self.activations_per_token)

    def describe(self, micro_batch_tokens: int) -> str:
        act = int(self.activations_per_token * micro_batch_tokens)
        return (f"{self.total(micro_batch_tokens) / GiB:.2f} GiB (weights "
                f"{self.weights / GiB:.2f}, gradients {self.gradients / GiB:.2f}, optimiser "
                f"{self.optimizer / GiB:.2f}, activations {act / GiB:.2f} for "
                f"{micro_batch_tokens} tokens)")


def _bytes(p: torch.Tensor) -> int:
    return p.numel() * p.element_size()


def activation_bytes_per_token(model: nn.Module, activation_bytes: int,
                               checkpointing: bool = False) -> float:
    """Activation bytes kept for the backward, per token of a micro-batch."""
    cfg = getattr(model, "config", None)
    layers = getattr(cfg, "num_hidden_layers", None)
    hidden = getattr(cfg, "hidden_size", None)
    if layers is None or hidden is None:  # not a transformers decoder: a generous bound
        return 34.0 * sum(p.numel() for p in model.parameters()) ** 0.5 * activation_bytes
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    vocab = getattr(cfg, "vocab_size", 0) if out is not None else 1
    per_layer = 34 * hidden * activation_bytes / 2
    layers_total = (layers * hidden * activation_bytes + per_layer if checkpointing
                    else layers * per_layer)
    return layers_total + vocab * activation_bytes + vocab * 4 * 2


def estimate(trained: list[nn.Module], frozen: list[nn.Module] = (),
             precision: str = "fp32", checkpointing: bool = False) -> MemoryEstimate:
    """The estimate for these models; `precision` is `run.precision` (bf16: activations of
    2 bytes; weights keep their own dtype), `checkpointing` `run.gradient_checkpointing`."""
    seen: set[int] = set()

    def params(models):
        for m in models:
            for p in m.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p

    train_params = list(params(trained))
    frozen_params = list(params(frozen))
    weights = sum(_bytes(p) for p in train_params + frozen_params)
    grads = sum(_bytes(p) for p in train_params if p.requires_grad)
    optim = sum(8 * p.numel() for p in train_params if p.requires_grad)
    act_bytes = 2 if precision == "bf16" else max(
        (p.element_size() for p in train_params), default=4)
    per_token = sum(activation_bytes_per_token(m, act_bytes, checkpointing) for m in trained)
    return MemoryEstimate(weights, grads, optim, per_token)


def available_memory(device: torch.device) -> int | None:
    """Free bytes on the device: CUDA's free memory, or the host's MemAvailable (Linux).
    None when it cannot be told."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_fits(est: MemoryEstimate, micro_batch_tokens: int, device: torch.device,
               available: int | None = None) -> None:
    """Raise `ConfigError` saying what fits when the run cannot. The models are loaded
    already, so their weights are counted as free-able back into the available memory."""
    if os.environ.get("POSTTRAIN_SKIP_MEMORY_CHECK"):
        return
    if available is None:
        available = available_memory(device)
        if available is None:
            return
        available += est.weights  # already resident: they are part of what we measured
    need = est.total(micro_batch_tokens)
    if need <= available:
        return
    fits = est.max_tokens(available)
    if fits == 0:
        raise ConfigError(
            f"the models alone need {est.static / GiB:.2f} GiB (weights, gradients, AdamW "
            f"state) but {available / GiB:.2f} GiB is free on {device}: train a LoRA adapter "
            f"(--model.lora_r 16), load bfloat16 weights (--model.dtype bfloat16), or shard "
            f"with torchrun and --run.parallel fsdp")
    raise ConfigError(
        f"run.micro_batch_tokens={micro_batch_tokens} needs about "
        f"{est.describe(micro_batch_tokens)} but {available / GiB:.2f} GiB is free on "
        f"{device}; at most {fits} tokens per micro-batch fit: set --run.micro_batch_tokens "
        f"{fits} (gradients are accumulated, so the update does not change), or set "
        f"POSTTRAIN_SKIP_MEMORY_CHECK=1 to try anyway")
