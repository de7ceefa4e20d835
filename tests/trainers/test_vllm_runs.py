"""RL with `rollout.engine: vllm`, colocated and through a rollout server in a second
process: GRPO and PPO learn the bandit of test_rl_learns_fast (the probability of "7" as the
first answer token, measured exactly by a forward pass), the engine/trainer mismatch is
measured and token TIS is on by default."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from posttrain.trainers.rl import RLTrainer
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
