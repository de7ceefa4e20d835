"""The trainer commands from the command line: --help, one-line errors, a real run."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from posttrain import pipeline
from posttrain.cli import main
from tests.conftest import longest_row


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


def sft_cli(model, data, tmp_path, capsys) -> str:
    """posttrain sft's stderr, checked to be one line of error and no traceback."""
    code = main(["sft", "--model.path", str(model), "--data.train", str(data),
                 "--run.output_dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("posttrain sft: error: ") and "\n" not in err, err
    assert "Traceback" not in err
    return err.removeprefix("posttrain sft: error: ")


@pytest.mark.parametrize("damage", ["no-tokenizer", "damaged-weights", "pickle-weights"])
def test_unloadable_model_directories_give_one_line_errors(damage, tiny_model_dir, tmp_path,
                                                           capsys):
    model = tmp_path / "model"
    model.mkdir()
    weights = {"config.json", "generation_config.json", "model.safetensors"}
    for f in tiny_model_dir.iterdir():
        if f.is_file() and (damage != "no-tokenizer" or f.name in weights):
            shutil.copy(f, model / f.name)
    if damage == "damaged-weights":
        (model / "model.safetensors").write_bytes(b"\xff" * 64)
    if damage == "pickle-weights":
        torch.save(load_file(model / "model.safetensors"), model / "pytorch_model.bin")
        (model / "model.safetensors").unlink()
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "completion": "2"}) + "\n")
    message = sft_cli(model, data, tmp_path, capsys)
    expected = {
        "no-tokenizer": f"cannot load the tokenizer from {str(model)!r}: the directory has no "
                        "tokenizer files",
        "damaged-weights": f"cannot load the policy model from {str(model)!r}: model.safetensors "
                           "cannot be read (SafetensorError: ",
        "pickle-weights": f"cannot load the policy model from {str(model)!r}: it has pickle "
                          "weights only (pytorch_model.bin), which posttrain refuses to load",
    }[damage]
    assert message.startswith(expected)
    what_to_do = {"no-tokenizer": "tokenizer.save_pretrained(",
                  "damaged-weights": "download or save the model there again",
                  "pickle-weights": "AutoModelForCausalLM.from_pretrained("}[damage]
    assert what_to_do in message


