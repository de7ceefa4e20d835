"""Asynchronous rollouts (rollout.async, issue 16): a worker process samples while the
trainer updates, from weights at most rollout.max_staleness steps old.

- k = 0 is the synchronous run bit for bit (weights, every logged metric but timings);
- k = 1: every batch after the first is exactly one step stale, the update is decoupled PPO
  (π_old recomputed, π_old/μ weighting), and the run is reproducible;
- resume after a checkpoint with batches in flight equals the uninterrupted run exactly;
- a worker that dies or hangs stops the run with one line, and no process is left behind,
  even when the trainer is killed with SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from posttrain import pipeline
from posttrain.config import load_config, merge
from posttrain.rollout.worker import RolloutWorkerError
from posttrain.trainers.rl import RLConfig, RLTrainer
from tests.conftest import QUIET
from tests.trainers.test_rl import SPEC_PRESETS

TIMINGS = ("time", "perf/", "async/trainer_wait", "async/sample_seconds", "async/worker_idle")


def config(task_dir, preset, tmp_path, name, **over):
    p = pipeline.load_preset(preset)
    base = merge(p, pipeline.rl_base(task_dir, p))
    run = {**QUIET["run"], "output_dir": str(tmp_path), "name": name, "steps": 4,
           "eval_every": 0, "log_every": 1}
    return load_config(RLConfig, overrides=merge(merge(base, {"run": run}), merge({
        "rollout": {"prompts_per_step": 4, "samples_per_prompt": 4}, "eval": {"prompts": 4},
        "algo": {"value_pretrain_steps": 0}}, over)))


def rows(run_dir):
    return [{k: v for k, v in json.loads(line).items() if not k.startswith(TIMINGS)}
            for line in (run_dir / "metrics.jsonl").open()]


def weights(run_dir, name="model"):
    d = run_dir / "final" if name == "model" else run_dir / "final" / name
    return load_file(d / "model.safetensors")


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def sft(arithmetic_dir):
    pipeline.ensure_sft(arithmetic_dir, QUIET)
    return arithmetic_dir


@pytest.fixture(scope="module")
def runs(sft, tmp_path_factory):
    """Runs several tests compare with, each made once: `runs(name, preset, **over)`."""
    out, made = tmp_path_factory.mktemp("async-runs"), {}

    def get(name, preset="grpo", **over):
        if name not in made:
            trainer = RLTrainer(config(sft, preset, out, name, **over))
            made[name] = (trainer, trainer.train())
        return made[name]
    return get


K1 = {"rollout": {"async": True, "max_staleness": 1}}


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is no process left behind either
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("preset", ["grpo", "ppo"])
def test_staleness_zero_is_the_synchronous_run_bit_for_bit(runs, preset):
    sync, _ = runs(f"sync-{preset}", preset)
    trainer, result = runs(f"k0-{preset}", preset, rollout={"async": True, "max_staleness": 0})
    assert result.status == "finished" and trainer.worker is None  # closed
    a, s = rows(result.run_dir), rows(sync.run_dir)
    assert [r["step"] for r in a] == [r["step"] for r in s]
    for ra, rs in zip(a, s, strict=True):
        ra = {k: v for k, v in ra.items() if not k.startswith("async/")}
        # μ, the sampler's log-probs, is computed in the worker's process: the same tokens
        # and weights, but float rounding there differs by ~1e-7 (other memory). Only the
        # mismatch measures read μ when no correction applies, so they alone are approximate
        assert ra.keys() == rs.keys()
        assert ({k: v for k, v in ra.items() if not k.startswith("mismatch/")}
                == {k: v for k, v in rs.items() if not k.startswith("mismatch/")})
        assert {k: v for k, v in ra.items() if k.startswith("mismatch/")} == pytest.approx(
            {k: v for k, v in rs.items() if k.startswith("mismatch/")}, abs=1e-5)
    assert all(r["async/staleness"] == 0.0 for r in a if "async/staleness" in r)
    assert same_weights(weights(result.run_dir), weights(sync.run_dir))
    if preset == "ppo":
        assert same_weights(weights(result.run_dir, "critic"), weights(sync.run_dir, "critic"))


def test_staleness_one_trains_on_batches_one_step_old_reproducibly(runs):
    trainer, result = runs("k1", **K1)
    assert trainer._correction_now == "tis"  # decoupled PPO: weighted by π_old/μ
    train_rows = [r for r in rows(result.run_dir) if "async/staleness" in r]
    assert [r["async/staleness"] for r in train_rows] == [0.0, 1.0, 1.0, 1.0]
    assert all(r["async/dropped_batches"] == 0.0 for r in train_rows)
    # the fresh first batch needs no correction; the stale ones are weighted by π_old/μ
    assert "mismatch/weight_mean" not in train_rows[0]
    assert all(0 < r["mismatch/weight_mean"] < 2 for r in train_rows[1:])
    sync, _ = runs("sync-grpo")
    assert not same_weights(weights(result.run_dir), weights(sync.run_dir))
    _, again = runs("k1-again", **K1)  # the same, whatever the timing of the two processes
    assert same_weights(weights(result.run_dir), weights(again.run_dir))
    assert rows(again.run_dir) == rows(result.run_dir)


def test_resume_with_batches_in_flight_is_exact(sft, runs, tmp_path):
    over = K1
    straight, _ = runs("k1", **K1)
    first = RLTrainer(config(sft, "grpo", tmp_path, "resumed", **merge(over, {
        "run": {"steps": 4, "save_every": 2}})))
    stop = {"at": 3}  # after step 2's checkpoint, before step 3's

    def interrupt(trainer, step, metrics):  # as SIGTERM would: checkpoint and leave
        if step == stop["at"]:
            raise KeyboardInterrupt

    first.callbacks.append(interrupt)
    with pytest.raises(KeyboardInterrupt):
        first.train()
    ckpt = first.run_dir / "checkpoints" / "step_2"
    assert (ckpt / "in_flight.pt").exists()  # step 3's batch, sampled from step 1's weights
    assert not (first.run_dir / "checkpoints" / "step_3").exists()
    assert first.worker is None  # closed on the way out
    resumed = RLTrainer(config(sft, "grpo", tmp_path, "resumed", **merge(over, {
        "run": {"resume": True, "save_every": 2}})))
    result = resumed.train()
    assert result.steps_done == 4
    assert same_weights(weights(result.run_dir), weights(straight.run_dir))
    assert rows(result.run_dir) == rows(straight.run_dir)


def test_a_worker_that_dies_stops_the_run_with_one_line(sft, tmp_path):
    trainer = RLTrainer(config(sft, "grpo", tmp_path, "dies",
                               rollout={"async": True, "max_staleness": 1}))
    pids = []

    def kill_worker(t, step, metrics):
        if step == 1:
            pids.append(t.worker.process.pid)
            os.kill(t.worker.process.pid, signal.SIGKILL)

    trainer.callbacks.append(kill_worker)
    with pytest.raises(RolloutWorkerError, match=r"^the rollout worker \(pid \d+\) died with "
                                                 r"exit code -9 while the trainer waited for"):
        trainer.train()
    assert trainer.worker is None and not alive(pids[0])


def test_a_worker_that_hangs_stops_the_run_after_the_timeout(sft, tmp_path):
    trainer = RLTrainer(config(sft, "grpo", tmp_path, "hangs",
                               rollout={"async": True, "max_staleness": 0,
                                        "worker_timeout": 3}))
    pids = []

    def freeze_worker(t, step, metrics):
        if step == 1:
            pids.append(t.worker.process.pid)
            os.kill(t.worker.process.pid, signal.SIGSTOP)

    trainer.callbacks.append(freeze_worker)
    start = time.time()
    with pytest.raises(RolloutWorkerError, match=r"sent nothing for 3 s .*it may hang"):
        trainer.train()
    assert time.time() - start < 120
    assert trainer.worker is None and not alive(pids[0])  # a stopped process is killed too


def test_the_worker_leaves_when_its_trainer_is_killed(tmp_path, tiny_model_dir):
    # a trainer killed with SIGKILL runs no cleanup: the worker notices and exits by itself
    code = f"""
