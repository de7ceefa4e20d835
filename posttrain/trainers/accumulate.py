"""One optimiser step from micro-batches: the only place in posttrain that accumulates
gradients.

Every trainer (SFT, reward model, DPO family, KTO) and every RL use of it (the policy with its
ptx and positive-example terms, the critic, value pretraining) hands `Accumulator.step` a list
of jobs, one per micro-batch. A job runs one forward pass and returns its loss *already divided
by the whole step's counts* (tokens, sequences or pairs over all micro-batches and ranks), so
that the micro-batch losses add up to the step's loss and the accumulated gradient is the full
batch's gradient, whatever the micro-batch size or the number of ranks.

    step = for each job: autocast forward -> backward (DDP syncs on the last one only)
           -> all-reduce loss and metrics -> clip -> one host sync -> finite? step : skip
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from posttrain import distributed
from posttrain.distributed import Dist
from posttrain.errors import NonFiniteError

log = logging.getLogger(__name__)

Metrics = dict[str, Tensor]
Job = Callable[[], tuple[Tensor, Metrics]]
"""One micro-batch: a forward pass returning (loss / whole-step counts, metric shares)."""


def _local(x: Tensor) -> Tensor:
    """A scalar that may be an FSDP2 DTensor, as a plain tensor."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def to_floats(values: dict[str, Tensor | float]) -> dict[str, float]:
    """Scalar tensors to Python floats in one device-to-host copy (one sync, not one each)."""
    keys = [k for k, v in values.items() if isinstance(v, Tensor)]
    out = {k: float(v) for k, v in values.items() if not isinstance(v, Tensor)}
    if keys:
        stacked = torch.stack([_local(values[k]).detach().float().reshape(()) for k in keys])
        out.update(zip(keys, stacked.tolist(), strict=True))
    return out


