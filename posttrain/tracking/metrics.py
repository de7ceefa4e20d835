"""Metrics to `metrics.jsonl` and the trackers of `run.report_to` (TensorBoard, W&B, MLflow:
`posttrain.tracking.trackers`), and a progress display.

The progress bar (rich) is shown only on an interactive terminal; in logs and CI a plain line
is printed every `log_every` steps instead, so files are not flooded with redraws.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from posttrain.tracking.trackers import Tracker, open_trackers

log = logging.getLogger(__name__)


def _scalar(value: Any) -> float | None:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    return None


class MetricsLogger:
    """Appends one JSON object per logged step to `metrics.jsonl` and sends the same row to
    every tracker.

    `report_to` names the trackers (`posttrain.tracking.trackers.TRACKERS`; jsonl is this
    file and always written); without it, `tensorboard` says whether TensorBoard is one.
    `name`, `experiment` and `resumed` go to the trackers' runs (`open_trackers`). A tracker
    that raises while the run goes on is warned about and dropped: `metrics.jsonl` keeps
    every row."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True,
                 report_to: Sequence[str] | None = None, *, name: str | None = None,
                 experiment: str | None = None, resumed: bool = False) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if report_to is None:
            report_to = ["tensorboard"] if tensorboard else []
        self.trackers: list[Tracker] = open_trackers(
            [n for n in report_to if n != "jsonl"], self.path.parent, name=name,
            experiment=experiment, resumed=resumed)

    def truncate_after(self, step: int) -> None:
        """Drop lines past `step` (on resume, those steps are about to be run again)."""
        truncate_jsonl(self.path, step)

    def log(self, step: int, metrics: dict[str, Any]) -> dict[str, float]:
        row = {k: v for k, v in ((k, _scalar(v)) for k, v in metrics.items()) if v is not None}
        record = {"step": step, "time": time.time(), **row}
        with self.path.open("a") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")
        self._each("log", step, row)
        return row

    def log_config(self, config: dict[str, Any]) -> None:
        """The resolved config to every tracker (the run directory has it as config.yaml)."""
        self._each("log_config", config)

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        """Sample records (already in samples.jsonl) to the trackers that show tables."""
        if rows:
            self._each("log_samples", step, rows)

    def _each(self, method: str, *args: Any) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(*args)
            except Exception as err:  # a tracker's failure must not end a training run
                log.warning("run.report_to: %s failed in %s (%s); it is dropped for the rest "
                            "of the run (metrics.jsonl has every row)", tracker.name, method,
                            " ".join(str(err).split())[:300])
                self.trackers.remove(tracker)
                try:
                    tracker.close("failed")
                except Exception:  # already broken
                    pass

    def close(self, status: str = "finished") -> None:
        """End every tracker's run; `status`: finished, interrupted or failed."""
        for tracker in self.trackers:
            try:
                tracker.close(status)
            except Exception as err:
                log.warning("run.report_to: %s failed to close (%s)", tracker.name, err)
        self.trackers = []


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
