"""The loop every trainer shares.

It owns: the optimiser (AdamW) and the LR schedule with warm-up; the data order (a seeded
shuffle per epoch, so the data position is a pure function of the step); micro-batching by a
token budget with gradient accumulation whose result does not depend on the micro-batch size
(each micro-batch's loss is normalised by the whole step's counts); gradient clipping; the
non-finite check; evaluation every N steps; metrics to JSONL and the trackers of
`run.report_to` (TensorBoard, W&B, MLflow) and the progress display; atomic checkpoints, exact
resume and clean stops on SIGINT/SIGTERM or a callback's `request_stop`; the callbacks of
`trainer.callbacks` (`posttrain.callbacks`).

A trainer supplies the model(s) and four things: `item_length`, `step_totals`, `micro_loss`
and `evaluate`. The loop knows no algorithm: one step is `train_step()`, which by default draws
`run.batch_size` examples and makes one optimiser step of them through the accumulation
primitive (`trainers/accumulate.py`); a trainer whose step is something else (RL: rollout,
score, advantages, several optimiser steps) overrides `train_step` and calls the same
primitive. What a trainer checkpoints (`trained`, `extra_state`), memory-checks
(`memory_models`) and logs besides its metrics (`log_files`, `monitor_series`) are methods it
provides.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from posttrain import distributed
from posttrain.callbacks import Callback
from posttrain.checkpoint import (
    latest_checkpoint,
    load_rng,
    load_torch,
    rng_state,
    save_checkpoint,
    save_rng,
)
from posttrain.config import doc, save_config, to_dict
from posttrain.data.collate import micro_batches_by_tokens
from posttrain.data.loading import shuffled
from posttrain.errors import CheckpointError, ConfigError
from posttrain.models.load import enable_gradient_checkpointing
from posttrain.tracking.metrics import (
    MetricsLogger,
    Progress,
    read_metrics,
    truncate_jsonl,
)
from posttrain.tracking.monitors import MonitorLog
from posttrain.tracking.trackers import check_trackers, report_to_names
from posttrain.trainers.accumulate import Accumulator, Job, backward, to_floats

__all__ = ["Callback", "LoopConfig", "OptimConfig", "RunConfig", "TrainResult", "Trainer",
           "lr_lambda", "to_floats"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = doc("Peak learning rate of AdamW.", 1e-4)
    weight_decay: float = doc("AdamW weight decay.", 0.0)
    beta1: float = doc("AdamW β1.", 0.9)
    beta2: float = doc("AdamW β2.", 0.999)
    eps: float = doc("AdamW ε.", 1e-8)
    warmup_steps: int = doc("Linear warm-up from 0 to `lr` over this many optimiser steps.", 0)
    schedule: Literal["constant", "linear", "cosine"] = doc(
        "LR after warm-up: constant, linear decay to 0, or cosine decay to 0.", "constant")
    max_grad_norm: float | None = doc("Clip the global gradient norm to this (null: no clip).",
                                      1.0)

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass(frozen=True)
class LoopConfig:
    """The loop's settings that every trainer shares (RL counts its batch in prompts, so it has
    no `batch_size`: see `RunConfig`)."""

    output_dir: str = doc("Directory that holds runs.", "runs")
    name: str = doc("Run name; the run writes into output_dir/name.", "run")
    steps: int = doc("Optimiser steps to train.", 100)
    micro_batch_tokens: int = doc(
        "Padded tokens per micro-batch (rows x longest row); gradients are accumulated over "
        "micro-batches, and the result does not depend on this value.", 4096)
    eval_every: int = doc("Evaluate every N steps (0: only at the end).", 0)
    save_every: int = doc("Checkpoint every N steps (0: only at the end).", 0)
    keep_checkpoints: int = doc("Checkpoints to keep (the newest).", 2)
    log_every: int = doc("Log metrics every N steps.", 1)
    seed: int = doc("Random seed: data order, sampling and initialisation.", 0)
    device: str = doc("cpu, cuda, cuda:N or auto (cuda when available).", "auto")
    on_nonfinite: Literal["stop", "skip"] = doc(
        "When the loss or gradient is NaN/inf: stop the run, or skip the step.", "stop")
    report_to: list[str] | str = doc(
        "Where metrics go besides metrics.jsonl (always written, listed or not): any of "
        "jsonl, tensorboard, wandb, mlflow, as a list or comma-separated (`--run.report_to "
        "wandb,mlflow`). Every tracker gets the same metric names at the same steps, the "
        "config once at the start and (RL) the sample responses as a table; a resumed run "
        "continues its W&B and MLflow runs. wandb and mlflow are optional packages: pip "
        "install 'posttrain[wandb]' / 'posttrain[mlflow]'.",
        default_factory=lambda: ["jsonl", "tensorboard"])
    tensorboard: bool = doc("Older switch of TensorBoard, kept for existing configs: false "
                            "drops tensorboard from report_to; true leaves report_to as it is.",
                            True)
    progress: Literal["auto", "rich", "plain", "none"] = doc(
        "Progress display: a bar on a terminal (auto), plain lines, or nothing.", "auto")
    resume: bool = doc("Continue from the newest complete checkpoint of this run.", False)
    overwrite: bool = doc("Replace a finished or checkpointed run of the same name (its "
                          "directory is deleted first); without it such a run is refused.",
                          False)
    padding_free: bool = doc(
        "Pack each micro-batch's sequences into one row (position ids restart per sequence, "
        "no attention mask): no compute on padding, and micro_batch_tokens counts real "
        "tokens. Needs a model whose transformers code supports packed position ids "
        "(Llama, Qwen, Mistral, Gemma, ...).", False)
    gradient_checkpointing: bool = doc(
        "Recompute each decoder layer's activations in the backward instead of keeping them "
        "(transformers' gradient checkpointing of the trained models): far less activation "
        "memory for about one more forward pass of compute.", False)
    precision: Literal["fp32", "bf16"] = doc(
        "fp32, or bf16 mixed precision: forward passes under bfloat16 autocast; weights, "
        "gradients, optimiser state and log-softmax stay float32.", "fp32")
    parallel: Literal["ddp", "fsdp", "none"] = doc(
        "Under torchrun: replicate the trained models (ddp) or shard them (fsdp, FSDP2's "
        "fully_shard). Batch sizes stay global; each rank takes its share.", "ddp")

    def __post_init__(self) -> None:
        for name in ("steps", "micro_batch_tokens", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"run.{name} must be >= 1, got {getattr(self, name)}")
        # a list of known names, whatever form it was given in (frozen: set once, here)
        object.__setattr__(self, "report_to", report_to_names(self.report_to))

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    @property
    def trackers(self) -> list[str]:
        """The trackers this run writes to: jsonl first, then report_to's others (without
        tensorboard when `tensorboard` is false)."""
        return ["jsonl", *(n for n in self.report_to if n != "jsonl"
                           and (n != "tensorboard" or self.tensorboard))]


@dataclass(frozen=True)
class RunConfig(LoopConfig):
    """The loop of the trainers that take a fixed number of examples per optimiser step."""

    batch_size: int = doc("Examples per optimiser step (global, over all micro-batches).", 8)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_size < 1:
            raise ConfigError(f"run.batch_size must be >= 1, got {self.batch_size}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def bf16_slowdown(model: nn.Module, tokens: int = 128, repeats: int = 3) -> float:
    """How many times longer a forward and backward pass of `model` (batch 1, `tokens`
    tokens, on the CPU) takes under bfloat16 autocast than in float32, measured now, best of
    `repeats` (gradients are computed and dropped). CPUs
    without native bf16 matrix units emulate it, and small models pay autocast's casts on
    every op, so bf16 may save memory there but cost time."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 2
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
    device = next(model.parameters()).device

    params = [p for p in model.parameters() if p.requires_grad]

    def best(bf16: bool) -> float:
        times = []
        for i in range(repeats + 1):  # the first is a warm-up
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = model(input_ids=ids.to(device))
            logits = out.logits if hasattr(out, "logits") else out[0]
            grads = torch.autograd.grad(logits.float().mean(), params, allow_unused=True)
            del grads  # measured only: nothing reaches .grad
            if i:
                times.append(time.perf_counter() - t0)
        return min(times)

    was_training = model.training
    model.eval()  # no dropout: no random numbers drawn
    try:
        return best(True) / max(best(False), 1e-9)
    finally:
        model.train(was_training)


