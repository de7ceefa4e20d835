"""The worked examples in examples/ stay valid, and run (briefly) as the README says."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain import pipeline
from posttrain.config import load_config
from posttrain.trainers.dpo import DPOConfig
from posttrain.trainers.kto import KTOConfig
from posttrain.trainers.reward import RMConfig
from posttrain.trainers.rl import RLConfig
from posttrain.trainers.sft import SFTConfig

EXAMPLES = Path(__file__).parent.parent / "examples"
CONFIGS = {"sft.yaml": SFTConfig, "sft_preference.yaml": SFTConfig, "rm.yaml": RMConfig,
           "dpo.yaml": DPOConfig, "rl_grpo.yaml": RLConfig, "rl_ppo_rm.yaml": RLConfig,
           "rl_custom_reward.yaml": RLConfig, "kto.yaml": KTOConfig}


def test_every_example_config_is_listed_here():
    assert {p.name for p in EXAMPLES.glob("*.yaml")} == set(CONFIGS)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_example_configs_validate(name):
    cfg = load_config(CONFIGS[name], EXAMPLES / name, preset_dir=pipeline.preset_dir())
    assert cfg.run.name.startswith("example-")


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
