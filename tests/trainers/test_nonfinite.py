"""A NaN or inf never reaches the weights or the optimiser state, in every trainer
(issue 17 item 8), and `run.on_nonfinite` behaves and is logged the same way everywhere.

Each case injects one non-finite value at step 2 of 3 — into a model's output (the policy's
logits, a reward model's score, the critic's values, during value pretraining too) or into a
gradient — and checks, from the checkpoints written every step:

- `stop`: NonFiniteError "step 2: ...; no weights were written. Last good checkpoint: step_1",
  and no checkpoint after step 1;
- `skip`: the run finishes; the weights and optimiser state (Adam's moments and step count) of
  the poisoned model at step 2 are exactly those of step 1, and step 3 trains again; the step
  is counted, logged as `*skipped` in its metrics row, and warned about in one line.

Reward *functions* returning NaN are refused where they are scored (`reward.on_error`, with
the sample named: tests/rewards); here the RL reward comes from the policy's own numbers.
"""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from safetensors.torch import load_file

from posttrain import pipeline
from posttrain.checkpoint import latest_checkpoint
from posttrain.config import load_config, merge
from posttrain.errors import NonFiniteError
from posttrain.trainers.dpo import DPOConfig, DPOTrainer
from posttrain.trainers.kto import KTOConfig, KTOTrainer
from posttrain.trainers.reward import RewardModelTrainer, RMConfig
from posttrain.trainers.rl import RLConfig, RLTrainer
from posttrain.trainers.sft import SFTConfig, SFTTrainer
from tests.conftest import QUIET

POISONED_STEP = 2
STEPS = 3


def _run(tmp_path, **over):
    return merge({**QUIET, "run": {**QUIET["run"], "output_dir": str(tmp_path), "name": "run",
                                   "steps": STEPS, "save_every": 1, "keep_checkpoints": 10,
                                   "log_every": 1, "eval_every": 0}}, over)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


PROMPTS = ["1+2=", "3+4=", "9+9=", "5+0=", "2+2=", "7+1=", "6+3=", "8+8="]


def _sft(task, tiny, tmp_path, over):
    return SFTTrainer(load_config(SFTConfig, overrides=merge(_run(tmp_path, run={
        "batch_size": 8}), {"model": {"path": str(task / "model")},
                            "data": {"train": str(task / "sft_train.jsonl"), "limit": 64},
                            "eval": {"generate_samples": 0}, **over})))


def _pairs(tmp_path):
    return _jsonl(tmp_path / "pairs.jsonl",
                  [{"prompt": p, "chosen": str(sum(map(int, p[:-1].split("+")))),
                    "rejected": str(10 + i)} for i, p in enumerate(PROMPTS)])


def _rm(task, tiny, tmp_path, over):
    return RewardModelTrainer(load_config(RMConfig, overrides=merge(_run(tmp_path, run={
        "batch_size": 4}), {"model": {"path": str(tiny)},
                            "data": {"train": _pairs(tmp_path), "eval_fraction": 0}, **over})))


def _dpo(task, tiny, tmp_path, over):
    return DPOTrainer(load_config(DPOConfig, overrides=merge(_run(tmp_path, run={
        "batch_size": 4}), {"model": {"path": str(tiny)},
                            "data": {"train": _pairs(tmp_path), "eval_fraction": 0}, **over})))


def _kto(task, tiny, tmp_path, over):
    rows = [{"prompt": p, "completion": str(i), "label": i % 2 == 0}
            for i, p in enumerate(PROMPTS)]
    return KTOTrainer(load_config(KTOConfig, overrides=merge(_run(tmp_path, run={
        "batch_size": 4}), {"model": {"path": str(tiny)},
                            "data": {"train": _jsonl(tmp_path / "kto.jsonl", rows),
                                     "eval_fraction": 0}, **over})))


def _rl(preset, value_pretrain=0):
    def build(task, tiny, tmp_path, over):
        p = pipeline.load_preset(preset)
        base = merge(p, pipeline.rl_base(task, p))
        # one optimiser step per model and step: what is skipped is the whole step's
        algo = {"epochs": 1, "mini_batches": 1, "value_pretrain_steps": value_pretrain}
        return RLTrainer(load_config(RLConfig, overrides=merge(merge(base, _run(tmp_path)), {
            "rollout": {"prompts_per_step": 2, "samples_per_prompt": 4}, "eval": {"prompts": 4},
            "algo": algo, **over})))
    return build


TRAINERS = {"sft": _sft, "rm": _rm, "dpo": _dpo, "kto": _kto, "grpo": _rl("grpo"),
            "ppo": _rl("ppo"), "vc_ppo": _rl("vc_ppo", value_pretrain=2)}

# (trainer, where the value goes, which model it poisons)
CASES = [
    ("sft", "output", "model"), ("sft", "gradient", "model"),
    ("rm", "output", "model"), ("rm", "gradient", "model"),
    ("dpo", "output", "model"), ("dpo", "gradient", "model"),
    ("kto", "output", "model"), ("kto", "gradient", "model"),
    ("grpo", "output", "model"), ("grpo", "gradient", "model"),
    ("ppo", "output", "critic"), ("ppo", "gradient", "critic"),
]


def _head(model):
    """The module whose output is the model's: a causal LM's `lm_head`, a reward model's or
    critic's scalar `score` (trainers call the backbone and the head apart, not `forward`)."""
    score = getattr(model, "score", None)
    return score if isinstance(score, torch.nn.Module) else model.get_output_embeddings()