def lr_lambda(optim: OptimConfig, total_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if optim.warmup_steps and step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        if optim.schedule == "constant":
            return 1.0
        span = max(1, total_steps - optim.warmup_steps)
        progress = min(1.0, (step - optim.warmup_steps) / span)
        if optim.schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


@dataclass
class TrainResult:
    run_dir: Path
    steps_done: int
    status: Literal["finished", "interrupted"]
    final_dir: Path | None = None
    eval_metrics: dict[str, float] = field(default_factory=dict)
    skipped_steps: int = 0
    seconds: float = 0.0
    stop_reason: str | None = None
    """Why an interrupted run stopped: the signal (SIGINT, SIGTERM) or a callback's reason."""


KEPT_ON_OVERWRITE = ("data", "start_model", "start_tokenizer")
"""What `run.overwrite` leaves in a run directory: the records, model and tokenizer a Python
API call (`posttrain.api`) wrote there for this run to read."""


class _StopRequest:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint and stops after the current step.
    A second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        print(f"\n{self.requested} received: finishing this step, saving a checkpoint, "
              "stopping (press Ctrl-C again to stop at once)", flush=True)

    def __enter__(self) -> _StopRequest:
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._old.clear()
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def load_weights(model: nn.Module, directory: Path) -> None:
    """Load weights saved by `save_pretrained` (full model or peft adapters) into `model`;
    under FSDP2 the full tensors are scattered into the model's shards."""
    from safetensors.torch import load_file

    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(directory / "adapter_model.safetensors")))
        return
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory} holds no .safetensors weights")
    state: dict[str, Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    if any(hasattr(p, "full_tensor") for p in model.parameters()):  # FSDP2 shards
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True,
                                                                    strict=False))
        return
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if isinstance(getattr(model, "_tied_weights_keys", None), dict):
        tied = set(model._tied_weights_keys)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise CheckpointError(f"{directory}: weights do not match the model (missing "
                              f"{missing[:3]}, unexpected {unexpected[:3]})")