def test_a_data_directory_that_is_not_a_saved_dataset_is_a_clear_error(tiny_model_dir,
                                                                        tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.jsonl").write_text(json.dumps({"prompt": "1+1=", "completion": "2"}) + "\n")
    assert sft_cli(tiny_model_dir, folder, tmp_path, capsys) == (
        f"{folder}: is a directory but not a saved dataset (it has neither dataset_info.json "
        "and state.json nor dataset_dict.json); give a data file (.jsonl, .ndjson, .json, "
        ".parquet or .pq) or a directory written by `datasets`' save_to_disk (a Dataset or a "
        f"DatasetDict); did you mean {str(folder / 'train.jsonl')!r}?")


def test_a_yaml_config_with_a_tab_names_file_and_line(tmp_path, capsys):
    config = tmp_path / "sft.yaml"
    config.write_text("model:\n  path: m\ndata:\n\ttrain: d.jsonl\n")
    assert main(["sft", "--config", str(config)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"posttrain sft: error: {config} line 4 column 1: a tab character; YAML does not allow "
        "tabs in indentation, indent with spaces")


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


# --- a 200,000-character prompt among valid records (issue 17, item 2) ------------------------

LONG_PROMPT = "12+34=46; " * 20_000  # 200,000 characters, a token each for the tiny model
POSITIONS = 256  # the tiny model's max_position_embeddings


def write_records_with_a_long_prompt(command, path):
    """Three valid records for `command` and, on line 2, one whose prompt is LONG_PROMPT."""
    sums = [(1, 2), (7, 7), (40, 2)]
    if command == "sft":
        rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a, b in sums]
        long = {"prompt": LONG_PROMPT, "completion": "46"}
    elif command == "rl":
        rows = [{"prompt": f"{a}+{b}="} for a, b in sums]
        long = {"prompt": LONG_PROMPT}
    else:
        rows = [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)}
                for a, b in sums]
        long = {"prompt": LONG_PROMPT, "chosen": "46", "rejected": "47"}
    rows.insert(1, long)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def trainer_for(command, model, data, tmp_path, on_overflow):
    from posttrain.config import load_config, merge
    from posttrain.trainers.dpo import DPOConfig, DPOTrainer
    from posttrain.trainers.kto import KTOConfig, KTOTrainer
    from posttrain.trainers.reward import RewardModelTrainer, RMConfig
    from posttrain.trainers.rl import RLConfig, RLTrainer
    from posttrain.trainers.sft import SFTConfig, SFTTrainer
    from tests.conftest import QUIET

    over = {"model": {"path": str(model)},
            "data": {"train": str(data), "eval_fraction": 0, "on_overflow": on_overflow},
            "run": {**QUIET["run"], "output_dir": str(tmp_path / "runs"), "steps": 1}}
    if command == "rl":
        over = merge(pipeline.load_preset("grpo"), merge(over, {
            "reward": {"terms": ["tests.trainers.user_rewards:short_answers"]},
            "rollout": {"prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 6},
            "eval": {"prompts": 2}}))
    cls, trainer = {"sft": (SFTConfig, SFTTrainer), "rm": (RMConfig, RewardModelTrainer),
                    "dpo": (DPOConfig, DPOTrainer), "kto": (KTOConfig, KTOTrainer),
                    "rl": (RLConfig, RLTrainer)}[command]
    return trainer(load_config(cls, overrides=over))


def tokenized_without_limits(command, data, tokenizer):
    """The valid records of `data`, tokenised as before the sequence limit existed."""
    from posttrain.data.collate import (
        tokenize_preferences,
        tokenize_prompts,
        tokenize_sft,
        tokenize_unpaired,
    )
    from posttrain.data.formats import unpair_preferences
    from posttrain.data.loading import load_examples

    valid = [e for e in load_examples(data) if e.prompt != LONG_PROMPT]
    if command == "kto":
        return tokenize_unpaired(unpair_preferences(valid), tokenizer)
    tokenize = {"sft": tokenize_sft, "rm": tokenize_preferences, "dpo": tokenize_preferences,
                "rl": tokenize_prompts}[command]
    return tokenize(valid, tokenizer)


def is_long(item) -> bool:
    """Whether a tokenised item comes from line 2, the long record."""
    where = item[1].where if isinstance(item, tuple) else item.where
    return where.split("d.jsonl")[-1].startswith(" line 2")


LIMITS = "max_prompt_tokens=None, max_completion_tokens=None, max_sequence_tokens=256 (the " \
         "model's maximum positions)"


@pytest.mark.parametrize("command", ["sft", "rm", "dpo", "kto", "rl"])
def test_every_trainer_truncates_a_200000_character_prompt_to_the_models_positions(
        command, tiny_model_dir, tmp_path, capsys):
    data = write_records_with_a_long_prompt(command, tmp_path / "d.jsonl")
    trainer = trainer_for(command, tiny_model_dir, data, tmp_path, "truncate")
    out = capsys.readouterr().out
    # KTO unpairs the long pair into two records; RL keeps 6 positions for the response
    n = 2 if command == "kto" else 1
    room = " with 6 kept for the response (rollout.max_new_tokens)" if command == "rl" else ""
    assert (f"data: {n} truncated prompt (limits: {LIMITS}{room}, on_overflow=truncate)"
            in out.splitlines()), out
    items = [it[1] if command in ("dpo", "kto") else it for it in trainer.train_items]
    long = [it for it in items if is_long(it)]
    assert len(long) == n
    assert all(longest_row(it) == POSITIONS - (6 if command == "rl" else 0) for it in long)
    # the valid records are tokenised exactly as they were without the limit
    kept = [it for it in items if not is_long(it)]
    assert kept == tokenized_without_limits(command, data, trainer.tokenizer)


@pytest.mark.parametrize("command", ["sft", "dpo", "rl"])
def test_every_trainer_drops_a_200000_character_prompt_and_says_so(command, tiny_model_dir,
                                                                   tmp_path, capsys):
    data = write_records_with_a_long_prompt(command, tmp_path / "d.jsonl")
    trainer = trainer_for(command, tiny_model_dir, data, tmp_path, "drop")
    out = capsys.readouterr().out
    what = "prompt" if command == "rl" else "sequence"
    room = " with 6 kept for the response (rollout.max_new_tokens)" if command == "rl" else ""
    assert (f"data: 1 dropped long {what} (limits: {LIMITS}{room}, on_overflow=drop)"
            in out.splitlines()), out
    items = [it[1] if command == "dpo" else it for it in trainer.train_items]
    assert items == tokenized_without_limits(command, data, trainer.tokenizer)


def test_a_200000_character_prompt_is_an_error_naming_its_line_when_asked(tiny_model_dir,
                                                                          tmp_path, capsys):
    data = write_records_with_a_long_prompt("dpo", tmp_path / "d.jsonl")
    code = main(["dpo", "--model.path", str(tiny_model_dir), "--data.train", str(data),
                 "--data.eval_fraction", "0", "--data.on_overflow", "error",
                 "--run.output_dir", str(tmp_path / "runs")])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        f"posttrain dpo: error: {data} line 2: the prompt and completion have 200003 tokens "
        "together, more than the limit of 256 (max_sequence_tokens, by default the model's "
        "maximum positions); raise max_sequence_tokens, shorten the record or set on_overflow "
        "to 'truncate' or 'drop'")


