"""The trainer commands from the command line: --help, one-line errors, a real run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from posttrain import pipeline
from posttrain.cli import main


def run_cli(args, cwd, env_tasks):
    import os

    env = {**os.environ, "POSTTRAIN_TASKS": str(env_tasks)}
    return subprocess.run([sys.executable, "-m", "posttrain", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("command", ["sft", "rm", "dpo", "kto", "rl"])
def test_help_lists_every_config_key(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--optim.lr" in out and "--run.resume" in out and "[default:" in out
    if command == "rl":
        assert "--algo.clip_high" in out
        assert all(name in out for name in pipeline.list_presets())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model.path", "m", "--data.train", "d.jsonl", "--optim.lrr", "1"],
         "unknown config key 'optim.lrr'; did you mean 'optim.lr'?"),
        (["--model.path", "m", "--data.train", "d.jsonl", "--run.steps", "many"],
         "run.steps: expected an integer, got 'many'"),
        (["--data.train", "d.jsonl"], "model.path is required"),
        (["--model.path", "/nonexistent/model", "--data.train", "d.jsonl"],
         "model.path: no such directory '/nonexistent/model'; give a local model directory"),
    ],
)
def test_bad_configs_give_one_line_errors(args, message, tmp_path, capsys):
    assert main(["sft", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("posttrain sft: error: ") and message in err
    assert "Traceback" not in err


def test_unknown_preset_is_a_clear_error(capsys):
    assert main(["rl", "--preset", "gpro"]) == 2
    assert "unknown preset 'gpro'" in capsys.readouterr().err


def test_rl_preset_on_a_task_from_the_command_line(arithmetic_dir, tmp_path):
    # the task (and its SFT model) come from the session's task root via $POSTTRAIN_TASKS
    from posttrain import pipeline
    from tests.conftest import QUIET

    pipeline.ensure_sft(arithmetic_dir, QUIET)
    proc = run_cli(["rl", "--preset", "grpo", "--task", "arithmetic", "--run.steps", "3",
                    "--run.eval_every", "0", "--eval.prompts", "8", "--run.progress", "plain",
                    "--run.log_every", "1"],
                   tmp_path, arithmetic_dir.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "finished 3 steps" in proc.stdout
    run = tmp_path / "runs" / "rl-grpo"
    assert (run / "final" / "model.safetensors").exists()
    cfg = (run / "config.yaml").read_text()
    assert "preset: grpo" in cfg and "advantage: grpo" in cfg
    rows = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    assert [r["step"] for r in rows if "reward/mean" in r] == [1, 2, 3]


def test_resume_flag_continues_a_run(arithmetic_dir, tmp_path):
    from posttrain import pipeline
    from tests.conftest import QUIET

    pipeline.ensure_sft(arithmetic_dir, QUIET)
    args = ["sft", "--task", "arithmetic", "--run.name", "r", "--run.output_dir", "runs",
            "--run.eval_every", "0", "--eval.generate_samples", "0", "--run.steps"]
    first = run_cli([*args, "2"], tmp_path, arithmetic_dir.parent)
    assert first.returncode == 0, first.stderr[-2000:]
    second = run_cli([*args, "4", "--resume"], tmp_path, arithmetic_dir.parent)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed from" in second.stdout and "step 2" in second.stdout
    assert "finished 4 steps" in second.stdout
    # and it continued exactly: the final weights are those of 4 steps straight through
    # (the task's 20 warm-up steps make the LR of steps 1-4 independent of run.steps)
    straight = run_cli([*args[:4], "s", *args[5:], "4"], tmp_path, arithmetic_dir.parent)
    assert straight.returncode == 0, straight.stderr[-2000:]
    resumed = load_file(str(tmp_path / "runs" / "r" / "final" / "model.safetensors"))
    direct = load_file(str(tmp_path / "runs" / "s" / "final" / "model.safetensors"))
    after_2 = load_file(str(tmp_path / "runs" / "r" / "checkpoints" / "step_2" / "model"
                            / "model.safetensors"))
    assert resumed.keys() == direct.keys()
    for name in direct:
        assert torch.equal(resumed[name], direct[name]), name
    assert any(not torch.equal(after_2[k], direct[k]) for k in direct)  # steps 3-4 trained
