"""Metrics to `metrics.jsonl` and TensorBoard, and a progress display.

The progress bar (rich) is shown only on an interactive terminal; in logs and CI a plain line
is printed every `log_every` steps instead, so files are not flooded with redraws.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any


def _scalar(value: Any) -> float | None:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    return None


class MetricsLogger:
    """Appends one JSON object per logged step to `metrics.jsonl`; mirrors to TensorBoard."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:  # tensorboard is a dependency, but stay usable without it
                self._writer = None

    def truncate_after(self, step: int) -> None:
        """Drop lines past `step` (on resume, those steps are about to be run again)."""
        truncate_jsonl(self.path, step)

    def log(self, step: int, metrics: dict[str, Any]) -> dict[str, float]:
        row = {k: v for k, v in ((k, _scalar(v)) for k, v in metrics.items()) if v is not None}
        record = {"step": step, "time": time.time(), **row}
        with self.path.open("a") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")
        if self._writer is not None:
            for k, v in row.items():
                if math.isfinite(v):
                    self._writer.add_scalar(k, v, step)
        return row

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def truncate_jsonl(path: Path, step: int) -> None:
    """Keep only the records of `path` whose "step" is <= `step` (all of them go for -1)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_metrics(run_dir: str | Path) -> list[dict[str, float]]:
    return read_jsonl(Path(run_dir) / "metrics.jsonl")


_SHORT = {"train/loss": "loss", "eval/loss": "eval_loss", "reward/mean": "reward",
          "eval/reward": "eval_reward", "kl/ref_seq": "kl", "perf/tokens_per_second": "tok/s"}


class Progress:
    """A progress bar with ETA and live metrics on a terminal; plain lines otherwise."""

    def __init__(self, total: int, description: str, mode: str = "auto",
                 start: int = 0) -> None:
        self.total = total
        self.description = description
        interactive = sys.stdout.isatty()
        self.mode = ("rich" if interactive else "plain") if mode == "auto" else mode
        self._bar = None
        self._start = time.time()
        self._start_step = start
        if self.mode == "rich":
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
            )
            self._bar.start()
            self._task = self._bar.add_task(description, total=total, completed=start, info="")

    def update(self, step: int, info: dict[str, float] | None = None) -> None:
        text = "  ".join(f"{_SHORT.get(k, k)}={v:.4g}" for k, v in (info or {}).items())
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=text)
        elif self.mode == "plain" and info is not None:
            done = step - self._start_step
            elapsed = time.time() - self._start
            eta = elapsed / done * (self.total - step) if done else float("nan")
            print(f"[{self.description}] step {step}/{self.total}  {text}  "
                  f"eta {eta:.0f}s", flush=True)

    def phase(self, name: str) -> None:
        """Show which phase of the step runs (rollout, score, update, eval, ...) on the bar;
        plain logs stay quiet."""
        if self._bar is not None:
            self._bar.update(self._task, description=f"{self.description}: {name}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
