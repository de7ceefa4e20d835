"""The loop's callbacks on tiny SFT runs: `on_step_end`, `on_eval` and `on_save` are called
when and with what `posttrain.callbacks` says; a callback's `request_stop` ends the run like a
Ctrl-C (a checkpoint, status "interrupted") and the run resumes from it exactly."""

from __future__ import annotations

import json

from posttrain.callbacks import Callback, EarlyStopping
from posttrain.checkpoint import latest_checkpoint, list_checkpoints
from posttrain.trainers.sft import SFTTrainer
from tests.trainers.test_loop import assert_same_weights, sft_config, straight_run, weights

__all__ = ["straight_run"]  # the fixture: the same 6 steps, never stopped


class Recorder(Callback):
    def __init__(self):
        self.steps, self.evals, self.saves = [], [], []

    def on_step_end(self, trainer, step, metrics):
        self.steps.append((step, dict(metrics)))

    def on_eval(self, trainer, step, metrics):
        self.evals.append((step, dict(metrics)))

    def on_save(self, trainer, step, path):
        # called once the checkpoint is complete (the newest, with its marker)
        self.saves.append((step, path, path in list_checkpoints(path.parent)))


def metric_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]


def test_each_hook_is_called_when_and_with_what_it_says(arithmetic_task, tmp_path):
    trainer = SFTTrainer(sft_config(arithmetic_task, tmp_path, "hooks", eval_every=2,
                                    save_every=4))
    recorder, plain = Recorder(), []
    trainer.callbacks += [recorder, lambda tr, step, metrics: plain.append(step)]
    result = trainer.train()
    assert result.status == "finished" and result.stop_reason is None

    assert [s for s, _ in recorder.steps] == plain == [1, 2, 3, 4, 5, 6]  # old-style too
    assert all("train/loss" in m for _, m in recorder.steps)

    # at step 0 (the starting point), every eval_every steps, and the final evaluation
    assert [s for s, _ in recorder.evals] == [0, 2, 4, 6]
    logged = {}
    for row in metric_rows(result.run_dir):
        logged.setdefault(row["step"], {}).update(
            {k: v for k, v in row.items() if k.startswith("eval/")})
    for step, metrics in recorder.evals:
        assert metrics and set(metrics) == {"eval/nll", "eval/perplexity"}
        assert metrics == logged[step]
    assert recorder.steps[1][1]["eval/nll"] == logged[2]["eval/nll"]  # the step's metrics too

    # every save_every steps and the final checkpoint
    root = result.run_dir / "checkpoints"
    assert recorder.saves == [(4, root / "step_4", True), (6, root / "step_6", True)]


class StopAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer, step, metrics):
        if step == self.step:
            trainer.request_stop("enough")


def test_a_callback_stops_the_run_and_it_resumes_exactly(arithmetic_task, tmp_path,
                                                        straight_run):
    stopped = SFTTrainer(sft_config(arithmetic_task, tmp_path, "early"))
    recorder = Recorder()
    stopped.callbacks += [StopAt(3), recorder]
    result = stopped.train()
    assert (result.status, result.steps_done, result.stop_reason) == ("interrupted", 3, "enough")
    assert [s for s, _ in recorder.steps] == [1, 2, 3]  # nothing after the stop
    run_dir = tmp_path / "early"
    assert recorder.saves == [(3, run_dir / "checkpoints" / "step_3", True)]
    assert latest_checkpoint(run_dir / "checkpoints").name == "step_3"
    assert result.final_dir is None and not (run_dir / "final").exists()
    assert recorder.evals == []  # an early stop makes no final evaluation

    resumed = SFTTrainer(sft_config(arithmetic_task, tmp_path, "early", resume=True))
    again = resumed.train()
    assert (again.status, again.steps_done, again.stop_reason) == ("finished", 6, None)
    assert_same_weights(weights(resumed.model), straight_run)
    steps = [r["step"] for r in metric_rows(run_dir) if "train/loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_early_stopping_stops_at_the_evaluation_that_did_not_improve(arithmetic_task, tmp_path):
    trainer = SFTTrainer(sft_config(arithmetic_task, tmp_path, "patience", eval_every=2))
    stop = EarlyStopping("eval/nll", patience=1, min_delta=1e9)  # nothing is enough
    trainer.callbacks.append(stop)
    result = trainer.train()
    assert (result.status, result.steps_done) == ("interrupted", 2)
    assert stop.stopped_at == 2
    assert result.stop_reason.startswith("early stopping: eval/nll has not improved on ")
    assert latest_checkpoint(tmp_path / "patience" / "checkpoints").name == "step_2"
