"""Issue 20 on real architectures (tiny GPT-2, Qwen2, Mistral built locally, posttrain.tasks.archs):
dropout off where the maths needs one function, defaults and help sized for real models, the
held-out split in RL, the bf16 warning, runs that are not silently overwritten, RL without a
preset said out loud, a mistyped local path failing at once, and a KL for monitoring that is
never negative."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys

import pytest
import torch

from posttrain import pipeline
from posttrain.config import load_config, merge
from posttrain.errors import ConfigError
from posttrain.trainers.common import ModelConfig
from posttrain.trainers.dpo import DPOConfig, DPOTrainer
from posttrain.trainers.rl import RLConfig, RLTrainer
from posttrain.trainers.sft import SFTConfig, SFTTrainer
from tests.conftest import QUIET

PROMPTS = ["what is 3 + 4?", "what is 12 - 5?", "compute 6 * 7 =", "the answer is",
           "please answer the question.", "a helpful answer is", "what is 2 + 2?",
           "the quick brown fox"]


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def rows_of(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]


def rl_cfg(model_dir, tmp_path, name, **over):
    base = merge(pipeline.load_preset("grpo"), {
        "model": {"path": str(model_dir)},
        "data": {"train": jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS]),
                 "eval_fraction": 0},
        "reward": {"terms": ["tests.trainers.user_rewards:short_answers"]},
        "rollout": {"prompts_per_step": 2, "samples_per_prompt": 4, "max_new_tokens": 6},
        # one epoch, one mini-batch, so every update is on-policy, with π_old from its own
        # no-grad pass (as after a weight sync to an engine): the ratio compares two passes
        "algo": {"mini_batches": 1, "epochs": 1, "recompute_old_logprobs": True},
        "eval": {"prompts": 2, "samples_per_prompt": 0, "kl_to_reference": True},
        "run": {**QUIET["run"], "output_dir": str(tmp_path), "name": name, "steps": 1},
    })
    return load_config(RLConfig, overrides=merge(base, over))


# ------------------------------------------------------------------------------- dropout


def test_the_first_on_policy_grpo_step_on_gpt2_has_ratio_1_with_dropout_off(arch_model,
                                                                               tmp_path):
    """GPT-2 ships with dropout 0.1. Off (the default for RL), sampling, π_old and the update
    are one function: ratio 1 and nothing clipped. Kept (model.dropout true), the same step
    sees noise: the ratio moves and the k3 estimate of KL(π_old ‖ π_θ) is far from 0."""
    gpt2 = arch_model("gpt2")
    off = RLTrainer(rl_cfg(gpt2, tmp_path, "off"))
    off.train()
    row = rows_of(tmp_path / "off")[0]
    assert abs(row["policy/ratio_mean"] - 1) < 1e-6, row["policy/ratio_mean"]
    assert row["policy/clipfrac"] == 0 and row["policy/approx_kl"] < 1e-10
    kept = RLTrainer(rl_cfg(gpt2, tmp_path, "kept", model={"dropout": True}))
    kept.train()
    noisy = rows_of(tmp_path / "kept")[0]
    assert abs(noisy["policy/ratio_mean"] - 1) > 1e-4 or noisy["policy/approx_kl"] > 1e-5, noisy


def dpo_first_loss(model_dir, tmp_path, name, **over):
    pairs = [{"prompt": p, "chosen": " 7.", "rejected": " the answer is 9."} for p in PROMPTS]
    cfg = load_config(DPOConfig, overrides=merge({
        "model": {"path": str(model_dir)},
        "data": {"train": jsonl(tmp_path / "pairs.jsonl", pairs), "eval_fraction": 0},
        "run": {**QUIET["run"], "output_dir": str(tmp_path), "name": name, "steps": 1,
                "batch_size": 4},
    }, over))
    DPOTrainer(cfg).train()
    return rows_of(tmp_path / name)[0]["train/loss"]


def test_dpos_first_loss_is_ln_2_on_gpt2_with_dropout_off(arch_model, tmp_path):
    """π_θ = π_ref at step 0, so every implicit reward is 0 and −log σ(0) = ln 2, provided
    the policy (train mode) and the reference (eval mode) compute the same function."""
    gpt2 = arch_model("gpt2")
    assert dpo_first_loss(gpt2, tmp_path, "off") == pytest.approx(math.log(2), abs=1e-6)
    kept = dpo_first_loss(gpt2, tmp_path, "kept", model={"dropout": True})
    assert abs(kept - math.log(2)) > 1e-4, kept


def test_sft_keeps_the_models_dropout_unless_told(arch_model, tmp_path):
    gpt2 = arch_model("gpt2")
    data = jsonl(tmp_path / "sft.jsonl", [{"prompt": p, "completion": " 7."} for p in PROMPTS])

    def rates(name, **over):
        cfg = load_config(SFTConfig, overrides=merge({
            "model": {"path": str(gpt2)}, "data": {"train": data, "eval_fraction": 0},
            "run": {**QUIET["run"], "output_dir": str(tmp_path), "name": name, "steps": 1,
                    "batch_size": 2}}, over))
        trainer = SFTTrainer(cfg)
        trainer.train()
        return {m.p for m in trainer.model.modules() if isinstance(m, torch.nn.Dropout)}

    assert rates("kept") == {0.1}
    assert rates("off", model={"dropout": False}) == {0.0}


# ---------------------------------------------------------------------- defaults and help


def help_text(*args):
    out = subprocess.run([sys.executable, "-m", "posttrain", *args, "--help"],
                         capture_output=True, text=True, check=True)
    return {line.split()[0]: line for line in out.stdout.splitlines()
            if line.strip().startswith("--")}


def test_help_shows_each_commands_own_learning_rate_and_the_presets_values():
    """The defaults of TRL for full fine-tunes of real models: SFT 2e-5, DPO and KTO 1e-6,
    RL 1e-6, RM 1e-5 (the built-in tasks set their own)."""
    for command, lr in [("sft", "2e-05"), ("rm", "1e-05"), ("dpo", "1e-06"), ("kto", "1e-06"),
                        ("rl", "1e-06")]:
        assert f"[default: {lr}]" in help_text(command)["--optim.lr"], command
    grpo = help_text("rl", "--preset", "grpo")
    assert "[default: 0.04, from the preset]" in grpo["--algo.kl_coef"]
    assert "[default: 'k3', from the preset]" in grpo["--algo.kl_estimator"]
    ppo = help_text("rl", "--preset", "ppo")
    assert "[default: 'gae', from the preset]" in ppo["--algo.advantage"]


# ------------------------------------------------------------------------ smaller things


def test_rl_holds_out_eval_fraction_of_the_prompts_when_no_eval_file(arch_model, tmp_path):
    cfg = rl_cfg(arch_model("qwen2"), tmp_path, "split", data={"eval_fraction": 0.25})
    trainer = RLTrainer(cfg)
    held = {trainer.tokenizer.decode(ids) for ids, _ in trainer.eval_items}
    trained = {trainer.tokenizer.decode(ids) for ids, _ in trainer.train_items}
    assert len(held) == 2 and len(trained) == 6 and not held & trained


def test_bf16_on_a_cpu_where_it_is_slower_warns_once_saying_why(arch_model, tmp_path,
                                                                monkeypatch, caplog):
    from posttrain.trainers import base

    monkeypatch.setattr(base, "bf16_slowdown", lambda model: 2.6)
    with caplog.at_level(logging.WARNING, logger="posttrain.trainers.base"):
        RLTrainer(rl_cfg(arch_model("qwen2"), tmp_path, "bf16",
                         run={"precision": "bf16"})).train()
    said = [r.getMessage() for r in caplog.records if "bf16" in r.getMessage()]
    assert len(said) == 1 and "2.6x" in said[0] and "--run.precision fp32" in said[0]


def test_the_bf16_measurement_is_a_real_ratio_and_leaves_no_gradients(arch_model):
    from transformers import AutoModelForCausalLM

    from posttrain.trainers.base import bf16_slowdown

    model = AutoModelForCausalLM.from_pretrained(arch_model("qwen2"))
    model.train()
    ratio = bf16_slowdown(model, tokens=16, repeats=1)
    assert math.isfinite(ratio) and ratio > 0
    assert model.training and all(p.grad is None for p in model.parameters())


def test_a_second_run_of_the_same_name_is_refused_not_overwritten(arch_model, tmp_path):
    qwen = arch_model("qwen2")
    RLTrainer(rl_cfg(qwen, tmp_path, "same")).train()
    before = (tmp_path / "same" / "final" / "model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match=r"run.name: .*same already holds a run .*--resume"):
        RLTrainer(rl_cfg(qwen, tmp_path, "same", run={"seed": 1})).train()
    assert (tmp_path / "same" / "final" / "model.safetensors").read_bytes() == before
    RLTrainer(rl_cfg(qwen, tmp_path, "same", run={"seed": 1, "overwrite": True})).train()
    assert (tmp_path / "same" / "final" / "model.safetensors").read_bytes() != before


def test_rl_without_a_preset_says_what_it_runs(arch_model, tmp_path, capsys):
    from dataclasses import replace

    cfg = rl_cfg(arch_model("qwen2"), tmp_path, "nopreset")
    RLTrainer(replace(cfg, preset=None))
    said = capsys.readouterr().out
    assert "rl: no preset given; running the algo section as set (advantage grpo" in said
    RLTrainer(cfg)
    assert "no preset" not in capsys.readouterr().out


def test_a_mistyped_local_model_path_fails_at_once_with_a_suggestion(tmp_path, monkeypatch):
    (tmp_path / "models" / "qwen2").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"model.path: no such directory 'models/qwen' "
                                          r"\(did you mean 'models/qwen2'\?\)"):
        ModelConfig(path="models/qwen").check_paths()
    with pytest.raises(ConfigError, match=r"model.tokenizer: no such directory '\./tok'"):
        ModelConfig(path="models/qwen2", tokenizer="./tok").check_paths()
    ModelConfig(path="Qwen/Qwen2-0.5B").check_paths()  # a hub id is left to the hub


def test_the_logged_k3_kl_is_never_negative_and_k1_is_kept_beside_it(arch_model, tmp_path):
    RLTrainer(rl_cfg(arch_model("mistral"), tmp_path, "kl", run={"steps": 3},
                     optim={"lr": 1e-3},
                     reward={"terms": ["tests.trainers.user_rewards:characters"]})).train()
    rows = [r for r in rows_of(tmp_path / "kl") if "kl/ref_seq" in r]
    assert len(rows) == 3 and all(r["kl/ref_seq_k3"] >= 0 for r in rows)
    assert rows[0]["kl/ref_seq_k3"] == 0 == rows[0]["kl/ref_seq"]  # π = π_ref at step 1
    assert rows[-1]["kl/ref_seq_k3"] > 0


def test_model_chat_template_lets_sft_train_chat_data_on_gpt2_and_is_saved(arch_model,
                                                                           tmp_path):
    """GPT-2 has no chat template; `model.chat_template` gives one (here a file), which the
    trainer applies and the saved tokenizer keeps, so the final model renders chats too."""
    from transformers import AutoTokenizer

    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
                        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n"
                        "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    chats = [{"messages": [{"role": "user", "content": p},
                           {"role": "assistant", "content": "7."}]} for p in PROMPTS]
    cfg = load_config(SFTConfig, overrides={
        "model": {"path": str(arch_model("gpt2")), "chat_template": str(template)},
        "data": {"train": jsonl(tmp_path / "chats.jsonl", chats), "eval_fraction": 0},
        "run": {**QUIET["run"], "output_dir": str(tmp_path), "name": "chat", "steps": 1,
                "batch_size": 2}})
    result = SFTTrainer(cfg).train()
    saved = AutoTokenizer.from_pretrained(result.final_dir)
    assert saved.chat_template == template.read_text()


def test_a_trl_reward_function_gets_the_responses_token_ids(arch_model, tmp_path):
    """TRL's signature, `completion_ids` included: its reward (tokens / 10) averages to the
    logged mean response length / 10."""
    RLTrainer(rl_cfg(arch_model("qwen2"), tmp_path, "trl",
                     reward={"terms": ["tests.trainers.user_rewards:trl_token_count"]})).train()
    row = rows_of(tmp_path / "trl")[0]
    assert row["reward/mean"] == pytest.approx(row["response/length"] / 10, abs=1e-6)