import sys, time, torch
from transformers import AutoModelForCausalLM
from posttrain.rollout.worker import RolloutWorker, WorkerSpec
model = AutoModelForCausalLM.from_pretrained({str(tiny_model_dir)!r})
spec = WorkerSpec({str(tiny_model_dir)!r}, {str(tiny_model_dir)!r}, "float32", False, None,
                  "lean", "auto", False, "fp32", "cpu", 1)
w = RolloutWorker(spec, model.named_parameters(), 60)
w.publish(model.named_parameters(), 0)
print(w.process.pid, flush=True)
time.sleep(600)
"""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(proc.stdout.readline())
        assert alive(pid)
        proc.kill()
        proc.wait()
        deadline = time.time() + 30
        while alive(pid) and time.time() < deadline:
            time.sleep(0.2)
        assert not alive(pid)
    finally:
        proc.kill()


@pytest.mark.parametrize("preset", sorted(SPEC_PRESETS))
def test_every_preset_runs_async_on_batches_one_step_stale(runs, sft, preset):
    # dapo: dynamic sampling's later rounds are requested from the current weights; vapo and
    # vc_ppo: value pretraining samples on the worker's side too (the policy is frozen), then
    # the worker serves the training batches; ppo_ptx adds its SFT loss to the update
    pretrain = {"algo": {"value_pretrain_steps": 2}} if preset in ("vapo", "vc_ppo") else {}
    trainer, result = runs(f"k1-{preset}", preset, **merge(merge(K1, {"run": {"steps": 3}}),
                                                           pretrain))
    assert result.status == "finished" and trainer.worker is None
    train_rows = [r for r in rows(result.run_dir) if "async/staleness" in r]
    # round 0 of steps 2 and 3 is one step stale; dapo's later rounds (if any) are fresh
    assert [r["async/staleness_max"] for r in train_rows] == [0.0, 1.0, 1.0]
    if preset != "dapo":
        assert [r["async/staleness"] for r in train_rows] == [0.0, 1.0, 1.0]
    # the stale batches' update is decoupled PPO: weighted by π_old/μ, which is not 1
    assert trainer._correction_now == "tis"
    assert all(r["mismatch/abs_logp_max"] > 1e-4 for r in train_rows[1:])
    trained = weights(result.run_dir)
    start = load_file(pipeline.ensure_sft(sft) / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in trained.values())
    assert not same_weights(trained, start)