def _poison(trainer, where, which, value, when):
    """Add `value` (NaN or inf) to the output of model `which`, or to its first parameter's
    gradient, whenever `when()`."""
    model = getattr(trainer, which)
    if where == "gradient":
        param = next(p for p in model.parameters() if p.requires_grad)
        param.register_hook(lambda g: g + value if when() else g)
        return
    _head(model).register_forward_hook(lambda module, args, out: out + value if when() else None)


def _state(ckpt, which):
    prefix = "" if which == "model" else f"{which}_"
    optimizer = torch.load(ckpt / f"{prefix}optimizer.pt", weights_only=True)
    return load_file(ckpt / which / "model.safetensors"), optimizer["state"]


def _same(a, b):
    (wa, sa), (wb, sb) = a, b
    return (wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
            and sa.keys() == sb.keys()
            and all(torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k]))
                    for i in sa for k in sa[i]))


def _rows(run_dir):
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").open())
            if "train/lr" in r}


@pytest.fixture
def trainer_of(arithmetic_task, arithmetic_dir, tiny_model_dir, tmp_path):
    def make(name, **over):
        if TRAINERS[name] is _sft:
            task = arithmetic_task
        else:
            task = arithmetic_dir
            if name in ("grpo", "ppo", "vc_ppo"):
                pipeline.ensure_sft(arithmetic_dir, QUIET)
        return TRAINERS[name](task, tiny_model_dir, tmp_path, over)
    return make


@pytest.mark.parametrize(("name", "where", "which"), CASES,
                         ids=[f"{n}-{w}-{m}" for n, w, m in CASES])
def test_a_skipped_step_leaves_weights_and_optimiser_state_as_they_were(
        trainer_of, caplog, name, where, which):
    trainer = trainer_of(name, run={"on_nonfinite": "skip"})
    value = float("nan") if where == "output" else float("inf")
    _poison(trainer, where, which, value, lambda: trainer.step == POISONED_STEP - 1)
    with caplog.at_level(logging.WARNING, logger="posttrain"):
        result = trainer.train()
    assert result.status == "finished" and result.skipped_steps == 1
    ckpts = trainer.run_dir / "checkpoints"
    states = {s: _state(ckpts / f"step_{s}", which) for s in range(1, STEPS + 1)}
    assert _same(states[1], states[2]), "the skipped step changed the weights or optimiser"
    assert not _same(states[2], states[3]), "the step after the skipped one did not train"
    rows = _rows(trainer.run_dir)
    skipped = {step for step, row in rows.items() if any(k.endswith("skipped") for k in row)}
    assert skipped == {POISONED_STEP}
    warnings = [r.getMessage() for r in caplog.records if "run.on_nonfinite=skip" in r.message]
    assert len(warnings) == 1 and warnings[0].startswith(f"step {POISONED_STEP}: "), warnings
    for weights in (states[3][0], load_file(result.final_dir / which / "model.safetensors")
                    if which == "critic" else states[3][0]):
        assert all(torch.isfinite(w).all() for w in weights.values())


@pytest.mark.parametrize(("name", "where", "which"), CASES,
                         ids=[f"{n}-{w}-{m}" for n, w, m in CASES])
def test_stop_raises_naming_the_step_and_writes_nothing_after_the_last_good_checkpoint(
        trainer_of, name, where, which):
    trainer = trainer_of(name)  # run.on_nonfinite defaults to stop
    assert trainer.run.on_nonfinite == "stop"
    value = float("inf") if where == "output" else float("nan")
    _poison(trainer, where, which, value, lambda: trainer.step == POISONED_STEP - 1)
    with pytest.raises(NonFiniteError, match=rf"^step {POISONED_STEP}: .*; no weights were "
                                             r"written\. Last good checkpoint: .*step_1\. "):
        trainer.train()
    ckpts = trainer.run_dir / "checkpoints"
    assert latest_checkpoint(ckpts).name == "step_1"
    assert not (trainer.run_dir / "final").exists()
    weights, _ = _state(ckpts / "step_1", which)
    assert all(torch.isfinite(w).all() for w in weights.values())


@pytest.mark.parametrize("mode", ["skip", "stop"])
def test_a_non_finite_critic_in_value_pretraining_is_dropped_or_stops(trainer_of, caplog, mode):
    trainer = trainer_of("vc_ppo", run={"on_nonfinite": mode})
    calls = {"n": 0}

    def first_pretraining_step():  # the critic's first forward passes: its scoring pass
        return not trainer.value_pretrained and calls["n"] == 0

    def hook(module, args, output):
        if first_pretraining_step():
            calls["n"] += 1
            return output + float("nan")
        return None

    _head(trainer.critic).register_forward_hook(hook)
    before = {k: v.clone() for k, v in trainer.critic.state_dict().items()}
    if mode == "stop":
        with pytest.raises(NonFiniteError, match=r"^step 1: NaN or inf critic values in 8 of "
                                                 r"8 samples; no weights were written"):
            trainer.train()
        assert all(torch.equal(before[k], v) for k, v in trainer.critic.state_dict().items())
        assert latest_checkpoint(trainer.run_dir / "checkpoints") is None
        return
    with caplog.at_level(logging.WARNING, logger="posttrain"):
        result = trainer.train()
    assert result.status == "finished" and result.skipped_steps == 1
    assert len(trainer._value_log) == 1  # of 2 pretraining steps, the first was dropped
    assert trainer._value_log[0]["pretrain_step"] == 2
    assert math.isfinite(trainer._value_log[0]["value_loss"])
    warnings = [r.getMessage() for r in caplog.records if "run.on_nonfinite=skip" in r.message]
    assert warnings == ["step 1: NaN or inf critic values in 8 of 8 samples; this "
                        "value-pretraining step skipped (run.on_nonfinite=skip)"]
