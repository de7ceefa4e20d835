"""RL with `rollout.engine: vllm`, colocated and through a rollout server in a second
process: GRPO and PPO learn the bandit of test_rl_learns_fast (the probability of "7" as the
first answer token, measured exactly by a forward pass), the engine/trainer mismatch is
measured and token TIS is on by default; multi-turn episodes train the ids vLLM sampled."""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
import time

import pytest
import torch

from posttrain.config import merge
from posttrain.trainers.rl import RLTrainer
from tests.trainers.test_async import config
from tests.trainers.test_episode_runs import ENV, check_episode_batch
from tests.trainers.test_rl import rl_config, rows_of
from tests.trainers.test_rl_learns_fast import p_seven


def run(arithmetic_dir, tmp_path, preset, name, steps=10, **rollout):
    cfg = rl_config(arithmetic_dir, preset, tmp_path,
                    run={"name": name, "steps": steps, "eval_every": 0, "log_every": 1},
                    rollout={"prompts_per_step": 8, "samples_per_prompt": 8, "engine": "vllm",
                             **rollout},
                    optim={"lr": 1e-3}, eval={"prompts": 32, "samples_per_prompt": 0},
                    algo={"kl_placement": "none", "mini_batches": 1},
                    reward={"terms": ["tests.trainers.user_rewards:starts_with_seven"]})
    trainer = RLTrainer(cfg)
    before = p_seven(trainer)
    try:
        trainer.train()
    finally:
        if hasattr(trainer.engine, "close"):
            trainer.engine.close()
    return trainer, before, p_seven(trainer), rows_of(tmp_path / name)


def check_mismatch(trainer, rows):
    """vLLM's float32 kernels round differently from transformers': μ and π_old differ by
    ~1e-6, measured and corrected (TIS weights ~1), never by a policy's worth."""
    assert not trainer.engine_is_trainer and trainer.is_correction == "tis"
    rows = [r for r in rows if "mismatch/abs_logp_max" in r]
    assert len(rows) == trainer.step
    for row in rows:
        assert 0 < row["mismatch/abs_logp_max"] < 1e-3, row
        assert abs(row["mismatch/weight_mean"] - 1) < 1e-3 and row["mismatch/outside"] == 0


def test_grpo_learns_on_vllm_with_its_mismatch_measured(vllm_installed, arithmetic_dir,
                                                       arithmetic_sft_model, tmp_path):
    trainer, before, after, rows = run(arithmetic_dir, tmp_path, "grpo", "vllm-grpo")
    assert after > before + 0.3, (before, after)  # as on the lean engine
    check_mismatch(trainer, rows)


def test_ppo_learns_on_vllm(vllm_installed, arithmetic_dir, arithmetic_sft_model, tmp_path):
    trainer, before, after, rows = run(arithmetic_dir, tmp_path, "ppo", "vllm-ppo")
    assert after > before + 0.05, (before, after)
    check_mismatch(trainer, rows)


@pytest.fixture
def server(vllm_installed, arithmetic_dir, arithmetic_sft_model, tmp_path):
    """`posttrain rollout-server` in a second process, on a free loopback port (its output
    goes to a file: a pipe nobody reads would block it once full)."""
    log = tmp_path / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "posttrain", "rollout-server", "--model",
             str(arithmetic_sft_model), "--port", "0", "--max-model-len", "128"],
            stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (found := re.search(r"listening on (http://\S+)", log.read_text())):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the rollout server did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield found.group(1)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_grpo_learns_through_a_rollout_server(server, arithmetic_dir, tmp_path):
    trainer, before, after, rows = run(arithmetic_dir, tmp_path, "grpo", "server-grpo",
                                       server=server)
    assert type(trainer.engine).__name__ == "RemoteVLLMEngine"
    assert after > before + 0.3, (before, after)
    check_mismatch(trainer, rows)


TIMED = ("time", "perf/", "async/trainer_wait", "async/sample_seconds", "async/worker_idle")


