"""The experiment trackers of `run.report_to`: W&B (offline) and MLflow (its local SQLite store)
get every row of `metrics.jsonl`, the config and the sample tables, read back from what each
tracker wrote and compared with the JSONL exactly; a resumed run continues the same runs.

Most tests drive `MetricsLogger` alone (no torch, no model); the last ones build trainers:
the config's `report_to`, the early package check, and one tiny SFT run with every tracker.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path

import pytest

from posttrain.errors import ConfigError
from posttrain.tracking import trackers
from posttrain.tracking.metrics import MetricsLogger, read_metrics
from posttrain.tracking.trackers import (
    TRACKERS,
    Tracker,
    check_trackers,
    mlflow_key,
    report_to_names,
    table_of,
)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """W&B offline with every file of it under tmp_path; MLflow on its default store (the
    run directory's); neither looks at the user's own settings."""
    for var in ("WANDB_DIR", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_ID", "WANDB_RESUME",
                "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    return tmp_path


# ----------------------------------------------------------------------- reading back W&B
def wandb_records(path: Path):
    """The records of a `.wandb` file, parsed with W&B's own protobuf (`wandb.proto`).

    wandb >= 0.2x ships no Python reader of its files (the datastore module went with the
    move to wandb-core), so the container is read here: a 7-byte header (":W&B", magic,
    version), then LevelDB-log records in 32 KiB blocks, each `crc32(type + data)`, length,
    type (full, first, middle, last) and data."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    block, pos, chunk = 32768, 7, b""
    while True:
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
        if pos + 7 > len(data):
            return
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0:  # zero padding
            continue
        assert zlib.crc32(bytes([kind]) + payload) == crc, f"{path}: bad record at {pos}"
        chunk = payload if kind in (1, 2) else chunk + payload
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            yield record


def read_wandb(run_dir: Path) -> dict:
    """Every offline run W&B wrote under run_dir/wandb (a resumed run writes one more):
    their ids, the history by step (metrics only: no `_step`, `_runtime`, tables), the
    config and the sample tables by step."""
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert files, f"no offline W&B run under {run_dir}"
    ids, history, config, tables = [], {}, {}, {}
    for path in files:
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.append(record.run.run_id)
                updates = record.run.config.update
            elif kind == "config":
                updates = record.config.update
            elif kind == "history":
                items = {tuple(i.nested_key) or (i.key,): json.loads(i.value_json)
                         for i in record.history.item}
                step = items.pop(("_step",))
                # a float that is a whole number comes back as a JSON integer: 2.0 is "2"
                history.setdefault(step, {}).update(
                    {k[0]: float(v) for k, v in items.items() if len(k) == 1 and k[0][0] != "_"})
                continue
            else:
                continue
            config.update({u.key: json.loads(u.value_json) for u in updates
                           if u.key != "_wandb"})
        for table in (path.parent / "files" / "media" / "table").glob("samples_*.table.json"):
            tables[int(table.name.split("_")[1])] = json.loads(table.read_text())
    return {"ids": ids, "history": history, "config": config, "tables": tables}


# ----------------------------------------------------------------------- reading back MLflow
def read_mlflow(run_dir: Path) -> tuple:
    """(client, run) of the MLflow run recorded in run_dir/trackers.json."""
    from mlflow.tracking import MlflowClient

    state = json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    assert state["tracking_uri"] == f"sqlite:///{run_dir.resolve() / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=state["tracking_uri"])
    return client, client.get_run(state["run_id"])


def mlflow_artifact(client, run_id: str, path: str) -> dict:
    return json.loads(Path(client.download_artifacts(run_id, path)).read_text())


# ----------------------------------------------------------------------- expected values
def jsonl_by_step(run_dir: Path) -> dict[int, dict[str, float]]:
    """metrics.jsonl's rows merged by step (the final evaluation shares the last step)."""
    out: dict[int, dict[str, float]] = {}
    for row in read_metrics(run_dir):
        out.setdefault(row["step"], {}).update(
            {k: v for k, v in row.items() if k not in ("step", "time")})
    return out


def same(a, b) -> bool:
    """Equal, bit for bit, NaN equal to NaN."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def assert_mlflow_has(client, run_id: str, expected: dict[int, dict[str, float]]) -> None:
    keys = {k for row in expected.values() for k in row}
    for key in keys:
        got = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        want = sorted((step, row[key]) for step, row in expected.items() if key in row)
        assert same(got, want), key


ROWS = [
    (0, {"eval/nll": 2.5, "eval/perplexity": math.exp(2.5)}),  # the starting evaluation
    (1, {"train/loss": 2.25, "train/lr": 1e-4, "perf/tokens_per_second": 1234.5}),
    (2, {"train/loss": 1.0 / 3.0, "train/lr": 1e-4, "train/grad_norm": math.nan,
         "perf/tokens_per_second": 987.25}),
    (2, {"eval/nll": 0.1 + 0.2, "eval/exact_match": 0.5}),  # the final one, at the last step
]
CONFIG = {"model": {"path": "models/tiny", "lora_targets": None},
          "run": {"name": "run", "steps": 2, "report_to": ["jsonl", "wandb", "mlflow"]},
          "optim": {"lr": 1e-4, "schedule": "cosine"}}
SAMPLES = [{"step": 2, "prompt": "2+2=", "response": "4", "reward": 1.0},
           {"step": 2, "prompt": "3+4=", "response": "8", "reward": 0.0,
            "turns": [{"role": "user", "content": "3+4="}]}]


def log_run(run_dir: Path, rows=ROWS, resumed=False, status="finished", samples=True) -> None:
    """A run's logging as the loop does it: the config, the rows, RL's samples (at step 2)."""
    logger = MetricsLogger(run_dir, report_to=["jsonl", "wandb", "mlflow"], name="run",
                           experiment="tests", resumed=resumed)
    logger.log_config(CONFIG)
    for i, (step, metrics) in enumerate(rows):
        logger.log(step, metrics)
        if samples and i == 2:  # inside step 2, as RL's train_step sends them
            logger.log_samples(2, SAMPLES)
    logger.close(status)


# ----------------------------------------------------------------------- names
def test_report_to_takes_a_list_or_comma_separated_names():
    assert report_to_names(["jsonl", "tensorboard"]) == ["jsonl", "tensorboard"]
    assert report_to_names("wandb, MLflow,wandb") == ["wandb", "mlflow"]
    assert report_to_names("") == [] and report_to_names([]) == []
    assert set(TRACKERS) == {"jsonl", "tensorboard", "wandb", "mlflow"}


def test_an_unknown_tracker_names_the_field_the_valid_ones_and_the_closest():
    with pytest.raises(ConfigError) as err:
        report_to_names(["jsonl", "wandbb"])
    assert str(err.value) == ("run.report_to: 'wandbb' is not a tracker; valid: jsonl, "
                              "tensorboard, wandb, mlflow (did you mean 'wandb'?)")
    with pytest.raises(ConfigError, match=r"^run\.report_to: 'comet' is not a tracker"):
        report_to_names("comet")


@pytest.mark.parametrize("name, message", [
    ("wandb", "run.report_to: wandb needs the wandb package: pip install 'posttrain[wandb]'"),
    ("mlflow", "run.report_to: mlflow needs the mlflow-skinny package: pip install "
               "'posttrain[mlflow]'"),
])
def test_a_missing_package_is_one_config_error(monkeypatch, name, message):
    real = trackers._installed
    monkeypatch.setattr(trackers, "_installed", lambda mod: mod != name and real(mod))
    with pytest.raises(ConfigError) as err:
        check_trackers(["jsonl", name])
    assert str(err.value) == message
    check_trackers(["jsonl", "tensorboard"])  # the others need nothing more


def test_metric_names_are_the_same_in_mlflow():
    for name in ("train/loss", "eval/reward_sampled", "perf/tokens_per_second", "kl/ref_seq_k3",
                 "reward/format:strict", "run.optim.lr"):
        assert mlflow_key(name) == name
    assert mlflow_key("reward/<my fn>") == "reward/_my fn_"


def test_table_of_records_with_different_keys():
    columns, data = table_of(SAMPLES)
    assert columns == ["step", "prompt", "response", "reward", "turns"]
    assert data == [[2, "2+2=", "4", 1.0, None],
                    [2, "3+4=", "8", 0.0, '[{"role": "user", "content": "3+4="}]']]


# ----------------------------------------------------------------------- W&B and MLflow
def test_wandb_and_mlflow_get_exactly_what_metrics_jsonl_holds(offline):
    run_dir = offline / "runs" / "run"
    log_run(run_dir)
    expected = jsonl_by_step(run_dir)
    assert sorted(expected) == [0, 1, 2] and math.isnan(expected[2]["train/grad_norm"])

    wb = read_wandb(run_dir)
    assert len(wb["ids"]) == 1
    assert json.loads((run_dir / "trackers.json").read_text())["wandb"]["id"] == wb["ids"][0]
    assert same(wb["history"], expected)
    assert wb["config"] == CONFIG
    assert wb["tables"] == {2: dict(zip(("columns", "data"), table_of(SAMPLES), strict=True))}

    client, run = read_mlflow(run_dir)
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "tests"
    assert_mlflow_has(client, run.info.run_id, expected)
    params = run.data.params
    assert params["run.steps"] == "2" and params["optim.lr"] == "0.0001"
    assert params["run.report_to"] == '["jsonl", "wandb", "mlflow"]'
    assert params["model.lora_targets"] == "null"
    assert mlflow_artifact(client, run.info.run_id, "config.json") == CONFIG
    table = mlflow_artifact(client, run.info.run_id, "samples/step_2.json")
    assert (table["columns"], table["data"]) == tuple(map(list, table_of(SAMPLES)))


def test_a_resumed_run_continues_the_same_wandb_and_mlflow_runs(offline):
    run_dir = offline / "runs" / "run"
    first = [(1, {"train/loss": 2.0}), (2, {"train/loss": 1.5})]
    log_run(run_dir, first, status="interrupted", samples=False)
    ids = json.loads((run_dir / "trackers.json").read_text())
    client, run = read_mlflow(run_dir)
    assert run.info.status == "KILLED"  # stopped, resumable

    log_run(run_dir, [(3, {"train/loss": 1.25}), (4, {"train/loss": 1.0})], resumed=True,
            samples=False)
    assert json.loads((run_dir / "trackers.json").read_text()) == ids
    wb = read_wandb(run_dir)
    assert wb["ids"] == [ids["wandb"]["id"]] * 2  # the same run, written twice offline
    expected = jsonl_by_step(run_dir)  # the JSONL holds both parts
    assert sorted(expected) == [1, 2, 3, 4]
    assert same(wb["history"], expected)
    client, run = read_mlflow(run_dir)
    assert run.info.run_id == ids["mlflow"]["run_id"] and run.info.status == "FINISHED"
    assert_mlflow_has(client, run.info.run_id, expected)

    log_run(run_dir.parent / "fresh", first, samples=False)  # not resumed: runs of its own
    fresh = json.loads((run_dir.parent / "fresh" / "trackers.json").read_text())
    assert fresh["wandb"]["id"] != ids["wandb"]["id"]
    assert fresh["mlflow"]["run_id"] != ids["mlflow"]["run_id"]


def test_a_failing_tracker_is_dropped_and_the_jsonl_keeps_every_row(tmp_path, caplog):
    class Broken(Tracker):
        name = "broken"
        closed = None

        def log(self, step, row):
            if step == 2:
                raise RuntimeError("the network is gone")

        def close(self, status="finished"):
            Broken.closed = status

    logger = MetricsLogger(tmp_path, report_to=["jsonl"])
    logger.trackers.append(Broken())
    for step in (1, 2, 3):
        logger.log(step, {"train/loss": 1.0 / step})
    assert logger.trackers == [] and Broken.closed == "failed"
    assert "broken failed in log (the network is gone)" in caplog.text
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    logger.close()


# ----------------------------------------------------------------------- trainers (torch)
def test_run_report_to_in_the_config_and_its_tensorboard_switch(tmp_path):
    from posttrain.config import load_config, save_config
    from posttrain.trainers.sft import SFTConfig

    def run(**over):
        return load_config(SFTConfig, overrides={"model": {"path": "m"},
                                                 "data": {"train": "t.jsonl"}, "run": over}).run

    assert run().report_to == ["jsonl", "tensorboard"]
    assert run().trackers == ["jsonl", "tensorboard"]
    assert run(tensorboard=False).trackers == ["jsonl"]  # older configs keep their meaning
    assert run(report_to="wandb,mlflow").trackers == ["jsonl", "wandb", "mlflow"]
    assert run(report_to=["tensorboard", "wandb"], tensorboard=False).trackers == \
        ["jsonl", "wandb"]
    assert run(report_to=[]).trackers == ["jsonl"]  # jsonl is always written
    with pytest.raises(ConfigError, match=r"^run\.report_to: 'mlflw' is not a tracker; valid: "
                                          r"jsonl, tensorboard, wandb, mlflow \(did you mean "
                                          r"'mlflow'\?\)$"):
        run(report_to=["mlflw"])
    cfg = load_config(SFTConfig, overrides={"model": {"path": "m"}, "data": {"train": "t"},
                                            "run": {"report_to": "wandb"}})
    save_config(cfg, tmp_path / "config.yaml")  # saved as the list it means
    assert load_config(SFTConfig, tmp_path / "config.yaml") == cfg


def test_a_missing_tracker_package_stops_the_trainer_when_it_is_built(arithmetic_task, tmp_path,
                                                                      monkeypatch):
    from posttrain.trainers.sft import SFTTrainer
    from tests.trainers.test_loop import sft_config

    real = trackers._installed
    monkeypatch.setattr(trackers, "_installed", lambda mod: mod != "wandb" and real(mod))
    cfg = sft_config(arithmetic_task, tmp_path, "nowandb", report_to=["jsonl", "wandb"])
    with pytest.raises(ConfigError, match=r"^run\.report_to: wandb needs the wandb package"):
        SFTTrainer(cfg)
    assert not (tmp_path / "nowandb").exists()  # before anything was written


def test_a_tiny_sft_run_reports_to_every_tracker(arithmetic_task, offline):
    from posttrain.config import to_dict
    from posttrain.trainers.sft import SFTTrainer
    from tests.trainers.test_loop import sft_config

    cfg = sft_config(arithmetic_task, offline, "tracked", steps=4, eval_every=2,
                     tensorboard=True, report_to=["jsonl", "tensorboard", "wandb", "mlflow"])
    result = SFTTrainer(cfg).train()
    assert result.status == "finished"
    run_dir = result.run_dir
    expected = jsonl_by_step(run_dir)
    assert sorted(expected) == [0, 1, 2, 3, 4]  # the start evaluation, 4 steps
    assert {"train/loss", "eval/nll"} <= set(expected[2]) and "eval/nll" in expected[4]

    wb = read_wandb(run_dir)
    assert same(wb["history"], expected)
    assert wb["config"] == json.loads(json.dumps(to_dict(cfg)))  # as config.yaml has it
    assert wb["config"]["run"]["report_to"] == ["jsonl", "tensorboard", "wandb", "mlflow"]

    client, run = read_mlflow(run_dir)
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert client.get_experiment(run.info.experiment_id).name == str(offline.resolve())
    assert_mlflow_has(client, run.info.run_id, expected)
    assert run.data.params["run.steps"] == "4"

    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    losses = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert [s for s, _ in losses] == [1, 2, 3, 4]
    for step, value in losses:  # TensorBoard keeps float32
        assert value == pytest.approx(expected[step]["train/loss"], rel=1e-6)
