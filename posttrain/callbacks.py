"""Hooks into the training loop: `trainer.callbacks.append(MyCallback())`.

A callback subclasses `Callback` and overrides what it needs; every method is a no-op here.
Each is called with the trainer, the optimiser step just done and what happened:

- `on_step_end(trainer, step, metrics)`: after every step, with the step's metrics (its
  evaluation's too at an eval step), whether or not `run.log_every` logged them;
- `on_eval(trainer, step, metrics)`: after every evaluation (at step 0 with `run.eval_every`,
  every `eval_every` steps, and the final one) with its `eval/...` metrics;
- `on_save(trainer, step, path)`: after every checkpoint is written (periodic, on a stop, and
  the final one), with its directory `checkpoints/step_N`.

A plain function `fn(trainer, step, metrics)` in `trainer.callbacks` is an `on_step_end`.
Callbacks run on every rank; evaluation metrics are rank 0's (the other ranks get `{}`).

To stop a run early, a callback calls `trainer.request_stop(reason)`: the loop finishes the
step, saves a checkpoint and `train()` returns status "interrupted" with `stop_reason` =
reason, exactly as after a Ctrl-C; `run.resume` continues it from there (no final evaluation
and no `final/` model are made: `checkpoints/step_N/model` holds the weights). `EarlyStopping`
does so when an evaluation metric stops improving; its count starts afresh in a resumed run.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal


class Callback:
    """The hooks of the loop; override the ones you need."""

    def on_step_end(self, trainer: Any, step: int, metrics: dict[str, float]) -> None:
        """After optimiser step `step` (its metrics include the evaluation's at an eval
        step)."""

    def on_eval(self, trainer: Any, step: int, metrics: dict[str, float]) -> None:
        """After an evaluation at `step` (0: before training), with its metrics."""

    def on_save(self, trainer: Any, step: int, path: Path) -> None:
        """After the checkpoint of `step` was written to `path` (every rank, after it is
        complete)."""


class EarlyStopping(Callback):
    """Stop the run when `metric` (an evaluation metric, e.g. "eval/loss") has not improved
    by more than `min_delta` for `patience` evaluations in a row. `mode`: "min" (a loss) or
    "max" (a reward, an accuracy). Evaluations without the metric (or on ranks other than 0)
    are not counted; a NaN counts as no improvement."""

    def __init__(self, metric: str = "eval/loss", patience: int = 1,
                 mode: Literal["min", "max"] = "min", min_delta: float = 0.0) -> None:
        if patience < 1:
            raise ValueError(f"EarlyStopping: patience must be >= 1, got {patience}")
        if mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping: mode must be 'min' or 'max', got {mode!r}")
        self.metric, self.patience, self.mode, self.min_delta = metric, patience, mode, min_delta
        self.best: float | None = None
        self.bad = 0  # evaluations in a row without an improvement
        self.stopped_at: int | None = None

    def on_eval(self, trainer: Any, step: int, metrics: dict[str, float]) -> None:
        if self.metric not in metrics:
            return
        value = float(metrics[self.metric])
        if math.isnan(value):
            improved = False
        elif self.best is None:
            improved = True
        else:
            gain = self.best - value if self.mode == "min" else value - self.best
            improved = gain > self.min_delta
        if improved:
            self.best, self.bad = value, 0
            return
        self.bad += 1
        if self.bad >= self.patience and step < trainer.run.steps:
            self.stopped_at = step
            best = "none" if self.best is None else f"{self.best:.6g}"
            trainer.request_stop(f"early stopping: {self.metric} has not improved on {best} "
                                 f"for {self.bad} evaluation(s)")
