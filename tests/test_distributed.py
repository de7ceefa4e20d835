"""Data parallelism under torchrun on CPU (gloo, 2 processes): the same results as 1 process.

Each test launches `torchrun --nproc_per_node N -m posttrain ...` for N = 1 and N = 2 with the
same global batch and seed, and compares the loss curves and the final weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from posttrain import pipeline
from tests.conftest import QUIET

pytestmark = pytest.mark.slow


# On 2026-11-22 FSDP2 on CPU (gloo, torch 2.13) aborted one rank about 1 launch in 6 with
# "terminate called without an active exception", and these tests retried such a launch.
# On 2026-12-04, 105 launches (63 of the current code, with and without two busy CPU loops
# beside them, 14 each of the commits where the abort was first seen and where the retry came
# in) never aborted: no retry now. scripts/fsdp_launches.py counts aborts over N launches.
GLOO_ABORT = "terminate called without an active exception"


def torchrun(nproc, args, cwd, tasks_root):
    env = {**os.environ, "POSTTRAIN_TASKS": str(tasks_root), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "-m", "posttrain", *args, "--run.progress", "none", "--run.log_every", "1",
           "--run.output_dir", "out"]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    abort = (" (the gloo abort of 2026-11-22 is back: count it with scripts/fsdp_launches.py)"
             if GLOO_ABORT in proc.stderr else "")
    assert proc.returncode == 0, f"torchrun failed{abort}:\n{proc.stderr[-4000:]}"
    return proc.stdout


def losses(run_dir, key):
    return [r[key] for r in map(json.loads, (run_dir / "metrics.jsonl").open()) if key in r]


def assert_same_weights(a, b, atol):
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=0, msg=k)


def compare(args, name, key, tmp_path, tasks_root, atol=2e-6, critic=False):
    for n in (1, 2):
        torchrun(n, [*args, "--run.name", f"{name}{n}"], tmp_path, tasks_root)
    one, two = tmp_path / "out" / f"{name}1", tmp_path / "out" / f"{name}2"
    a, b = losses(one, key), losses(two, key)
    assert len(a) == len(b) > 0
    assert b == pytest.approx(a, rel=1e-4, abs=1e-6)
    assert_same_weights(one / "final", two / "final", atol)
    if critic:
        # Adam divides by sqrt(v): float-order differences (ranks sum gradients in another
        # order) in near-zero gradients move weights by up to ~lr/100; the critic's lr is 3e-3
        assert_same_weights(one / "final" / "critic", two / "final" / "critic", atol=3e-5)


@pytest.fixture(scope="module")
def stages(arithmetic_dir, preference_dir):
    pipeline.ensure_sft(arithmetic_dir, QUIET)
    pipeline.ensure_sft(preference_dir, QUIET)
    return arithmetic_dir.parent


def test_dpo_two_processes_equal_one(stages, tmp_path):
    compare(["dpo", "--task", "preference", "--run.steps", "4", "--run.batch_size", "8",
             "--run.eval_every", "0", "--eval.prompts", "4"], "dpo", "train/loss",
            tmp_path, stages)


RL = ["--task", "arithmetic", "--run.steps", "3", "--rollout.prompts_per_step", "4",
      "--rollout.seed_per_prompt", "true", "--algo.mini_batches", "1", "--algo.epochs", "1",
      "--run.eval_every", "0", "--eval.prompts", "4"]


def test_critic_free_rl_two_processes_equal_one(stages, tmp_path):
    # grpo: group statistics stay on one rank, the token-level loss normalises globally
    compare(["rl", "--preset", "grpo", *RL], "grpo", "loss/policy", tmp_path, stages)


@pytest.mark.parametrize("preset", ["reinforce_pp", "reinforce_pp_baseline"])
def test_global_whitening_two_processes_equal_one(preset, stages, tmp_path):
    # the advantages are whitened with the mean and variance of every rank's tokens: with
    # local statistics the two runs' losses and weights would part at the first step (by ~lr,
    # 1e-4, on most weights). Measured on the arithmetic SFT model: step 0's gradient is tiny
    # (norm 6e-5) and Adam's first step is lr·g/|g| whatever |g|, so float-order noise moves
    # a weight by a few 1e-6: 1 of 200k weights differs by 5.1e-6, every other by < 4e-7
    compare(["rl", "--preset", preset, *RL], preset, "loss/policy", tmp_path, stages,
            atol=2e-5)


def test_critic_rl_two_processes_equal_one(stages, tmp_path):
    # ppo: the critic is trained in parallel too, and the adaptive KL sees the global KL
    compare(["rl", "--preset", "ppo", *RL], "ppo", "loss/value", tmp_path, stages, critic=True)


def test_kl_controller_and_reward_whitening_see_the_whole_batch(stages, tmp_path):
    # The adaptive β moves by e·n/horizon with n the step's samples: on 2 ranks n must be the
    # global count (a short horizon makes a local n visible); reward whitening likewise
    # uses the statistics of the whole batch.
    compare(["rl", "--preset", "ppo", *RL, "--algo.kl_horizon", "10",
             "--algo.reward_whiten", "true"], "ppo-kl", "kl/coef", tmp_path, stages,
            critic=True)


def test_fsdp2_two_processes_equal_one(stages, tmp_path):
    compare(["sft", "--task", "arithmetic", "--run.parallel", "fsdp", "--run.steps", "4",
             "--run.eval_every", "0", "--eval.generate_samples", "4"], "fsdp", "train/loss",
            tmp_path, stages)


def test_two_process_resume_is_exact(stages, tmp_path):
    # FSDP2: the checkpoint gathers full tensors and every rank's generator state
    common = ["sft", "--task", "arithmetic", "--run.parallel", "fsdp", "--run.eval_every", "0",
              "--eval.generate_samples", "4", "--optim.schedule", "constant",
              "--optim.warmup_steps", "0"]
    torchrun(2, [*common, "--run.name", "straight", "--run.steps", "4"], tmp_path, stages)
    torchrun(2, [*common, "--run.name", "resumed", "--run.steps", "2"], tmp_path, stages)
    out = torchrun(2, [*common, "--run.name", "resumed", "--run.steps", "4", "--resume"],
                   tmp_path, stages)
    assert "resumed from" in out
    straight, resumed = tmp_path / "out" / "straight", tmp_path / "out" / "resumed"
    assert losses(resumed, "train/loss") == losses(straight, "train/loss")
    assert_same_weights(straight / "final", resumed / "final", atol=0.0)


def test_async_rollouts_under_ddp(stages, tmp_path):
    # one worker per rank, sampling its rank's share: with max_staleness 0 the run is the
    # synchronous 2-rank run exactly (k = 1 under DDP was checked by hand: staleness 0, 1, 1)
    args = ["rl", "--preset", "grpo", *RL]
    torchrun(2, [*args, "--run.name", "sync"], tmp_path, stages)
    torchrun(2, [*args, "--run.name", "k0", "--rollout.async", "true",
                 "--rollout.max_staleness", "0"], tmp_path, stages)
    out = tmp_path / "out"
    assert_same_weights(out / "sync" / "final", out / "k0" / "final", atol=0.0)
    assert losses(out / "k0", "loss/policy") == losses(out / "sync", "loss/policy")
    assert losses(out / "k0", "async/staleness") == [0.0, 0.0, 0.0]


def test_episodes_two_processes_equal_one(stages, tmp_path):
    # multi-turn episodes: each rank plays its share of the prompts' episodes, seeded by the
    # prompts' positions, so the two runs see the same episodes
    env = f"{os.path.dirname(__file__)}/trainers/user_envs.py:SecondTry"
    compare(["rl", "--preset", "grpo", *RL, "--rollout.environment", env,
             "--rollout.max_turns", "2", "--reward.terms", "[]"], "episodes", "loss/policy",
            tmp_path, stages)
    rows = [json.loads(line) for line in (tmp_path / "out" / "episodes2" / "metrics.jsonl").open()]
    assert all(1 <= r["episode/turns"] <= 2 for r in rows if "episode/turns" in r)
