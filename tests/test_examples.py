"""The worked examples in examples/ stay valid, and run (briefly) as the README says."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from posttrain import pipeline
from posttrain.config import load_config
from posttrain.trainers.dpo import DPOConfig
from posttrain.trainers.kto import KTOConfig
from posttrain.trainers.reward import RMConfig
from posttrain.trainers.rl import RLConfig
from posttrain.trainers.sft import SFTConfig
from tests.conftest import QUIET

EXAMPLES = Path(__file__).parent.parent / "examples"
CONFIGS = {"sft.yaml": SFTConfig, "sft_preference.yaml": SFTConfig, "rm.yaml": RMConfig,
           "dpo.yaml": DPOConfig, "rl_grpo.yaml": RLConfig, "rl_ppo_rm.yaml": RLConfig,
           "rl_custom_reward.yaml": RLConfig, "kto.yaml": KTOConfig}


def test_every_example_config_is_listed_here():
    assert {p.name for p in EXAMPLES.glob("*.yaml")} == set(CONFIGS)


README = (EXAMPLES / "README.md").read_text()
# `posttrain COMMAND --config examples/NAME.yaml` in the README's order
README_RUNS = re.findall(r"^posttrain (\w+) +--config examples/(\S+\.yaml)", README, re.M)
COMMANDS = {"sft": SFTConfig, "rm": RMConfig, "dpo": DPOConfig, "kto": KTOConfig,
            "rl": RLConfig}


def example(name):
    return load_config(CONFIGS[name], EXAMPLES / name, preset_dir=pipeline.preset_dir())


def strings(node):
    """Every string value of a parsed YAML file."""
    if isinstance(node, dict):
        for v in node.values():
            yield from strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v)
    elif isinstance(node, str):
        yield node


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_example_configs_validate(name):
    assert example(name).run.name.startswith("example-")


def test_the_readme_runs_every_example_with_the_trainer_of_its_kind():
    assert sorted(name for _, name in README_RUNS) == sorted(CONFIGS)
    for command, name in README_RUNS:
        assert CONFIGS[name] is COMMANDS[command], (command, name)


def test_examples_read_the_task_files_and_the_runs_the_readme_makes_before_them(
        arithmetic_dir, preference_dir):
    # `posttrain tasks make NAME --out data/NAME`: the files a task writes, as the fixtures
    # write them with the same task makers
    made = dict(re.findall(r"^posttrain tasks make (\w+) --out (\S+)", README, re.M))
    assert made == {"arithmetic": "data/arithmetic", "preference": "data/preference"}
    task_dirs = {"data/arithmetic": arithmetic_dir, "data/preference": preference_dir}
    order = [name for _, name in README_RUNS]
    produced = {f"runs/{example(name).run.name}/final": name for name in order}
    for name in order:
        for value in strings(yaml.safe_load((EXAMPLES / name).read_text())):
            if value.startswith("data/"):
                task, rel = "/".join(value.split("/")[:2]), "/".join(value.split("/")[2:])
                assert (task_dirs[task] / rel).exists(), (name, value)
            elif value.startswith("runs/"):
                # a model another example trains, and it comes earlier in the README
                assert value in produced, (name, value)
                assert order.index(produced[value]) < order.index(name), (name, value)
    # the final `posttrain eval` compares the GRPO policy with the SFT model it started from
    assert "--model runs/example-grpo/final" in README
    assert "--baseline runs/example-sft/final" in README
    assert produced["runs/example-grpo/final"] == "rl_grpo.yaml"
    assert example("rl_grpo.yaml").model.path == "runs/example-sft/final"


def test_each_example_sets_what_its_comment_says(monkeypatch):
    sft = example("sft.yaml")
    assert sft.model.path == "data/arithmetic/model"  # from the task's untrained tiny model
    assert example("sft_preference.yaml").model.path == "data/preference/model"
    rm = example("rm.yaml")
    assert rm.rm.normalize == "train_responses" and rm.rm.margin is None  # `normalize: true`
    dpo = example("dpo.yaml")
    assert (dpo.dpo.variant, dpo.dpo.beta, dpo.dpo.label_smoothing) == ("sigmoid", 0.1, 0.0)
    kto = example("kto.yaml")
    assert (kto.kto.beta, kto.kto.desirable_weight, kto.kto.undesirable_weight) == (0.1, 1, 1)
    for cfg in (dpo, kto):  # judged by the hidden gold scorer, not trained on it
        assert cfg.eval.reward["name"] == "gold"
    grpo = example("rl_grpo.yaml")  # GRPO (the preset) with a verifiable rule reward
    assert grpo.preset == "grpo" and grpo.algo.advantage == "grpo"
    assert grpo.rollout.samples_per_prompt == 8 and grpo.algo.kl_placement == "loss"
    assert grpo.reward.terms == [{"name": "exact_match", "column": "answer"}]
    ppo = example("rl_ppo_rm.yaml")  # InstructGPT: RM reward, RM-initialised critic, KL in
    assert ppo.preset == "ppo" and ppo.algo.advantage == "gae"  # the reward, adaptive β
    assert ppo.algo.critic_init == "reward_model" and ppo.algo.kl_placement == "reward"
    assert ppo.algo.kl_controller == "adaptive" and ppo.algo.kl_coef == 0.1
    assert [t["name"] for t in ppo.reward.terms] == ["reward_model"]
    assert ppo.reward.gold["name"] == "gold"
    custom = example("rl_custom_reward.yaml")  # RLOO with the user's function mixed in
    assert custom.preset == "rloo" and custom.algo.advantage == "rloo"
    from posttrain.rewards.build import build_rewards

    monkeypatch.chdir(EXAMPLES.parent)  # the README runs from here: examples/my_reward.py
    reward = build_rewards(custom.reward.terms, None, "cpu", custom.reward.on_error,
                           custom.reward.error_score)
    # 0.5 x close_answer + 1.0 x exact_match: "85" is right (0.5 + 1), "84" one off
    # (0.5 x 0.9), "x" no number (0)
    got = reward(["37+48="] * 3, ["85", "84", "x"], answer=["85"] * 3)
    assert got == pytest.approx([1.5, 0.45, 0.0])
    # generation lengths are the tasks' answer lengths
    lengths = {"arithmetic": sft.eval.max_new_tokens, "preference": ppo.rollout.max_new_tokens}
    for cfg in (grpo, custom):
        assert cfg.rollout.max_new_tokens == lengths["arithmetic"]
    for cfg in (dpo, kto, example("sft_preference.yaml")):
        assert cfg.eval.max_new_tokens == lengths["preference"]
    assert lengths == {task: d["max_new_tokens"] for task, d in pipeline.TASK_DEFAULTS.items()
                       if task in lengths}


@pytest.mark.slow
def test_the_examples_run_in_order(tmp_path):
    shutil.copytree(EXAMPLES, tmp_path / "examples")
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}

    def posttrain(*args):
        proc = subprocess.run([sys.executable, "-m", "posttrain", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{args}\n{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}"
        return proc.stdout

    quick = ["--run.progress", "none", "--run.eval_every", "0", "--run.steps"]
    posttrain("tasks", "make", "arithmetic", "--out", "data/arithmetic")
    posttrain("tasks", "make", "preference", "--out", "data/preference")
    posttrain("sft", "--config", "examples/sft.yaml", *quick, "20")
    posttrain("sft", "--config", "examples/sft_preference.yaml", *quick, "20")
    posttrain("rm", "--config", "examples/rm.yaml", *quick, "5")
    posttrain("dpo", "--config", "examples/dpo.yaml", *quick, "3", "--eval.prompts", "4")
    posttrain("kto", "--config", "examples/kto.yaml", *quick, "3", "--eval.prompts", "4")
    for name in ("rl_grpo", "rl_ppo_rm", "rl_custom_reward"):
        out = posttrain("rl", "--config", f"examples/{name}.yaml", *quick, "2",
                        "--eval.prompts", "4")
        assert "finished 2 steps" in out
    out = posttrain("eval", "--model", "runs/example-grpo/final", "--prompts",
                    "data/arithmetic/rl_eval.jsonl", "--reward",
                    "{name: exact_match, column: answer}", "--baseline", "runs/example-sft/final",
                    "--limit", "8")
    assert "win_rate/exact_match" in out


PYTHON_EXAMPLES = sorted((EXAMPLES / "python").glob("*.py"))


def test_there_is_a_python_example_per_trainer():
    from posttrain.api import TRAINERS

    calls = {name: re.findall(r"posttrain\.(\w+)\(", path.read_text())
             for name, path in ((p.stem, p) for p in PYTHON_EXAMPLES)}
    assert {c for found in calls.values() for c in found} == set(TRAINERS)
    assert all(len(found) == 1 for found in calls.values()), calls


@pytest.mark.parametrize("path", PYTHON_EXAMPLES, ids=lambda p: p.stem)
def test_the_python_examples_run(path, pipeline_root, arithmetic_sft_model, preference_dir,
                                 tmp_path, monkeypatch, capsys):
    import runpy

    pipeline.ensure_sft(preference_dir, QUIET)  # the stages the examples start from, once
    monkeypatch.setenv("POSTTRAIN_TASKS", str(pipeline_root))
    monkeypatch.setenv("STEPS", "2")
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(path), run_name="__main__")  # as `python examples/python/NAME.py`
    out = capsys.readouterr().out
    assert "finished" in out and "/final" in out, out[-2000:]
    assert len(list((tmp_path / "runs").glob("example-py-*/final/config.json"))) == 1