class Trainer:
    """The shared loop. Subclasses set `self.model`, `self.tokenizer`, `self.train_items` and
    implement the four methods below; `self.extra_models` lists other trained modules."""

    kind = "train"

    def __init__(self, config: Any, run: LoopConfig, optim: OptimConfig) -> None:
        model = getattr(config, "model", None)
        if hasattr(model, "check_paths"):
            model.check_paths()
        self.config = config
        self.run = run
        self.optim_cfg = optim
        self.dist = distributed.init(run.device)
        self.device = distributed.device_for(self.dist, run.device)
        self.fwd: nn.Module | None = None  # the trained model as forward passes see it
        self.run_dir = run.run_dir
        self.step = 0
        self.accumulators: dict[str, Accumulator] = {}  # by trained model, built with the optimiser
        # Callback objects, or plain functions (trainer, step, metrics) run as on_step_end
        self.callbacks: list[Callback | Callable[[Trainer, int, dict[str, float]], Any]] = []
        self._stop_reason: str | None = None
        self._logger: _Logger | None = None
        self.history: list[dict[str, float]] = []  # logged metric rows, for the monitors
        self._progress: Progress | None = None
        self._order_cache: dict[int, list[int]] = {}
        torch.manual_seed(run.seed)
        check_trackers(run.trackers)  # a missing wandb or mlflow package: now, not at step 1
        batch = getattr(run, "batch_size", None)
        if self.dist.enabled and batch is not None and batch < self.dist.world_size:
            raise ConfigError(f"run.batch_size ({batch}) is global and must be at least the "
                              f"number of processes ({self.dist.world_size})")

    # ------------------------------------------------------------------ to implement
    train_items: Sequence[Any]
    model: nn.Module
    tokenizer: Any

    def item_length(self, item: Any) -> int:
        raise NotImplementedError

    def step_totals(self, items: Sequence[Any]) -> dict[str, int]:
        """Counts over the whole step that micro-batch losses are normalised by."""
        raise NotImplementedError

    def micro_loss(self, items: Sequence[Any], totals: dict[str, int]
                   ) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of a micro-batch, already divided by the step's totals, so that the
        micro-batch losses (and metrics) add up to the step's."""
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        return {}

    progress_keys: tuple[str, ...] = ("train/loss", "eval/loss", "perf/tokens_per_second")

    def step_tokens(self, items: Sequence[Any]) -> int:
        """Tokens the step processed (for tokens/s)."""
        return sum(self.item_length(it) for it in items)

    def trained(self) -> dict[str, tuple[nn.Module, Any, Any]]:
        """Every trained model with its optimiser and scheduler, by checkpoint sub-directory."""
        return {"model": (self.model, self.optimizer, self.scheduler)}

    def save_final(self, directory: Path, states: dict[str, Any]) -> None:
        """The final policy in the Hugging Face format, with its tokenizer (rank 0)."""
        from posttrain.models.load import save_model

        if self.sharded:
            self.model.save_pretrained(directory, state_dict=states["model"])
            self.tokenizer.save_pretrained(directory)
        else:
            save_model(self.model, directory, self.tokenizer)

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def evaluate_on_main(self) -> dict[str, float]:
        """`evaluate()` on rank 0 while the others wait (every rank under FSDP2, whose
        forward passes need all the shards; rank 0's numbers are kept)."""
        if not self.dist.enabled:
            with self.autocast():
                return self.evaluate()
        with self.autocast():
            out = self.evaluate() if self.dist.is_main or self.sharded else {}
        self.dist.barrier()
        return out if self.dist.is_main else {}

    def _stop_everywhere(self, requested: str | None) -> bool:
        """A signal seen by any rank stops every rank after the same step."""
        if not self.dist.enabled:
            return requested is not None
        flag = torch.tensor([1.0 if requested else 0.0], device=self.device)
        return bool(self.dist.all_reduce_sum(flag).item() > 0)

    def check_memory(self) -> None:
        """Refuse, before the first step, a micro-batch budget the device cannot hold, and
        say what fits (posttrain.models.memory). Sharded runs are not checked."""
        if self.sharded:
            return
        from posttrain.models import memory

        trained, frozen = self.memory_models()
        est = memory.estimate(trained, frozen, self.run.precision,
                              self.run.gradient_checkpointing)
        memory.check_fits(est, self.run.micro_batch_tokens, self.device)

    keeps_dropout = False
    """Whether the trained models keep their dropout when `model.dropout` is null."""

    def switch_dropout(self) -> None:
        """Dropout off in every trained model unless `model.dropout` (or, when it is null,
        the trainer's `keeps_dropout`) says to keep it (posttrain.models.dropout)."""
        from posttrain.models.dropout import disable_dropout

        keep = getattr(getattr(self.config, "model", None), "dropout", None)
        if keep if keep is not None else self.keeps_dropout:
            return
        for model in self.memory_models()[0]:
            disable_dropout(model)

    def memory_models(self) -> tuple[list[nn.Module], list[nn.Module]]:
        """(trained, frozen) models the device holds, for the memory check."""
        frozen = getattr(self, "reference", None)
        return [self.model], [frozen] if isinstance(frozen, nn.Module) else []

    def log_files(self) -> tuple[str, ...]:
        """The run's JSONL logs, cut back to the checkpoint's step on resume."""
        return ("metrics.jsonl", "samples.jsonl", "alerts.jsonl")

    def load_logs(self) -> None:
        """Read back what the logs hold (after a resume) for the monitors."""
        self.history = read_metrics(self.run_dir)

    def monitor_series(self) -> dict[str, Any]:
        """Series the monitors read besides the metric rows (RL: advantage by position)."""
        return {}

    @property
    def skipped_steps(self) -> int:
        """Optimiser steps dropped for a non-finite loss or gradient, over every model."""
        return sum(acc.skipped for acc in self.accumulators.values())

    def accumulator(self, name: str, optimizer: torch.optim.Optimizer, module: nn.Module,
                    join: Job | None = None, prefix: str = "train/") -> Accumulator:
        """The accumulation primitive for one trained model, with this run's settings."""
        acc = Accumulator(name, optimizer, module, self.dist, self.autocast,
                          self.optim_cfg.max_grad_norm, self.run.on_nonfinite, join, prefix,
                          hint=self._checkpoint_hint)
        self.accumulators[name] = acc
        return acc

    def _checkpoint_hint(self) -> str:
        last = latest_checkpoint(self.run_dir / "checkpoints")
        return f"Last good checkpoint: {last or 'none'}. "

    def autocast(self) -> torch.autocast:
        """The forward-pass context of `run.precision` (backward passes run outside it)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16,
                              enabled=self.run.precision == "bf16")

    def phase(self, name: str) -> None:
        """Name the running phase on the progress bar."""
        if self._progress is not None:
            self._progress.phase(name)

    def write_report(self) -> Path | None:
        """report.html for the run; a plotting failure is reported, never fatal."""
        from posttrain.tracking.report import write_report

        try:
            return write_report(self.run_dir)
        except Exception as err:  # a broken plot must not lose a finished run
            log.warning("could not write the report of %s: %s", self.run_dir, err)
            return None

    # ------------------------------------------------------------------ the loop
    def parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def build_optimizer(self) -> None:
        if self.run.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        self.prepare_parallel()
        self.optimizer = self.adamw(self.parameters())
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(self.optim_cfg, self.run.steps))
        self.accumulator("model", self.optimizer, self.fwd or self.model)

    def adamw(self, params: list[nn.Parameter], lr: float | None = None
              ) -> torch.optim.AdamW:
        """AdamW of `optim`, with torch's fused kernel (one kernel over all parameters, CPU
        and CUDA) where every parameter is a plain tensor on such a device; FSDP2's sharded
        parameters keep the default implementation."""
        o = self.optim_cfg
        fused = not self.sharded and all(
            p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
        return torch.optim.AdamW(params, lr=lr or o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                 weight_decay=o.weight_decay, fused=fused or None)

    def batch_for_step(self, step: int) -> list[Any]:
        """The examples of optimiser step `step`: consecutive slices of per-epoch shuffles."""
        n = len(self.train_items)
        if n == 0:
            raise ConfigError("the training set is empty")
        out = []
        for i in range(step * self.run.batch_size, (step + 1) * self.run.batch_size):
            epoch, pos = divmod(i, n)
            if epoch not in self._order_cache:
                self._order_cache = {epoch: shuffled(range(n), self.run.seed + epoch)}
            out.append(self.train_items[self._order_cache[epoch][pos]])
        return out

    def micro_batches(self, items: Sequence[Any], budget: int | None = None) -> list[list[Any]]:
        """`items` grouped by the token budget (default: run.micro_batch_tokens)."""
        lengths = [self.item_length(it) for it in items]
        budget = budget or self.run.micro_batch_tokens
        return [[items[i] for i in idx]
                for idx in micro_batches_by_tokens(lengths, budget,
                                                   packed=self.run.padding_free)]

    def prepare_parallel(self) -> None:
        """Wrap the trained model for data parallelism (DDP or FSDP2) under torchrun; training
        forward passes go through `self.fwd`, everything else uses `self.model`."""
        if self.fwd is None:
            self.fwd = distributed.wrap(self.model, self.dist, self.run.parallel)

    def before_final(self) -> None:
        """Runs on every rank before the final checkpoint and model are written."""

    @property
    def sharded(self) -> bool:
        """FSDP2: every rank holds a shard, so every rank joins every forward pass."""
        return self.dist.enabled and self.run.parallel == "fsdp"

    def jobs(self, items: Sequence[Any]) -> list[Job]:
        """This rank's micro-batch jobs of a step. `step_totals` sees the whole global batch,
        so every micro-batch loss is normalised by global counts and the ranks' gradients sum
        to the full batch's gradient."""
        totals = self.step_totals(items)
        return [functools.partial(self.micro_loss, micro, totals)
                for micro in self.micro_batches(self.dist.shard(items))]

    def accumulate_gradients(self, items: Sequence[Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """Backward over this rank's micro-batches of the step (no optimiser step); returns
        the step's loss and metric sums over all ranks."""
        return backward(self.jobs(items), self.fwd or self.model, self.dist, self.autocast)

    def train_step(self) -> tuple[dict[str, float], int]:
        """One step of the loop: `run.batch_size` examples, one optimiser step. Returns the
        metrics and the number of tokens processed (for tokens/s)."""
        items = self.batch_for_step(self.step)
        self.model.train()
        lr = self.scheduler.get_last_lr()[0]
        metrics = self.accumulators["model"].step(self.jobs(items), self.step + 1)
        self.scheduler.step()  # a skipped step still advances the schedule
        metrics["train/lr"] = lr
        return metrics, self.step_tokens(items)

    def model_state(self, model: nn.Module) -> dict[str, Tensor] | None:
        """The full state dict of a trained model on rank 0 (gathered from the shards under
        FSDP2, a collective every rank joins); None on the other ranks."""
        if not self.sharded:
            return model.state_dict() if self.dist.is_main else None
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                  cpu_offload=True))
        if not self.dist.is_main:
            return None
        # A gathered state dict lists tied weights twice; save_pretrained stores them once.
        if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
            tied = getattr(model, "_tied_weights_keys", None) or []
            for key in tied:
                sd.pop(key, None)
        return sd

    def optimizer_state(self, model: nn.Module, optimizer) -> dict | None:
        if not self.sharded:
            return optimizer.state_dict() if self.dist.is_main else None
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        sd = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))
        return sd if self.dist.is_main else None

    def load_optimizer_state(self, model: nn.Module, optimizer, path: Path) -> None:
        state = load_torch(path)
        if not self.sharded:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                                 options=StateDictOptions(full_state_dict=True))

    def gather(self) -> dict[str, Any]:
        """Every rank's part of a checkpoint, on rank 0 (all collectives happen here, so
        that writing is rank 0's alone)."""
        rngs = [rng_state()]
        if self.dist.enabled:
            rngs = [None] * self.dist.world_size
            torch.distributed.all_gather_object(rngs, rng_state())
        trained = self.trained()
        return {"rngs": rngs,
                "states": {n: self.model_state(m) for n, (m, _, _) in trained.items()},
                "optimizers": {n: self.optimizer_state(m, o) for n, (m, o, _) in
                               trained.items()}}

    def _write_checkpoint(self, directory: Path, payload: dict[str, Any]) -> None:
        for name, (model, _, scheduler) in self.trained().items():
            model.save_pretrained(directory / name, state_dict=payload["states"][name])
            prefix = "" if name == "model" else f"{name}_"
            torch.save(payload["optimizers"][name], directory / f"{prefix}optimizer.pt")
            torch.save(scheduler.state_dict(), directory / f"{prefix}scheduler.pt")
        for rank, state in enumerate(payload["rngs"]):
            save_rng(directory / ("rng.pt" if rank == 0 else f"rng_rank{rank}.pt"), state)
        state = {"step": self.step, "skipped": {n: a.skipped for n, a in
                                                self.accumulators.items()},
                 "world_size": self.dist.world_size, "extra": self.extra_state()}
        (directory / "state.json").write_text(json.dumps(state))

    def checkpoint(self) -> Path:
        """Save atomically: every rank gathers its part, rank 0 writes, all wait."""
        payload = self.gather()
        path = self.run_dir / "checkpoints" / f"step_{self.step}"
        if self.dist.is_main:
            path = save_checkpoint(self.run_dir / "checkpoints", self.step,
                                   lambda d: self._write_checkpoint(d, payload),
                                   keep=self.run.keep_checkpoints)
        self.dist.barrier()
        self._callback("on_save", self.step, path)
        return path

    def restore(self, directory: Path) -> None:
        state = json.loads((directory / "state.json").read_text())
        for name, (model, optimizer, scheduler) in self.trained().items():
            prefix = "" if name == "model" else f"{name}_"
            load_weights(model, directory / name)
            self.load_optimizer_state(model, optimizer, directory / f"{prefix}optimizer.pt")
            scheduler.load_state_dict(load_torch(directory / f"{prefix}scheduler.pt"))
        own = directory / f"rng_rank{self.dist.rank}.pt"
        # Exact resume needs the same world size; on another one each rank starts from rank
        # 0's generator state (the data order does not depend on it).
        load_rng(own if own.exists() and self.dist.rank else directory / "rng.pt")
        self.step = state["step"]
        for name, count in state.get("skipped", {}).items():
            if name in self.accumulators:
                self.accumulators[name].skipped = count
        self.load_extra_state(state.get("extra", {}))

    def train(self) -> TrainResult:
        """Run (or resume) the loop to `run.steps`; a signal stops it after a checkpoint."""
        start_time = time.time()
        self._prepare()
        main = self.dist.is_main
        # a run resumed from a checkpoint continues its W&B / MLflow runs
        logger = _Logger(self.run_dir, self.run, main, resumed=self.step > 0)
        logger.log_config(to_dict(self.config))
        self._logger = logger
        monitors = MonitorLog(self.run_dir) if main else None
        self._progress = Progress(self.run.steps, self.kind,
                                  self.run.progress if main else "none", start=self.step)
        eval_metrics: dict[str, float] = {}
        final = None
        status = "failed"
        self._stop_reason = None
        try:
            if self.step == 0 and self.run.eval_every:
                start = self.evaluate_on_main()  # the starting point, for before/after
                if start:
                    self.history.append({"step": 0, **logger.log(0, start)})
                self._callback("on_eval", 0, start)
            status = self._loop(logger, monitors)
            if status == "finished":
                eval_metrics, final = self._finish(logger, monitors)
        finally:
            self._progress.close()
            self._logger = None
            logger.close(status)
        report = self.write_report() if main else None
        if report is not None:
            print(f"report: {report}", flush=True)
        return TrainResult(self.run_dir, self.step, status, final, eval_metrics,
                           self.skipped_steps, time.time() - start_time,
                           self._stop_reason if status == "interrupted" else None)

    # ------------------------------------------------------------------ callbacks
    def request_stop(self, reason: str = "requested by a callback") -> None:
        """Stop after the current step, as SIGINT does: the loop saves a checkpoint and
        `train()` returns status "interrupted" (resume with run.resume). Any rank may ask;
        every rank stops after the same step. For early stopping, from a callback."""
        if self._stop_reason is None:
            self._stop_reason = reason

    def _callback(self, event: str, step: int, arg: Any) -> None:
        """Run `event` (on_step_end, on_eval, on_save) of every callback; a plain function
        is an on_step_end."""
        for callback in self.callbacks:
            hook = getattr(callback, event, None)
            if hook is None and event == "on_step_end" and callable(callback):
                hook = callback
            if hook is not None:
                hook(self, step, arg)

    def report_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        """Send sample records (written to samples.jsonl) to the trackers that show tables."""
        if self._logger is not None:
            self._logger.log_samples(step, rows)

    def _prepare(self) -> None:
        """The run directory and config, the optimiser, the memory check, the resume, and
        the logs cut back to the checkpoint."""
        main = self.dist.is_main
        if main:
            self._claim_run_dir()
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.config, self.run_dir / "config.yaml")
        self.dist.barrier()
        if main and self.run.precision == "bf16" and self.device.type == "cpu":
            slow = bf16_slowdown(self.memory_models()[0][0])
            if slow > 1.25:
                log.warning("run.precision bf16 on this CPU: a forward and backward pass took "
                            "%.1fx as long as in float32 (measured at start: no native bf16 "
                            "units, or a model too small to gain), so bf16 saves memory here "
                            "but costs time; --run.precision fp32 is faster", slow)
        self.switch_dropout()
        self.build_optimizer()
        self.check_memory()
        if self.run.resume:
            ckpt = latest_checkpoint(self.run_dir / "checkpoints")
            if ckpt is not None:
                self.restore(ckpt)
            if main:
                print(f"resumed from {ckpt} (step {self.step})" if ckpt else
                      f"no complete checkpoint in {self.run_dir / 'checkpoints'}; starting "
                      "from the beginning", flush=True)
        if main:
            # A fresh run starts its logs afresh; a resumed one drops what it will redo.
            for name in self.log_files():
                truncate_jsonl(self.run_dir / name, self.step if self.step else -1)
        self.dist.barrier()
        self.load_logs()

    def _claim_run_dir(self) -> None:
        """A fresh run does not write over another run's checkpoints or final model."""
        held = [p for p in (self.run_dir / "checkpoints", self.run_dir / "final")
                if p.exists() and any(p.iterdir())]
        if not held or self.run.resume:
            return
        if not self.run.overwrite:
            raise ConfigError(
                f"run.name: {self.run_dir} already holds a run ({held[0].name}/); continue it "
                "with --resume, pick another --run.name, or replace it with --run.overwrite "
                "true")
        import shutil

        for entry in self.run_dir.iterdir():
            if entry.name in KEPT_ON_OVERWRITE:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def _loop(self, logger: _Logger, monitors: MonitorLog | None
              ) -> Literal["finished", "interrupted"]:
        with _StopRequest() as stop:
            while self.step < self.run.steps:
                t0 = time.time()
                metrics, tokens = self.train_step()
                self.step += 1
                seconds = time.time() - t0
                metrics["perf/step_seconds"] = seconds
                metrics["perf/tokens_per_second"] = tokens / seconds
                evaluate = bool(self.run.eval_every) and self.step % self.run.eval_every == 0 \
                    and self.step < self.run.steps
                if evaluate:
                    self.phase("eval")
                    evals = self.evaluate_on_main()
                    metrics.update(evals)
                # an evaluation is always logged, whatever log_every says
                if evaluate or self.step % self.run.log_every == 0 or self.step == self.run.steps:
                    self._log(logger, monitors, metrics)
                if evaluate:
                    self._callback("on_eval", self.step, evals)
                self._callback("on_step_end", self.step, metrics)
                if self.run.save_every and self.step % self.run.save_every == 0:
                    self.phase("checkpoint")
                    self.checkpoint()
                self.phase("train")
                self._stop_reason = self._stop_reason or stop.requested  # a callback's, a signal
                if self._stop_everywhere(self._stop_reason):
                    self._stop_reason = self._stop_reason or "stopped on another rank"
                    if self.dist.is_main and not stop.requested:  # a signal said so already
                        print(f"stopping after step {self.step} ({self._stop_reason}): "
                              "saving a checkpoint", flush=True)
                    self.checkpoint()
                    return "interrupted"
        return "finished"

    def _log(self, logger: _Logger, monitors: MonitorLog | None, metrics: dict[str, float],
             progress: bool = True) -> None:
        row = logger.log(self.step, metrics)
        self.history.append({"step": self.step, **row})
        if progress and self._progress is not None:
            self._progress.update(self.step, {k: row[k] for k in self.progress_keys
                                              if k in row})
        if monitors is not None:
            monitors.update(self.history, **self.monitor_series())

    def _finish(self, logger: _Logger, monitors: MonitorLog | None
                ) -> tuple[dict[str, float], Path]:
        """The final evaluation, checkpoint and Hugging Face model directory."""
        eval_metrics = self.evaluate_on_main()
        if eval_metrics:
            self._log(logger, monitors, eval_metrics, progress=False)
        self._callback("on_eval", self.step, eval_metrics)
        self.before_final()
        self.checkpoint()
        final = self.run_dir / "final"
        states = {"model": self.model_state(self.model)} if self.sharded else {}
        if self.dist.is_main:
            self.save_final(final, states)
        self.dist.barrier()
        return eval_metrics, final


class _Logger:
    """MetricsLogger (metrics.jsonl and the trackers of run.report_to) on rank 0; the other
    ranks return the row without writing it, and send nothing."""

    def __init__(self, run_dir: Path, run: LoopConfig, active: bool, resumed: bool) -> None:
        self._inner = MetricsLogger(run_dir, report_to=run.trackers, name=run.name,
                                    experiment=str(Path(run.output_dir).resolve()),
                                    resumed=resumed) if active else None

    def log(self, step: int, metrics: dict[str, Any]) -> dict[str, float]:
        if self._inner is not None:
            return self._inner.log(step, metrics)
        return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}

    def log_config(self, config: dict[str, Any]) -> None:
        if self._inner is not None:
            self._inner.log_config(config)

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        if self._inner is not None:
            self._inner.log_samples(step, rows)

    def close(self, status: str = "finished") -> None:
        if self._inner is not None:
            self._inner.close(status)
