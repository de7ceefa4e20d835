"""Experiment trackers beside `metrics.jsonl`: TensorBoard, Weights & Biases and MLflow.

`run.report_to` names them. Every row the loop writes to `metrics.jsonl` goes to each, under
the same metric names (`train/loss`, `eval/reward`, ...) at the same step; the resolved config
is logged once when a run starts, and sample responses (RL's `samples.jsonl`) go as a table to
the trackers that show tables. Only rank 0 tracks.

W&B and MLflow are optional packages, imported when a run opens its tracker; `check_trackers`
refuses a name whose package is missing when the trainer is built, before any work. A resumed
run continues the same W&B run and MLflow run: their ids are kept in the run directory's
`trackers.json`.

At module level this imports only the standard library (the trackers' packages are imported
when a tracker opens), so the config and `posttrain.tracking.metrics` stay light.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import logging
import math
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from posttrain.errors import ConfigError

log = logging.getLogger(__name__)

TRACKERS = ("jsonl", "tensorboard", "wandb", "mlflow")
"""The names `run.report_to` takes (jsonl is always on: `metrics.jsonl` is the run's record)."""

STATE_FILE = "trackers.json"
"""In the run directory: the W&B and MLflow run ids, for a resumed run to continue them."""


def report_to_names(value: Sequence[str] | str) -> list[str]:
    """`run.report_to` as a list of known names, in order, without repeats: a list, or one
    string of comma-separated names (`--run.report_to wandb,mlflow`). An unknown name is a
    ConfigError that names the valid ones and the closest."""
    items = value.split(",") if isinstance(value, str) else list(value)
    names: list[str] = []
    for item in items:
        name = item.strip().lower()
        if not name and isinstance(value, str):  # "wandb," or "": nothing between commas
            continue
        if name not in TRACKERS:
            close = difflib.get_close_matches(name, TRACKERS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"run.report_to: {item!r} is not a tracker; valid: "
                              f"{', '.join(TRACKERS)}{hint}")
        if name not in names:
            names.append(name)
    return names


_PACKAGES = {
    "wandb": ("wandb", "wandb needs the wandb package: pip install 'posttrain[wandb]'"),
    "mlflow": ("mlflow", "mlflow needs the mlflow-skinny package: pip install "
                         "'posttrain[mlflow]'"),
}


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def check_trackers(names: Sequence[str]) -> None:
    """Refuse, before a run starts, a tracker whose package is not installed (one line)."""
    for name in names:
        if name in _PACKAGES and not _installed(_PACKAGES[name][0]):
            raise ConfigError(f"run.report_to: {_PACKAGES[name][1]}")
    if "mlflow" in names and not os.environ.get("MLFLOW_TRACKING_URI") and not (
            _installed("sqlalchemy") and _installed("alembic")):
        raise ConfigError("run.report_to: mlflow's local store (sqlite in the run directory) "
                          "needs sqlalchemy and alembic: pip install 'posttrain[mlflow]', or "
                          "set MLFLOW_TRACKING_URI to a tracking server")


class Tracker:
    """One tracker. Each method is a no-op here; a backend overrides what it supports."""

    name = ""

    def log(self, step: int, row: dict[str, float]) -> None:
        """One row of metrics (the names and values of `metrics.jsonl`) at `step`."""

    def log_config(self, config: dict[str, Any]) -> None:
        """The resolved config (the mapping `config.yaml` holds), once, when the run starts."""

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        """Sample responses of `step` (the records of `samples.jsonl`), as a table."""

    def close(self, status: str = "finished") -> None:
        """End the tracker's run: status is finished, interrupted (resumable) or failed."""


def open_trackers(names: Sequence[str], run_dir: str | Path, *, name: str | None = None,
                  experiment: str | None = None, resumed: bool = False) -> list[Tracker]:
    """The trackers of `names` (jsonl is the caller's and is skipped), each with its run
    started. `name` names the run (default: the run directory's name), `experiment` groups
    runs (MLflow's experiment; default: the run directory's parent); `resumed` continues the
    W&B and MLflow runs recorded in the run directory."""
    run_dir = Path(run_dir)
    name = name or run_dir.name
    experiment = experiment or str(run_dir.resolve().parent)
    names = report_to_names(names)
    check_trackers(names)
    opened: list[Tracker] = []
    try:
        for kind in names:
            if kind == "tensorboard":
                tb = TensorBoardTracker.open(run_dir)
                if tb is not None:
                    opened.append(tb)
            elif kind == "wandb":
                opened.append(WandbTracker(run_dir, name, resumed))
            elif kind == "mlflow":
                opened.append(MLflowTracker(run_dir, name, experiment, resumed))
    except BaseException:  # close what had opened: no run is left hanging
        for tracker in opened:
            tracker.close("failed")
        raise
    return opened


# ------------------------------------------------------------------------------ helpers
def _load_state(run_dir: Path) -> dict[str, Any]:
    path = run_dir / STATE_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _save_state(run_dir: Path, tracker: str, info: dict[str, Any]) -> None:
    state = _load_state(run_dir)
    state[tracker] = info
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(run_dir / STATE_FILE)


def _cell(value: Any) -> Any:
    """A table cell: scalars as they are, anything else (a list of turns, ...) as JSON."""
    if value is None or isinstance(value, str | bool | int | float):
        return value
    return json.dumps(value)


def table_of(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """(columns, rows of cells) of records that may not all have the same keys."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    return columns, [[_cell(row.get(c)) for c in columns] for row in rows]


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _started(what: str, err: Exception) -> ConfigError:
    reason = " ".join(str(err).split())[:300] or type(err).__name__
    return ConfigError(f"run.report_to: {what} could not start a run: {reason}")


# ------------------------------------------------------------------------------ backends
class TensorBoardTracker(Tracker):
    """Events in run_dir/tensorboard (finite values only: TensorBoard plots no NaN)."""

    name = "tensorboard"

    def __init__(self, writer: Any) -> None:
        self._writer = writer

    @classmethod
    def open(cls, run_dir: Path) -> TensorBoardTracker | None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is a dependency, but stay usable without it
            log.warning("run.report_to: tensorboard is not installed; no TensorBoard events "
                        "are written (pip install tensorboard)")
            return None
        return cls(SummaryWriter(str(run_dir / "tensorboard")))

    def log(self, step: int, row: dict[str, float]) -> None:
        for key, value in row.items():
            if math.isfinite(value):
                self._writer.add_scalar(key, value, step)

    def close(self, status: str = "finished") -> None:
        self._writer.close()


class WandbTracker(Tracker):
    """A W&B run: project from WANDB_PROJECT (default "posttrain"), entity and mode from
    W&B's own variables (WANDB_ENTITY, WANDB_MODE=offline, ...), run name = run.name, files
    in run_dir/wandb (or WANDB_DIR). Samples are logged as a `wandb.Table` under "samples"."""

    name = "wandb"

    def __init__(self, run_dir: Path, name: str, resumed: bool) -> None:
        import wandb

        self._wandb = wandb
        previous = _load_state(run_dir).get("wandb", {}).get("id") if resumed else None
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            # create_new: several trainers in one process each keep their own run
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "posttrain",
                                  name=name, dir=os.environ.get("WANDB_DIR") or str(run_dir),
                                  id=previous, resume="allow" if previous else None,
                                  reinit="create_new")
        except Exception as err:  # not logged in, no network in online mode, ...
            raise _started("wandb", err) from err
        _save_state(run_dir, "wandb", {"id": self.run.id, "project": self.run.project})

    def log(self, step: int, row: dict[str, float]) -> None:
        self.run.log(row, step=step)

    def log_config(self, config: dict[str, Any]) -> None:
        # a resumed run's config differs at least in run.resume
        self.run.config.update(config, allow_val_change=True)

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        columns, data = table_of(rows)
        self.run.log({"samples": self._wandb.Table(columns=columns, data=data)}, step=step)

    def close(self, status: str = "finished") -> None:
        self.run.finish(exit_code=1 if status == "failed" else 0)


_MLFLOW_STATUS = {"finished": "FINISHED", "interrupted": "KILLED", "failed": "FAILED"}


class MLflowTracker(Tracker):
    """An MLflow run, through `MlflowClient` (no global active run). Tracking URI from
    MLFLOW_TRACKING_URI, else a SQLite store in the run directory (run_dir/mlflow.db, with
    artifacts in run_dir/mlartifacts: MLflow 3 refuses new file stores); experiment from
    MLFLOW_EXPERIMENT_NAME, else `experiment`. The config goes in as params (`run.steps`,
    ...) and as the artifact config.json; samples as tables samples/step_N.json."""

    name = "mlflow"

    def __init__(self, run_dir: Path, name: str, experiment: str, resumed: bool) -> None:
        from mlflow.tracking import MlflowClient

        run_dir = run_dir.resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        self.uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{run_dir / 'mlflow.db'}"
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or experiment
        try:
            self.client = MlflowClient(tracking_uri=self.uri)
            self.run_id = self._continued(run_dir) if resumed else None
            if self.run_id is None:
                found = self.client.get_experiment_by_name(experiment)
                artifacts = None if os.environ.get("MLFLOW_TRACKING_URI") else \
                    (run_dir / "mlartifacts").as_uri()
                exp_id = found.experiment_id if found else self.client.create_experiment(
                    experiment, artifact_location=artifacts)
                self.run_id = self.client.create_run(exp_id, run_name=name).info.run_id
        except Exception as err:
            raise _started("mlflow", err) from err
        _save_state(run_dir, "mlflow", {"run_id": self.run_id, "tracking_uri": self.uri})

    def _continued(self, run_dir: Path) -> str | None:
        """The recorded run, set running again, if it is in this tracking store."""
        state = _load_state(run_dir).get("mlflow", {})
        if state.get("tracking_uri") != self.uri or not state.get("run_id"):
            return None
        try:
            self.client.update_run(state["run_id"], status="RUNNING")
        except Exception:  # deleted, or another store: start a new run
            return None
        return state["run_id"]

    def log(self, step: int, row: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(mlflow_key(k), v, now, step) for k, v in row.items()]
        for i in range(0, len(metrics), 1000):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def log_config(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        have = self.client.get_run(self.run_id).data.params  # a resumed run keeps its own
        params = [Param(mlflow_key(k), _param(v)) for k, v in _flat(config).items()
                  if mlflow_key(k) not in have]
        for i in range(0, len(params), 100):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.client.log_dict(self.run_id, config, "config.json")

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        import warnings

        columns, data = table_of(rows)
        table = {c: [r[i] for r in data] for i, c in enumerate(columns)}
        with warnings.catch_warnings():  # pandas' deprecation notes about MLflow's own code
            warnings.simplefilter("ignore")
            self.client.log_table(self.run_id, table, f"samples/step_{step}.json")

    def close(self, status: str = "finished") -> None:
        self.client.set_terminated(self.run_id, _MLFLOW_STATUS.get(status, "FINISHED"))


def mlflow_key(name: str) -> str:
    """`name` as an MLflow metric or param name: MLflow takes letters, digits and `_-. :/`,
    so posttrain's names pass unchanged; any other character becomes `_`."""
    return re.sub(r"[^\w\-. :/]", "_", name)


def _param(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text[:6000]  # MLflow's longest param value
