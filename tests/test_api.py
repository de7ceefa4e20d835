"""The Python API (`posttrain.sft/rm/dpo/kto/rl`, `posttrain.build`): SFT, DPO and GRPO trained
from Python in a few lines on the built-in tasks, learning what they should; objects (a model,
a dataset, a reward function, an environment class) taking the place of paths; the CLI's
errors raised as exceptions."""

from __future__ import annotations

import json

import datasets
import pytest
import yaml

import posttrain
from posttrain.config import load_config
from posttrain.errors import ConfigError, DataError
from posttrain.rewards.combine import load_reward_function
from posttrain.rollout.environment import Environment, Step, load_environment
from posttrain.trainers.sft import SFTConfig
from tests.conftest import QUIET


def rows_of(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]


def evals(rows, key):
    return [(r["step"], r[key]) for r in rows if key in r]


def records(path, n=None):
    lines = path.read_text().splitlines()[:n]
    return [json.loads(line) for line in lines]


@pytest.fixture
def tasks_here(pipeline_root, monkeypatch):
    """`task=NAME` finds the session's tasks (and their trained stages)."""
    monkeypatch.setenv("POSTTRAIN_TASKS", str(pipeline_root))
    return pipeline_root


def test_sft_from_python_with_a_model_object_and_a_dataset(arithmetic_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(arithmetic_dir / "model")
    tokenizer = AutoTokenizer.from_pretrained(arithmetic_dir / "model")
    train = datasets.Dataset.from_list(records(arithmetic_dir / "sft_train.jsonl"))
    held_out = records(arithmetic_dir / "sft_eval.jsonl", 64)

    result = posttrain.sft(model=model, tokenizer=tokenizer, train_dataset=train,
                           eval_dataset=held_out,
                           config={"optim.lr": 3e-3, "run": {**QUIET["run"], "steps": 60,
                                   "eval_every": 60, "batch_size": 32,
                                   "output_dir": str(tmp_path), "name": "sft"}})

    assert result.status == "finished" and result.steps_done == 60
    assert result.final_dir == tmp_path / "sft" / "final"
    nll = evals(rows_of(result.run_dir), "eval/nll")
    # the untrained tiny model starts near log(vocabulary); 60 steps learn the format
    assert nll[0][0] == 0 and nll[-1][0] == 60
    assert nll[-1][1] < nll[0][1] - 1.0, nll
    assert result.eval_metrics["eval/nll"] == pytest.approx(nll[-1][1])
    # what the run read is what it was given, as JSON lines in its directory
    cfg = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert cfg["model"]["path"] == str(tmp_path / "sft" / "start_model")
    assert records(result.run_dir / "data" / "train.jsonl") == train.to_list()
    assert records(result.run_dir / "data" / "eval.jsonl") == held_out
    # the final model is a standard HF directory
    assert AutoModelForCausalLM.from_pretrained(result.final_dir).config.vocab_size == \
        model.config.vocab_size


def test_dpo_from_python_on_the_preference_task(tasks_here, preference_dir, tmp_path):
    pairs = records(preference_dir / "pref_train.jsonl")
    result = posttrain.dpo(task="preference", train_dataset=pairs,
                           config={"optim": {"lr": 1e-3}, "eval": {"reward": None},
                                   "run": {**QUIET["run"], "steps": 40, "eval_every": 40,
                                           "output_dir": str(tmp_path)}})
    rows = rows_of(result.run_dir)
    margin, accuracy = evals(rows, "eval/margin"), evals(rows, "eval/accuracy")
    # the policy starts as its reference (margin 0); DPO opens the held-out margin
    assert margin[0] == (0, 0.0) and margin[-1][0] == 40
    assert margin[-1][1] > 0.1, margin
    assert accuracy[-1][1] > accuracy[0][1] + 0.05, accuracy


def test_grpo_from_python_with_a_reward_written_in_the_notebook(
        tasks_here, arithmetic_dir, arithmetic_sft_model, tmp_path):
    calls = []

    def answer_starts_with_seven(prompts, completions, **kwargs):  # TRL's form, a closure
        calls.append(len(completions))
        return [1.0 if c.startswith("7") else 0.0 for c in completions]

    prompts = datasets.Dataset.from_list(records(arithmetic_dir / "rl_train.jsonl"))
    result = posttrain.rl(
        preset="grpo", model=str(arithmetic_sft_model), train_dataset=prompts,
        eval_dataset=records(arithmetic_dir / "rl_eval.jsonl", 32),
        rewards=[answer_starts_with_seven],
        config={"algo": {"kl_placement": "none", "mini_batches": 1}, "optim.lr": 1e-3,
                "rollout": {"prompts_per_step": 8, "samples_per_prompt": 8,
                            "max_new_tokens": 4},
                "eval": {"prompts": 32, "samples_per_prompt": 0},
                "run": {**QUIET["run"], "steps": 10, "eval_every": 10,
                        "output_dir": str(tmp_path), "name": "grpo"}})
    assert result.status == "finished" and calls
    reward = evals(rows_of(result.run_dir), "eval/reward")
    # greedy answers starting with 7: few from the SFT model, most after 10 GRPO steps
    # (the fast learning check, tests/trainers/test_rl_learns_fast.py, on the same bandit)
    assert reward[0][0] == 0 and reward[-1][0] == 10
    assert reward[-1][1] > reward[0][1] + 0.3, reward
    # the closure is reached by its name in this process, and named so in the config
    spec = yaml.safe_load((result.run_dir / "config.yaml").read_text())["reward"]["terms"][0]
    assert spec["name"] == "answer_starts_with_seven"
    assert spec["function"].startswith("posttrain.api:registered.answer_starts_with_seven_")
    assert load_reward_function(spec["function"]) is answer_starts_with_seven


def test_objects_an_import_finds_are_written_by_module_and_name(tasks_here, arithmetic_dir,
                                                                arithmetic_sft_model, tmp_path):
    from tests.trainers.user_envs import SecondTry
    from tests.trainers.user_rewards import short_answers

    class Local(Environment):  # only this process knows it
        def step(self, text):
            return Step(done=True, reward=0.0)

    over = {"run": {**QUIET["run"], "output_dir": str(tmp_path)}}
    trainer = posttrain.build("rl", preset="grpo", task="arithmetic", rewards=[short_answers],
                              environment=SecondTry, overrides=over)
    assert trainer.config.reward.terms == [
        {"name": "short_answers", "function": "tests.trainers.user_rewards:short_answers"}]
    assert trainer.config.rollout.environment == "tests.trainers.user_envs:SecondTry"
    assert trainer.config.preset == "grpo" and trainer.config.algo.advantage == "grpo"
    trainer = posttrain.build("rl", preset="grpo", task="arithmetic", environment=Local,
                              rewards=[{"function": short_answers, "weight": 0.5}],
                              overrides=over)
    assert load_environment(trainer.config.rollout.environment) is Local
    assert trainer.config.reward.terms[0]["weight"] == 0.5
    # the same function again is the same name, not a second entry
    again = posttrain.build("rl", preset="grpo", task="arithmetic", environment=Local,
                            overrides=over)
    assert again.config.rollout.environment == trainer.config.rollout.environment


def test_a_config_object_a_yaml_file_and_a_mapping_give_one_config(arithmetic_dir, tmp_path):
    values = {"model": {"path": str(arithmetic_dir / "model")},
              "data": {"train": str(arithmetic_dir / "sft_train.jsonl")},
              "optim": {"lr": 2e-3}, "run": {**QUIET["run"], "steps": 3,
                                              "output_dir": str(tmp_path)}}
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(values))
    expected = load_config(SFTConfig, path)
    from_file = posttrain.build("sft", path).config
    from_mapping = posttrain.build("sft", values).config
    from_object = posttrain.build("sft", expected).config
    dotted = posttrain.build("sft", {**values, "optim.lr": 2e-3, "optim": {}}).config
    assert from_file == from_mapping == from_object == dotted == expected
    # overrides are the last layer, over a config object too
    assert posttrain.build("sft", expected, overrides={"run.steps": 5}).config.run.steps == 5