@dataclass
class Accumulator:
    """Accumulates one model's gradients over micro-batch jobs and steps its optimiser.

    Args:
        name: what is trained ("policy", "critic", "model"): names the metrics
            (`{prefix}loss`, `{prefix}grad_norm`, `{prefix}skipped`) and the error.
        optimizer: the optimiser of the trained parameters.
        module: the module forward passes go through (DDP-wrapped under torchrun), whose
            gradient all-reduce `no_sync` defers to the last job.
        dist: the process group.
        autocast: the forward-pass context of `run.precision`.
        max_grad_norm: clip the global gradient norm (None: no clip).
        on_nonfinite: "stop" raises NonFiniteError; "skip" drops the step and counts it.
        join: under DDP, a job whose loss is 0 but touches every parameter, run by a rank
            that has no micro-batch this step, so that it still joins the gradient all-reduce.
        prefix: metric key prefix (default "train/").
        hint: returns a sentence appended to the non-finite error (e.g. the last checkpoint).
    """

    name: str
    optimizer: torch.optim.Optimizer
    module: nn.Module
    dist: Dist
    autocast: Callable[[], AbstractContextManager]
    max_grad_norm: float | None = 1.0
    on_nonfinite: Literal["stop", "skip"] = "stop"
    join: Job | None = None
    prefix: str = "train/"
    hint: Callable[[], str] = field(default=lambda: "")
    skipped: int = 0  # steps dropped for a non-finite loss or gradient (checkpointed)

    def params(self) -> list[nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def step(self, jobs: Sequence[Job], step: int) -> dict[str, float]:
        """Backward over `jobs`, clip, check, and step the optimiser (or skip the step).

        `step` is the 1-based number of the step being made, for the error message. Returns
        the metrics as floats: `{prefix}loss`, `{prefix}grad_norm` (or `{prefix}skipped`) and
        the jobs' metric sums under their own keys (a key without "/" gets the prefix)."""
        total, sums = backward(jobs, self.module, self.dist, self.autocast, self.join)
        norm = torch.nn.utils.clip_grad_norm_(self.params(), self.max_grad_norm or math.inf)
        # the step's one host sync: the finiteness check needs the values, and every metric
        # comes along in the same copy
        values = to_floats({"loss": total, "norm": norm, **{f"m:{k}": v for k, v in
                                                            sums.items()}})
        p = self.prefix
        out = {f"{p}loss": values["loss"]}
        out.update({k if "/" in k else p + k: values[f"m:{k}"] for k in sums})
        loss_value, norm_value = values["loss"], values["norm"]
        finite = math.isfinite(loss_value) and math.isfinite(norm_value)
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if finite:
            out[f"{p}grad_norm"] = norm_value
            return out
        bad = f"loss is {loss_value}" if not math.isfinite(loss_value) else \
            f"gradient norm is {norm_value}"
        which = "" if self.name == "model" else f" ({self.name})"
        on_nonfinite(self.on_nonfinite, step, f"the {bad}{which}", f"the {self.name} step",
                     self.hint)
        self.skipped += 1
        out[f"{p}skipped"] = 1.0
        return out


def on_nonfinite(mode: Literal["stop", "skip"], step: int, what: str, dropped: str,
                 hint: Callable[[], str] = lambda: "") -> None:
    """`run.on_nonfinite`, the same in every trainer: "stop" raises NonFiniteError saying
    what is not finite at which step (no weights were written: the check runs before the
    optimiser step); "skip" logs one warning saying what is dropped (the caller drops it and
    counts it). `what` is e.g. "the loss is nan (critic)", `dropped` e.g. "the critic step".
    """
    if mode == "stop":
        raise NonFiniteError(
            f"step {step}: {what}; no weights were written. {hint()}Lower optim.lr, check "
            "the data, or set run.on_nonfinite=skip")
    log.warning("step %d: %s; %s skipped (run.on_nonfinite=skip)", step, what, dropped)


def backward(jobs: Sequence[Job], module: nn.Module, dist: Dist,
             autocast: Callable[[], AbstractContextManager], join: Job | None = None
             ) -> tuple[Tensor, Metrics]:
    """Run every job's forward (under `autocast`) and backward; returns the step's loss and
    metric sums over all ranks (detached). Gradients are left in `.grad`; under DDP `module`
    all-reduces them once, in the last job's backward."""
    if dist.enabled and not jobs and join is not None:
        jobs = [join]
    scale = dist.loss_scale if dist.enabled else 1.0
    total: Tensor | None = None
    sums: Metrics = {}
    for i, job in enumerate(jobs):
        with distributed.no_sync(module, i < len(jobs) - 1):
            with autocast():
                loss, metrics = job()
            (loss * scale if dist.enabled else loss).backward()
        part = loss.detach().float()
        total = part if total is None else total + part
        for k, v in metrics.items():
            v = torch.as_tensor(v, device=part.device).detach().float()
            sums[k] = sums[k] + v if k in sums else v
    if total is None:
        device = next(module.parameters()).device
        total = torch.zeros((), device=device)
    if dist.enabled:
        total = dist.all_reduce_sum(total)
        sums = dist.all_reduce_sum_dict(_same_keys(dist, sums, total.device))
    return total, sums


def _same_keys(dist: Dist, sums: Metrics, device: torch.device) -> Metrics:
    """Every rank reduces the same keys: a rank that had no job for a metric adds 0."""
    gathered: list = [None] * dist.world_size
    torch.distributed.all_gather_object(gathered, sorted(sums))
    keys = sorted({k for g in gathered for k in g})
    return {k: sums.get(k, torch.zeros((), device=device)) for k in keys}


def join_job(module: nn.Module, pad_id: int, device: torch.device) -> Job:
    """A job with loss 0 that touches every parameter of `module` (a causal LM, or a value
    model returning a tensor), so a rank without data still joins DDP's all-reduce."""

    def job() -> tuple[Tensor, Metrics]:
        ids = torch.full((1, 2), pad_id, device=device)
        out = module(input_ids=ids, attention_mask=torch.ones_like(ids, dtype=torch.bool))
        return getattr(out, "logits", out).float().sum() * 0.0, {}

    return job
