"""torch.distributed for every trainer: set-up from the torchrun environment, model wrapping
(DDP, or FSDP2's `fully_shard`), and the few global reductions the maths needs.

    torchrun --nproc_per_node 2 -m posttrain sft --task arithmetic

Design:
- Every rank computes the same global step batch (the data order is a pure function of the
  seed and the step), takes its share `items[rank::world]`, and normalises its micro-batch
  losses by the *global* counts of that batch. The gradient of the step is then the sum of the
  ranks' gradients; DDP and FSDP2 average gradients over ranks, so each rank's loss is scaled
  by the world size (`loss_scale`).
- RL keeps every prompt's group of samples on one rank (prompts are sharded, not samples), so
  group statistics (GRPO, RLOO, ...) need no communication; global token counts, global
  whitening and the KL controller's input are all-reduced.
- Rank 0 logs, evaluates, writes reports and checkpoints; the others wait at barriers.
With one process none of this runs: `init()` returns a single-process `Dist`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from posttrain.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def loss_scale(self) -> float:
        """DDP and FSDP2 average gradients over ranks; the loss maths wants their sum."""
        return float(self.world_size)

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share of a global batch: items rank, rank + world, ..."""
        return list(items[self.rank :: self.world_size])

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """Sum over ranks (a new tensor; identity with one process)."""
        if not self.enabled:
            return tensor
        out = tensor.detach().clone()
        torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
        return out

    def all_reduce_sum_dict(self, values: dict[str, Tensor]) -> dict[str, Tensor]:
        """Sum a dict of scalar tensors over ranks (every rank has the same keys)."""
        if not self.enabled or not values:
            return values
        keys = sorted(values)
        device = next(v.device for v in values.values() if isinstance(v, Tensor))
        stacked = torch.stack([torch.as_tensor(values[k], dtype=torch.float32, device=device)
                               for k in keys])
        return dict(zip(keys, self.all_reduce_sum(stacked), strict=True))

    def all_reduce_mean(self, values: dict[str, float]) -> dict[str, float]:
        """Average a dict of scalars over ranks (keys may differ; a missing key counts as
        absent, not as zero)."""
        if not self.enabled:
            return values
        gathered: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, values)
        keys = sorted({k for g in gathered for k in g})
        out = {}
        for k in keys:
            present = [g[k] for g in gathered if k in g]
            out[k] = sum(present) / len(present)
        return out

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def broadcast_object(self, obj: T) -> T:
        if not self.enabled:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


_CURRENT: Dist | None = None
_LOCAL_ONLY = 0  # > 0 inside `local_only()`


class local_only:
    """Within this block `init()` and `current()` report a single process: for work that one
    rank does alone while the others wait (e.g. making a task's data and SFT model)."""

    def __enter__(self) -> local_only:
        global _LOCAL_ONLY
        _LOCAL_ONLY += 1
        return self

    def __exit__(self, *exc) -> None:
        global _LOCAL_ONLY
        _LOCAL_ONLY -= 1


def init(device: str = "auto") -> Dist:
    """The process group from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), once.

    NCCL when the device is CUDA, gloo on CPU. Without torchrun: a single-process `Dist`."""
    global _CURRENT
    if _LOCAL_ONLY:
        return Dist()
    if _CURRENT is not None:
        return _CURRENT
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        _CURRENT = Dist()
        return _CURRENT
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = (torch.cuda.is_available() and device in ("auto", "cuda")) or device.startswith(
        "cuda")
    if not torch.distributed.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local)
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    _CURRENT = Dist(rank, world, local)
    return _CURRENT


def shutdown() -> None:
    """Destroy the process group (a live gloo group at interpreter exit can abort it)."""
    global _CURRENT
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _CURRENT = None


def current() -> Dist:
    return _CURRENT if _CURRENT is not None and not _LOCAL_ONLY else Dist()


def device_for(dist: Dist, name: str) -> torch.device:
    """The device of this rank: cuda:LOCAL_RANK under torchrun with GPUs, else as asked."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and dist.enabled:
        return torch.device("cuda", dist.local_rank)
    return torch.device(name)


def wrap(model: nn.Module, dist: Dist, strategy: str) -> nn.Module:
    """The module to run forward/backward through: the model itself (one process), DDP, or
    the model sharded in place by FSDP2's `fully_shard` (each transformer block, then the
    root)."""
    if not dist.enabled or strategy == "none":
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [dist.local_rank] if next(model.parameters()).is_cuda else None
        return DistributedDataParallel(model, device_ids=device_ids)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in _transformer_blocks(model):
            fully_shard(block)
        fully_shard(model)
        return model
    raise ConfigError(f"run.parallel {strategy!r} is not one of ddp, fsdp, none")


def _transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated layers (`model.layers` and the like), sharded one by one."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            return list(module)
    return []


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(
        model, torch.nn.parallel.DistributedDataParallel) else model


class no_sync:
    """Skip the gradient all-reduce for a micro-batch that is not the step's last."""

    def __init__(self, model: nn.Module, active: bool) -> None:
        self.model, self.active = model, active
        self._ctx = None

    def __enter__(self):
        if not self.active:
            return self
        if isinstance(self.model, torch.nn.parallel.DistributedDataParallel):
            self._ctx = self.model.no_sync()
            self._ctx.__enter__()
        elif hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2
            self.model.set_requires_gradient_sync(False)
        return self

    def __exit__(self, *exc):
        if self._ctx is not None:
            self._ctx.__exit__(*exc)
        elif self.active and hasattr(self.model, "set_requires_gradient_sync"):
            self.model.set_requires_gradient_sync(True)
