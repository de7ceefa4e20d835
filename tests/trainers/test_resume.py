"""Exact resume for the trainers whose resume test_loop.py (SFT), test_rl.py (PPO) and
test_distributed.py (FSDP SFT) do not cover: DPO, the reward model and GRPO.

Each trainer is run twice, four steps each: straight through, and stopped by SIGINT (as a
user's Ctrl-C) after step 2, then resumed from its checkpoint. The resumed run must end on the
straight run's weights bit for bit (and, for RL, on its KL coefficient and prompt cursor),
with no step logged twice. Warm-up and a cosine schedule make the scheduler state matter.
"""

from __future__ import annotations

import json
import os
import signal

import torch

from posttrain import pipeline
from posttrain.config import load_config, merge
from posttrain.trainers.dpo import DPOConfig, DPOTrainer
from posttrain.trainers.reward import RewardModelTrainer, RMConfig
from posttrain.trainers.rl import RLTrainer
from tests.conftest import QUIET
from tests.trainers.test_rl import rl_config

STEPS, STOP = 4, 2


def interrupt_after(stop):
    def callback(trainer, step, metrics):
        if step == stop:
            os.kill(os.getpid(), signal.SIGINT)

    return callback


def straight_and_resumed(make):
    """`make(name, resume)` builds a trainer; returns the (straight, resumed) trainers after
    checking that the stopped run really stopped at STOP and the resumed one began there."""
    straight = make("straight", False)
    assert straight.train().status == "finished"
    stopped = make("stopped", False)
    stopped.callbacks.append(interrupt_after(STOP))
    result = stopped.train()
    assert result.status == "interrupted" and result.steps_done == STOP
    at_stop = {k: v.clone() for k, v in stopped.model.state_dict().items()}
    resumed = make("stopped", True)
    assert resumed.train().steps_done == STEPS
    steps = [r["step"] for r in map(json.loads, (resumed.run_dir / "metrics.jsonl").open())
             if "train/loss" in r]
    assert steps == list(range(1, STEPS + 1))  # no step logged twice, none lost
    # steps 3-4 changed the weights, so equality below is the resume's doing, not a no-op
    assert any(not torch.equal(at_stop[k], v) for k, v in straight.model.state_dict().items())
    return straight, resumed


def assert_equal_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def preference_config(kind, task_dir, out, name, resume, **over):
    """DPO or RM on the preference task's pairs, from the task's untrained tiny model (no SFT
    needed: resume is about the loop's state, not the starting point)."""
    files = pipeline.task_info(task_dir)["files"]
    base = {"model": {"path": str(task_dir / "model")},
            "data": {"train": str(task_dir / files["pref_train"]["path"]), "limit": 64,
                     "eval_fraction": 0},
            "optim": {"lr": 1e-3, "warmup_steps": 2, "schedule": "cosine"},
            "run": {**QUIET["run"], "output_dir": str(out), "name": name, "steps": STEPS,
                    "batch_size": 8, "resume": resume}}
    return load_config(kind, overrides=merge(base, over))


def test_dpo_resume_is_exact(preference_dir, tmp_path):
    def make(name, resume):
        return DPOTrainer(preference_config(DPOConfig, preference_dir, tmp_path, name, resume))

    straight, resumed = straight_and_resumed(make)
    assert_equal_weights(straight.model, resumed.model)


def test_reward_model_resume_is_exact(preference_dir, tmp_path):
    def make(name, resume):
        return RewardModelTrainer(preference_config(RMConfig, preference_dir, tmp_path, name,
                                                    resume))

    straight, resumed = straight_and_resumed(make)
    assert_equal_weights(straight.model, resumed.model)  # backbone and scalar head
    # the normalisation offset is computed from the final weights, so it agrees exactly too
    assert straight.model.config.reward_offset == resumed.model.config.reward_offset


def test_grpo_resume_is_exact(arithmetic_dir, arithmetic_sft_model, tmp_path):
    # An adaptive KL controller with a short horizon, so that β moves at every step and its
    # state has to survive the resume (GRPO's preset β is fixed).
    over = {"run": {"steps": STEPS, "eval_every": 0, "log_every": 1}, "eval": {"prompts": 4},
            "rollout": {"prompts_per_step": 2, "samples_per_prompt": 4},
            "optim": {"warmup_steps": 2, "schedule": "cosine"},
            "algo": {"kl_controller": "adaptive", "kl_target": 0.01, "kl_horizon": 50}}

    def make(name, resume):
        return RLTrainer(rl_config(arithmetic_dir, "grpo", tmp_path,
                                   **merge(over, {"run": {"name": name, "resume": resume}})))

    straight, resumed = straight_and_resumed(make)
    assert_equal_weights(straight.model, resumed.model)
    assert straight.kl_ctl.value != 0.04  # β moved, so comparing it means something
    assert resumed.kl_ctl.state_dict() == straight.kl_ctl.state_dict()
    # 4 steps x 2 prompts; a cursor restarted at 0 would end at 4
    assert resumed.prompt_cursor == straight.prompt_cursor == STEPS * 2