def test_errors_are_the_clis_one_line_messages(arithmetic_dir, tmp_path):
    base = {"model": {"path": str(arithmetic_dir / "model")},
            "run": {**QUIET["run"], "output_dir": str(tmp_path)}}
    with pytest.raises(ConfigError, match=r"unknown config key 'optim\.lrr'; did you mean "
                                          r"'optim\.lr'"):
        posttrain.build("sft", {**base, "optim.lrr": 1e-3,
                                "data": {"train": str(arithmetic_dir / "sft_train.jsonl")}})
    with pytest.raises(ConfigError, match="preset is for rl only"):
        posttrain.sft(base, preset="grpo")
    with pytest.raises(ConfigError, match="unknown trainer 'ppo'"):
        posttrain.train("ppo")
    with pytest.raises(DataError, match=r"train_dataset\[1\]: a value JSON cannot hold"):
        posttrain.build("sft", base, train_dataset=[{"text": "a"}, {"text": object()}])
    with pytest.raises(ConfigError, match="a model object needs its tokenizer"):
        from transformers import AutoModelForCausalLM

        posttrain.build("sft", base, model=AutoModelForCausalLM.from_pretrained(
            arithmetic_dir / "model"), train_dataset=[{"text": "a"}])
    with pytest.raises(ConfigError, match="give a preset or task, or a config object"):
        cfg = load_config(SFTConfig, overrides={**base, "data": {"train": "x.jsonl"}})
        posttrain.build("sft", cfg, task="arithmetic")
    # a data error inside the written records names their file and line
    with pytest.raises(DataError, match=r"data/train\.jsonl line 2"):
        posttrain.build("sft", base, train_dataset=[{"prompt": "1+1=", "completion": "2"},
                                                    {"prompt": "2+2="}])


def test_records_go_to_the_run_directory_the_layers_give(tasks_here, arithmetic_dir, tmp_path):
    # the task names a run directory (its own sft/); the file, a later layer, another
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump({"run": {**QUIET["run"], "output_dir": str(tmp_path),
                                            "name": "from-yaml"}}))
    rows = records(arithmetic_dir / "sft_train.jsonl", 20)
    trainer = posttrain.build("sft", path, task="arithmetic", train_dataset=rows)
    assert trainer.config.data.train == str(tmp_path / "from-yaml" / "data" / "train.jsonl")
    # overrides win over the file
    trainer = posttrain.build("sft", path, task="arithmetic", train_dataset=rows,
                              overrides={"run.name": "over"})
    assert trainer.config.data.train == str(tmp_path / "over" / "data" / "train.jsonl")
    assert records(tmp_path / "over" / "data" / "train.jsonl") == rows
