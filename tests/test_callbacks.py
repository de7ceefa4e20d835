"""`posttrain.callbacks.EarlyStopping` on hand-made evaluations: no model, no training (the
runs with callbacks are in tests/trainers/test_callback_runs.py)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from posttrain.callbacks import Callback, EarlyStopping


class FakeTrainer:
    def __init__(self, steps=100):
        self.run = SimpleNamespace(steps=steps)
        self.stops: list[str] = []

    def request_stop(self, reason):
        self.stops.append(reason)


def feed(callback, values, trainer=None, every=10):
    """Evaluations at steps 0, every, 2*every, ... with `values` of eval/loss (None: an
    evaluation without it); returns the trainer and the step at which a stop was asked."""
    trainer = trainer or FakeTrainer()
    for i, value in enumerate(values):
        callback.on_eval(trainer, i * every, {} if value is None else {"eval/loss": value})
        if trainer.stops:
            return trainer, i * every
    return trainer, None


def test_stops_after_patience_evaluations_without_improvement():
    trainer, at = feed(EarlyStopping("eval/loss", patience=2), [3.0, 2.0, 2.5, 2.0, 1.0])
    assert at == 30  # 2.0 at step 10 is the best; 2.5 and 2.0 (not better) follow
    assert trainer.stops == ["early stopping: eval/loss has not improved on 2 for 2 "
                             "evaluation(s)"]


def test_an_improvement_resets_the_count_and_min_delta_sets_how_much_counts():
    assert feed(EarlyStopping(patience=2), [3.0, 2.9, 3.0, 2.8, 2.9, 2.7])[1] is None
    # with min_delta 0.15 gains of 0.1 and 0.05 are no improvement
    assert feed(EarlyStopping(patience=2, min_delta=0.15), [3.0, 2.9, 2.95])[1] == 20
    assert feed(EarlyStopping(patience=2, min_delta=0.15), [3.0, 2.9, 2.8])[1] is None


def test_max_mode_for_a_reward():
    stop = EarlyStopping("eval/reward", patience=1, mode="max")
    trainer = FakeTrainer()
    for step, reward in ((0, 0.1), (10, 0.4), (20, 0.3)):
        stop.on_eval(trainer, step, {"eval/reward": reward})
    assert stop.stopped_at == 20 and stop.best == 0.4 and len(trainer.stops) == 1


def test_missing_metrics_are_not_counted_and_nan_is_no_improvement():
    assert feed(EarlyStopping(patience=1), [3.0, None, None, 2.0])[1] is None
    assert feed(EarlyStopping(patience=1), [3.0, math.nan])[1] == 10
    assert feed(EarlyStopping(patience=1), [math.nan, math.nan])[1] == 0


def test_the_final_evaluation_asks_no_stop():
    # the final evaluation is at run.steps: the run ends there anyway
    trainer, at = feed(EarlyStopping(patience=1), [3.0, 4.0], FakeTrainer(steps=10))
    assert at is None and trainer.stops == []


def test_bad_arguments():
    with pytest.raises(ValueError, match="patience must be >= 1"):
        EarlyStopping(patience=0)
    with pytest.raises(ValueError, match="mode must be 'min' or 'max'"):
        EarlyStopping(mode="lowest")


def test_the_base_callback_does_nothing():
    cb = Callback()
    assert cb.on_step_end(None, 1, {}) is None
    assert cb.on_eval(None, 1, {}) is None
    assert cb.on_save(None, 1, None) is None