def test_rl_says_when_max_new_tokens_leaves_no_room_for_a_prompt(tiny_model_dir, tmp_path):
    from posttrain.config import load_config, merge
    from posttrain.errors import ConfigError
    from posttrain.trainers.rl import RLConfig, RLTrainer
    from tests.conftest import QUIET

    data = write_records_with_a_long_prompt("rl", tmp_path / "d.jsonl")
    over = merge(pipeline.load_preset("grpo"), {
        "model": {"path": str(tiny_model_dir)}, "data": {"train": str(data), "eval_fraction": 0},
        "reward": {"terms": ["tests.trainers.user_rewards:short_answers"]},
        "rollout": {"max_new_tokens": 256},
        "run": {**QUIET["run"], "output_dir": str(tmp_path / "runs")}})
    with pytest.raises(ConfigError, match=r"rollout.max_new_tokens \(256\) leaves no room for a "
                                          r"prompt within 256 tokens \(the model's maximum "
                                          r"positions\); lower rollout.max_new_tokens"):
        RLTrainer(load_config(RLConfig, overrides=over))


@pytest.mark.parametrize(("on_overflow", "said"), [("truncate", "1 truncated prompt"),
                                                   ("drop", "1 dropped long sequence")])
def test_cli_dpo_trains_on_a_file_with_a_200000_character_prompt(on_overflow, said,
                                                                 tiny_model_dir, tmp_path):
    data = write_records_with_a_long_prompt("dpo", tmp_path / "d.jsonl")
    proc = run_cli(["dpo", "--model.path", str(tiny_model_dir), "--data.train", str(data),
                    "--data.eval_fraction", "0", "--data.on_overflow", on_overflow,
                    "--run.steps", "2", "--run.batch_size", "2", "--run.progress", "none",
                    "--run.tensorboard", "false", "--run.log_every", "1"],
                   tmp_path, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"data: {said} (limits: {LIMITS}, on_overflow={on_overflow})" in proc.stdout
    assert "finished 2 steps" in proc.stdout
    run = tmp_path / "runs" / "run"  # the default run.name
    assert (run / "final" / "model.safetensors").exists()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    losses = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
    assert [step for step, _ in losses] == [1, 2]
    assert all(math.isfinite(loss) for _, loss in losses)
