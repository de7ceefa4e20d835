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
from posttrain.config import load_config, merge
from posttrain.data.collate import encode_prompt
from posttrain.tasks.multiturn import opening_probabilities, opening_scores
from posttrain.tasks.registry import make_task
from posttrain.trainers.rl import RLConfig, RLTrainer
from tests.conftest import QUIET
from tests.trainers.test_async import config, rows, same_weights, weights
from tests.trainers.test_rl import SPEC_PRESETS

ENV = {"rollout": {"environment": "tests.trainers.user_envs:SecondTry", "max_turns": 2},
       "reward": {"terms": []}}


@pytest.fixture(scope="module")
def sft(arithmetic_dir):
    pipeline.ensure_sft(arithmetic_dir)
    return arithmetic_dir


@pytest.mark.parametrize("engine", ["lean", "hf"])  # vllm: test_vllm_runs.py
def test_an_episode_batch_masks_its_observations_and_rewards_each_turn(sft, tmp_path, engine):
    trainer = RLTrainer(config(sft, "grpo", tmp_path, "batch",
                               **merge(ENV, {"rollout": {"engine": engine}})))
    check_episode_batch(trainer, *trainer.collect())


def check_episode_batch(trainer, exp, metrics):
    """A SecondTry batch: the observation's ids exactly are masked, with no advantage or
    reward; each turn's reward at its last token (the engine's test_vllm_runs uses it too)."""
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


# --- learning on the built-in multi-turn tasks (docs/results.md has the full runs) -----------


def short_sft(pipeline_root, name, steps=500):
    """A task's SFT start, shorter than the pipeline's (its loss has flattened by then)."""
    task = pipeline.ensure_task(name, pipeline_root)
    pipeline.ensure_sft(task, merge(QUIET, {"run": {"steps": steps, "eval_every": 0}}))
    return task


def grpo(task, tmp_path, steps, **over) -> RLTrainer:
    p = pipeline.load_preset("grpo")
    run = {**QUIET["run"], "output_dir": str(tmp_path), "name": "learn", "steps": steps,
           "eval_every": steps, "log_every": 5}
    return RLTrainer(load_config(RLConfig, overrides=merge(merge(p, pipeline.rl_base(task, p)),
        merge({"run": run, "eval": {"prompts": 64, "samples_per_prompt": 2}}, over))))


def learn(task, tmp_path, steps, **over):
    result = grpo(task, tmp_path, steps, **over).train()
    evals = [r for r in rows(result.run_dir) if "eval/reward" in r]
    assert [r["step"] for r in evals] == [0, steps]
    return evals


@pytest.mark.slow
def test_grpo_learns_to_call_the_calculator_and_copy_its_result(pipeline_root, tmp_path):
    start, end = learn(short_sft(pipeline_root, "calculator"), tmp_path, steps=20)
    # The SFT policy's greedy answer is a guess (60% of its demonstrations), always wrong;
    # its samples call the tool about 40% of the time. Measured after 20 steps: greedy 0.80,
    # every greedy episode calls the tool, sampled success 0.22 -> 0.47 (64 prompts x 2).
    assert start["eval/reward"] < 0.1 and start["eval/episode_tool_calls"] < 0.1
    assert 0.2 < start["eval/episode_tool_calls_sampled"] < 0.7
    assert end["eval/reward"] > 0.5 and end["eval/episode_tool_calls"] > 0.9
    assert end["eval/episode_tool_calls_sampled"] > start["eval/episode_tool_calls_sampled"] + 0.2
    assert end["eval/reward_sampled"] > start["eval/reward_sampled"] + 0.12


@pytest.mark.slow
def test_grpo_moves_the_guessing_games_opening_toward_the_middle(pipeline_root, tmp_path):
    # The game shrunk to 1..8 in 4 turns so that SFT takes 300 steps (the pipeline's 1..16 in
    # 6 needs 1000 and GRPO 100 steps to show, docs/results.md). Its demonstrator opens at
    # random; bisection would open with 4 or 5. What is measured is exact, not sampled: the
    # opening's expected score under the demonstrator's play after it.
    n = 8
    task = make_task("guess", pipeline_root / "guess_small", max_number=n, max_turns=4,
                     n_sft=2000)
    pipeline.ensure_sft(task, merge(QUIET, {"run": {"steps": 300, "eval_every": 0}}))
    trainer = grpo(task, tmp_path, 20, optim={"lr": 1e-3})
    scores = opening_scores(n, 4)
    # the opening is measured on the prompt as the trainer renders it
    assert trainer.eval_items[0][0] == encode_prompt(
        [{"role": "user", "content": f"guess 1-{n}"}], trainer.tokenizer)
    before = opening_probabilities(trainer.model, trainer.tokenizer, n)
    trainer.train()
    after = opening_probabilities(trainer.model, trainer.tokenizer, n)

    def expected(p):
        return sum(a * v for a, v in zip(p, scores, strict=True)) / sum(p)

    assert all(sum(p) > 0.99 for p in (before, after))  # the first turn is a number in 1..n
    # Measured at seeds 0, 1, 2 (scripts/measure_results.py guess_opening, docs/results.md):
    # opening score 0.482 -> 0.506, 0.484 -> 0.509, 0.486 -> 0.508 (random 0.483, the best
    # 0.547); the ends (1 and 8) 0.25 -> 0.07, 0.24 -> 0.10, 0.23 -> 0.08.
    assert abs(expected(before) - sum(scores) / n) < 0.01, before  # SFT opens at random
    assert expected(after) > expected(before) + 0.015, (before, after)
    assert after[0] + after[-1] < 0.7 * (before[0] + before[-1]), (before, after)