def test_an_async_vllm_worker_at_staleness_zero_is_the_colocated_run(
        vllm_installed, arithmetic_dir, arithmetic_sft_model, tmp_path):
    """The worker's vLLM engine gets the same weights and per-prompt seeds as the colocated
    one, so k = 0 trains on the same samples: the same metrics (evaluation included, which
    the worker serves) and the same weights, bit for bit."""
    colocated = run(arithmetic_dir, tmp_path, "grpo", "vllm-colocated", steps=3)
    k0 = run(arithmetic_dir, tmp_path, "grpo", "vllm-async-k0", steps=3,
             **{"async": True, "max_staleness": 0})
    assert type(k0[0].engine).__name__ == "WorkerEngine" and k0[0].worker is None  # closed
    assert k0[1] == colocated[1] and k0[2] == colocated[2]  # p("7") before and after

    def strip(rows):
        return [{k: v for k, v in r.items() if not k.startswith(TIMED)} for r in rows]
    async_rows = strip(k0[3])
    assert all(r.get("async/staleness", 0) == 0 for r in async_rows)
    assert [{k: v for k, v in r.items() if not k.startswith("async/")} for r in async_rows] \
        == strip(colocated[3])
    a, b = colocated[0].model.state_dict(), k0[0].model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_grpo_learns_from_an_async_vllm_worker_one_step_stale(
        vllm_installed, arithmetic_dir, arithmetic_sft_model, tmp_path):
    trainer, before, after, rows = run(arithmetic_dir, tmp_path, "grpo", "vllm-async-k1",
                                       **{"async": True, "max_staleness": 1})
    assert after > before + 0.3, (before, after)
    assert trainer.is_correction == "tis" and trainer._stale_correction == "tis"
    steps = [r for r in rows if "async/staleness" in r]
    assert [r["async/staleness"] for r in steps] == [0.0] + [1.0] * (len(steps) - 1)
    assert all(r["async/dropped_batches"] == 0 for r in steps)
    # a stale batch is weighted by π_old/μ: one step of policy change, not vLLM's rounding
    assert max(r["mismatch/abs_logp_max"] for r in steps[1:]) > 1e-3


def test_episodes_on_vllm_train_the_ids_vllm_sampled(vllm_installed, arithmetic_dir,
                                                     arithmetic_sft_model, tmp_path):
    """Multi-turn episodes (issue 18) on the vLLM engine: every policy turn in the batch is,
    id for id, what vLLM sampled for that turn's context (prompt, earlier turns and rendered
    observations); observations are masked as on the lean engine; two GRPO steps train."""
    cfg = config(arithmetic_dir, "grpo", tmp_path, "vllm-episodes",
                 **merge(ENV, {"rollout": {"engine": "vllm"}, "run": {"steps": 2}}))
    trainer = RLTrainer(cfg)
    # what vLLM sampled for each context (a prompt's episodes share their first context)
    sampled: dict[tuple[int, ...], list[list[int]]] = {}
    generate = trainer.engine.generate

    def recording(prompt_ids, sampling, *args, **kwargs):
        exp = generate(prompt_ids, sampling, *args, **kwargs)
        for row, context in enumerate(prompt_ids):
            sampled.setdefault(tuple(context), []).append(
                exp.response_ids[row][exp.response_mask[row]].tolist())
        return exp

    trainer.engine.generate = recording
    try:
        exp, metrics = trainer.collect()
        assert metrics["episode/turns"] > 1
        turns_checked = 0
        for i in range(len(exp)):
            t = exp.response_len
            prompt = exp.input_ids[i, :-t][exp.attention_mask[i, :-t]].tolist()
            real = exp.attention_mask[i, -t:]
            body = exp.response_ids[i][real].tolist()
            policy = exp.response_mask[i][real].tolist()
            start = 0
            for is_policy, run in itertools.groupby(policy):  # a run of policy tokens: a turn
                end = start + len(list(run))
                if is_policy:  # whole, or cut at the episode's token limit
                    n = end - start
                    assert any(body[start:end] == turn[:n] and (n == len(turn) or end == len(body))
                               for turn in sampled[tuple(prompt + body[:start])])
                    turns_checked += 1
                start = end
        assert turns_checked > len(exp)  # second turns were checked too
        check_episode_batch(trainer, exp, metrics)
        trainer.engine.generate = generate
        result = trainer.train()
    finally:
        if hasattr(trainer.engine, "close"):
            trainer.engine.close()
    assert result.status == "finished" and result.steps_done == 2
