"""RL on multi-turn episodes (rollout.environment, ALGORITHMS.md 6d), on the arithmetic task
with a second chance (tests/trainers/user_envs.py: a wrong first answer is told "no").

- a batch's observation tokens are context only: masked from the loss, with no advantage,
  and each turn's reward sits at that turn's last token;
- every preset trains on episodes;
- resume is exact.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from posttrain import pipeline
from posttrain.config import merge
from posttrain.trainers.rl import RLTrainer
from tests.trainers.test_async import config, rows, same_weights, weights
from tests.trainers.test_rl import SPEC_PRESETS

ENV = {"rollout": {"environment": "tests.trainers.user_envs:SecondTry", "max_turns": 2},
       "reward": {"terms": []}}


@pytest.fixture(scope="module")
def sft(arithmetic_dir):
    pipeline.ensure_sft(arithmetic_dir)
    return arithmetic_dir


def test_an_episode_batch_masks_its_observations_and_rewards_each_turn(sft, tmp_path):
    trainer = RLTrainer(config(sft, "grpo", tmp_path, "batch", **ENV))
    exp, metrics = trainer.collect()
    exp = trainer.advantages(trainer.shape(exp))
    tok = trainer.tokenizer
    observation = tok("<|user|>no<|assistant|>", add_special_tokens=False)["input_ids"]
    seen_second = 0
    for i in range(len(exp)):
        real = exp.attention_mask[i, -exp.response_len:]
        body = exp.response_ids[i][real].tolist()
        policy = exp.response_mask[i][real].tolist()
        turns = exp.meta["episode"][i]
        if len(turns) == 1:  # right at once, or cut off
            assert all(policy)
            continue
        seen_second += 1
        first = policy.index(False)
        # the observation's ids, exactly, and nothing else, are the masked ones
        assert body[first: first + len(observation)] == observation
        assert policy == [True] * first + [False] * len(observation) + \
            [True] * (len(body) - first - len(observation))
        assert body[first - 1] == tok.eos_token_id  # the first turn kept its end token
        # no advantage and no reward on the observation; the first turn's reward (0) at its
        # end, the second's at the last token
        obs = ~exp.response_mask[i] & exp.attention_mask[i, -exp.response_len:]
        assert (exp.advantages[i][obs] == 0).all() and (exp.token_rewards[i][obs] == 0).all()
        assert exp.token_rewards[i, first - 1] == 0
        last = int(torch.nonzero(exp.response_mask[i]).max())
        assert exp.token_rewards[i, last] == exp.scores[i]
    assert seen_second > 0  # the SFT model is often wrong the first time
    assert 1 < metrics["episode/turns"] <= 2
    assert metrics["episode/tool_calls"] == 0


@pytest.mark.parametrize("preset", sorted(SPEC_PRESETS))
def test_every_preset_trains_on_episodes(sft, tmp_path, preset):
    pretrain = {"algo": {"value_pretrain_steps": 1}} if preset in ("vapo", "vc_ppo") else {}
    cfg = config(sft, preset, tmp_path, preset, **merge(merge(ENV, {"run": {"steps": 2}}),
                                                        pretrain))
    result = RLTrainer(cfg).train()
    assert result.status == "finished"
    train_rows = [r for r in rows(result.run_dir) if "episode/turns" in r]
    assert len(train_rows) == 2 and all(1 <= r["episode/turns"] <= 2 for r in train_rows)
    trained = weights(result.run_dir)
    start = load_file(pipeline.ensure_sft(sft) / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in trained.values())
    assert not same_weights(trained, start)
    sample = json.loads((result.run_dir / "samples.jsonl").open().readline())
    assert sample["turns"][0]["role"] == "assistant"
    assert len(sample["turn_rewards"]) == sum(t["role"] == "assistant"
                                              for t in sample["turns"])


def test_resume_on_episodes_is_exact(sft, tmp_path):
    straight = RLTrainer(config(sft, "grpo", tmp_path, "straight", **ENV)).train()
    over = merge(ENV, {"run": {"save_every": 2}})
    first = RLTrainer(config(sft, "grpo", tmp_path, "resumed", **over))

    def interrupt(trainer, step, metrics):
        if step == 3:
            raise KeyboardInterrupt

    first.callbacks.append(interrupt)
    with pytest.raises(KeyboardInterrupt):
        first.train()
    resumed = RLTrainer(config(sft, "grpo", tmp_path, "resumed",
                               **merge(over, {"run": {"resume": True}}))).train()
    assert resumed.steps_done == 4
    assert same_weights(weights(resumed.run_dir), weights(straight.run_dir))
    assert rows(resumed.run_dir) == rows(straight.run_dir)
