"""The preference family beyond DPO, end to end: SimPO and ORPO in the DPO trainer, KTO (its
trainer, its step-level reference point and `posttrain kto --task preference`), and the reward
model's per-pair margins and InstructGPT normalisation on the SFT policy's samples.

The learning tests run on the built-in `preference` task with the SFT model the session's
fixtures train once (as `posttrain dpo --task preference` does); the wiring tests use the tiny
model and a few local records.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from posttrain import pipeline
from posttrain.config import load_config, merge
from posttrain.errors import ConfigError
from posttrain.trainers.dpo import DPOConfig, DPOTrainer
from posttrain.trainers.kto import KTOConfig, KTOTrainer
from posttrain.trainers.reward import RewardModelTrainer, RMConfig
from tests.conftest import QUIET


def rows_of(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]


def evals(rows, key):
    return [(r["step"], r[key]) for r in rows if key in r]


def quiet(tmp_path, **run):
    return {**QUIET, "run": {**QUIET["run"], "output_dir": str(tmp_path), **run}}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ----------------------------------------------------------------------------- SimPO and ORPO


@pytest.mark.parametrize(
    ("variant", "loss", "rise", "steps"),
    [
        # SimPO with the paper's β = 2 and γ/β = 0.5
        ("simpo", {"beta": 2.0, "simpo_gamma": 1.0}, 0.5, 40),
        # ORPO's λ = 0.1 is tuned for starting from a base model; on an SFT model the NLL
        # term dominates and the odds ratio moves little, so λ = 1 here. Measured over seeds
        # 0-2 on the distinct-character demonstrations: margin 0.081 -> 0.209-0.232 and
        # accuracy 0.593 -> 0.663-0.680 after 80 steps (after 40: accuracy +0.033 to +0.050)
        ("orpo", {"orpo_lambda": 1.0}, 0.08, 80),
    ],
)
def test_simpo_and_orpo_raise_the_held_out_chosen_vs_rejected_margin(preference_dir, tmp_path,
                                                                     variant, loss, rise, steps):
    pipeline.ensure_sft(preference_dir, QUIET)
    over = merge(quiet(tmp_path, name=variant, steps=steps, eval_every=steps),
                 {"dpo": {"variant": variant, **loss}, "optim": {"lr": 1e-3},
                  "eval": {"reward": None}})
    trainer = DPOTrainer(load_config(DPOConfig, overrides=merge(pipeline.dpo_base(preference_dir),
                                                                over)))
    assert trainer.reference is None and not trainer.ref_cache  # reference-free: none loaded
    result = trainer.train()
    rows = rows_of(result.run_dir)
    margin = evals(rows, "eval/margin")
    accuracy = evals(rows, "eval/accuracy")
    assert margin[0][0] == 0 and margin[-1][0] == steps
    # the variant's own scores: β·mean log π for SimPO, log odds for ORPO
    assert margin[-1][1] > margin[0][1] + rise, margin
    assert accuracy[-1][1] > accuracy[0][1] + 0.05, accuracy
    if variant == "orpo":
        assert evals(rows, "eval/log_odds_ratio")[-1][1] == pytest.approx(margin[-1][1])


def test_dpo_variant_is_validated_by_the_registry(preference_dir):
    pipeline.ensure_sft(preference_dir, QUIET)
    base = pipeline.dpo_base(preference_dir)
    with pytest.raises(ConfigError, match=r"unknown DPO variant 'simpp'.*Did you mean 'simpo'"):
        load_config(DPOConfig, overrides=merge(base, {"dpo": {"variant": "simpp"}}))
    with pytest.raises(ConfigError, match="dpop_lambda"):
        load_config(DPOConfig, overrides=merge(base, {"dpo": {"variant": "orpo",
                                                              "dpop_lambda": 1.0}}))
    cfg = load_config(DPOConfig, overrides=merge(base, {"dpo": {"variant": "ipo"}}))
    assert cfg.dpo.uses_reference
    cfg = load_config(DPOConfig, overrides=merge(base, {"dpo": {"variant": "sigmoid",
                                                                "reference_free": True}}))
    assert not cfg.dpo.uses_reference


# ----------------------------------------------------------------------------------------- KTO


def test_kto_raises_the_held_out_desirable_vs_undesirable_margin(preference_dir, tmp_path):
    pipeline.ensure_sft(preference_dir, QUIET)
    over = merge(quiet(tmp_path, steps=80, eval_every=80, log_every=1),
                 {"eval": {"reward": None}})
    cfg = load_config(KTOConfig, overrides=merge(pipeline.kto_base(preference_dir), over))
    assert cfg.data.train.endswith("kto_train.jsonl") and cfg.kto.beta == 0.1
    result = KTOTrainer(cfg).train()
    rows = rows_of(result.run_dir)
    margin = evals(rows, "eval/margin")
    # step 0: policy = reference, so every implicit reward is 0 and the loss is 1 - σ(0)
    assert margin[0] == (0, pytest.approx(0.0, abs=1e-6))
    assert evals(rows, "eval/loss")[0][1] == pytest.approx(0.5, abs=1e-6)
    # measured over seeds 0-2 on the distinct-character demonstrations: 0.188-0.221 after 80
    # steps (0.128-0.170 after 40); chance would leave it near 0
    assert margin[-1][0] == 80 and margin[-1][1] > 0.15, margin
    good = evals(rows, "eval/rewards_desirable")[-1][1]
    bad = evals(rows, "eval/rewards_undesirable")[-1][1]
    assert good - bad == pytest.approx(margin[-1][1])
    train = [r for r in rows if "kto/kl" in r]
    assert len(train) == 80
    assert all("kto/rewards_desirable" in r and "kto/rewards_undesirable" in r for r in train)
    assert train[0]["kto/kl"] == pytest.approx(0.0, abs=1e-5)  # first step: π = π_ref
    late = train[-10:]  # the training margin rises too
    assert sum(r["kto/rewards_desirable"] - r["kto/rewards_undesirable"] for r in late) / 10 > 0.1


def _kto_records():
    prompts = ["1+2=", "3+4=", "9+9=", "5+0=", "2+2=", "7+1="]
    rows = []
    for i, p in enumerate(prompts):
        rows.append({"prompt": p, "completion": str(i * 7 % 10) * (1 + i % 3), "label": True})
        rows.append({"prompt": p, "completion": str(i * 3 % 10) * (2 + i % 2),
                     "label": i % 2 == 0})
    return rows


def _kto_trainer(tiny_model_dir, tmp_path, **run):
    data = write_jsonl(tmp_path / "kto.jsonl", _kto_records())
    cfg = load_config(KTOConfig, overrides={
        "model": {"path": str(tiny_model_dir)}, "data": {"train": data, "eval_fraction": 0},
        "kto": {"beta": 0.5, "desirable_weight": 1.3, "undesirable_weight": 0.8},
        **quiet(tmp_path, batch_size=8, **run)})
    trainer = KTOTrainer(cfg)
    trainer.build_optimizer()
    return trainer


def _perturb(model, seed=0):
    """Move the policy away from the reference, so the KL estimate is not 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def test_kto_step_matches_a_plain_loop_and_ignores_micro_batching(tiny_model_dir, tmp_path):
    from posttrain.models.forward import sequence_logprobs

    trainer = _kto_trainer(tiny_model_dir, tmp_path)
    _perturb(trainer.model)
    items = trainer.train_items[:8]

    def logp(model, prompt, completion):  # one sequence per forward pass
        ids = torch.tensor([prompt + completion])
        mask = torch.tensor([[False] * len(prompt) + [True] * len(completion)])
        lp, m = sequence_logprobs(model, ids, torch.ones_like(ids, dtype=torch.bool), mask)
        return float(lp[m].double().sum())

    exs = [ex for _, ex in items]
    with torch.no_grad():
        # KL pairs: prompt i with the completion of i - 1 (TRL's shift), averaged
        kl = sum(logp(trainer.model, exs[i].prompt_ids, exs[i - 1].completion_ids)
                 - logp(trainer.reference, exs[i].prompt_ids, exs[i - 1].completion_ids)
                 for i in range(8)) / 8
        r = [logp(trainer.model, e.prompt_ids, e.completion_ids)
             - logp(trainer.reference, e.prompt_ids, e.completion_ids) for e in exs]
    assert abs(kl) > 0.05  # the perturbation made the estimate informative
    z = max(0.0, kl)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    want = sum(1.3 * (1 - sig(0.5 * (ri - z))) if e.desirable else 0.8 * (1 - sig(0.5 * (z - ri)))
               for ri, e in zip(r, exs, strict=True)) / 8
    totals = trainer.step_totals(items)
    assert float(totals["kl"]) == pytest.approx(kl, abs=1e-4)
    assert (totals["examples"], totals["desirable"]) == (8, sum(e.desirable for e in exs))
    loss, metrics = trainer.accumulate_gradients(items)
    assert float(loss) == pytest.approx(want, abs=1e-5)
    good = [0.5 * ri for ri, e in zip(r, exs, strict=True) if e.desirable]
    assert float(metrics["kto/rewards_desirable"]) == pytest.approx(sum(good) / len(good),
                                                                    abs=1e-4)
    whole = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}

    # the same step in micro-batches of ~2 sequences: z is the step's, so nothing changes
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.run = dataclasses.replace(trainer.run, micro_batch_tokens=20)
    assert len(trainer.micro_batches(items)) >= 3
    loss_split, _ = trainer.accumulate_gradients(items)
    assert float(loss_split) == pytest.approx(float(loss), abs=1e-6)
    for n, p in trainer.model.named_parameters():
        torch.testing.assert_close(p.grad, whole[n], atol=1e-6, rtol=1e-5)

    # reference log-probs computed on the fly instead of once up front: the same step
    trainer.ref_cache.clear()
    trainer.optimizer.zero_grad(set_to_none=True)
    loss_fly, _ = trainer.accumulate_gradients(items)
    assert float(loss_fly) == pytest.approx(float(loss), abs=1e-6)


def test_kto_help_lists_its_config_keys(capsys):
    from posttrain.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["kto", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for key in ("--kto.beta", "--kto.desirable_weight", "--kto.undesirable_weight",
                "--data.train", "--run.resume"):
        assert key in out


def test_kto_on_the_preference_task_from_the_command_line(preference_dir, tmp_path):
    pipeline.ensure_sft(preference_dir, QUIET)
    env = {**os.environ, "POSTTRAIN_TASKS": str(preference_dir.parent)}
    proc = subprocess.run(
        [sys.executable, "-m", "posttrain", "kto", "--task", "preference", "--run.steps", "3",
         "--run.eval_every", "0", "--eval.prompts", "4", "--run.progress", "none",
         "--run.log_every", "1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "finished 3 steps" in proc.stdout and "eval/margin" in proc.stdout
    run = tmp_path / "runs" / "kto"
    assert (run / "final" / "model.safetensors").exists()
    rows = rows_of(run)
    assert [r["step"] for r in rows if "kto/kl" in r] == [1, 2, 3]
    # the task's pairs, unpaired: chosen -> true, rejected -> false, in pair order
    pairs = [json.loads(line) for line in (preference_dir / "pref_train.jsonl").open()][:2]
    unpaired = [json.loads(line) for line in (preference_dir / "kto_train.jsonl").open()]
    assert len(unpaired) == 2 * sum(1 for _ in (preference_dir / "pref_train.jsonl").open())
    assert unpaired[:4] == [
        {"prompt": pairs[0]["prompt"], "completion": pairs[0]["chosen"], "label": True},
        {"prompt": pairs[0]["prompt"], "completion": pairs[0]["rejected"], "label": False},
        {"prompt": pairs[1]["prompt"], "completion": pairs[1]["chosen"], "label": True},
        {"prompt": pairs[1]["prompt"], "completion": pairs[1]["rejected"], "label": False}]


# ------------------------------------------------------------------------------ reward model


def test_reward_model_uses_each_pairs_margin_and_the_configured_fallback(tiny_model_dir,
                                                                         tmp_path):
    rows = [{"prompt": "1+2=", "chosen": "3", "rejected": "4", "margin": 2.0},
            {"prompt": "2+2=", "chosen": "4", "rejected": "5"},  # no margin: rm.margin
            {"prompt": "3+3=", "chosen": "6", "rejected": "66", "margin": -0.5},
            {"prompt": "4+1=", "chosen": "5", "rejected": "55", "margin": None}]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = load_config(RMConfig, overrides={
        "model": {"path": str(tiny_model_dir)}, "data": {"train": data, "eval_fraction": 0},
        "rm": {"margin": 0.75, "normalize": False}, **quiet(tmp_path, batch_size=4)})
    assert cfg.rm.normalize == "none"  # older configs' false
    trainer = RewardModelTrainer(cfg)
    items = trainer.train_items
    with torch.no_grad():
        chosen, rejected = trainer.scores(items)
        loss, _ = trainer.micro_loss(items, trainer.step_totals(items))
    m = [2.0, 0.75, -0.5, 0.75]
    want = sum(-math.log(1 / (1 + math.exp(-(c - r - mi))))
               for c, r, mi in zip(chosen.tolist(), rejected.tolist(), m, strict=True)) / 4
    assert float(loss) == pytest.approx(want, abs=1e-6)
    # without the column's margins the loss would differ (the test can tell them apart)
    plain = F.softplus(-(chosen - rejected - 0.75)).mean()
    assert abs(float(plain) - want) > 1e-3


def test_rm_normalize_accepts_old_booleans_and_rejects_unknown_modes(preference_dir):
    pipeline.ensure_sft(preference_dir, QUIET)
    base = pipeline.rm_base(preference_dir)
    assert load_config(RMConfig, overrides=merge(base, {"rm": {"normalize": True}})
                       ).rm.normalize == "train_responses"
    assert load_config(RMConfig, overrides=base).rm.normalize == "train_responses"
    with pytest.raises(ConfigError, match=r"rm\.normalize 'policy' is not one of none, "
                       r"train_responses, policy_samples \(did you mean 'policy_samples'\?\)"):
        load_config(RMConfig, overrides=merge(base, {"rm": {"normalize": "policy"}}))


def test_policy_sample_normalisation_centres_the_sft_policys_reward(preference_dir, tmp_path):
    """InstructGPT: after normalisation the SFT policy's mean reward is 0. Checked on fresh
    samples (another seed) from the SFT policy, scored by the saved reward model as RL
    would score them, not by reading the stored offset back."""
    from posttrain.data.formats import distinct_prompts
    from posttrain.data.loading import load_examples
    from posttrain.evaluation import EvalSettings, generate
    from posttrain.models.load import freeze, load_causal_lm, load_reward_model, load_tokenizer
    from posttrain.rewards.model import RewardModelReward

    sft = pipeline.ensure_sft(preference_dir, QUIET)
    n_offset = 2048
    over = merge(quiet(tmp_path, steps=15, eval_every=0),
                 {"rm": {"normalize": "policy_samples", "normalize_samples": n_offset}})
    cfg = load_config(RMConfig, overrides=merge(pipeline.rm_base(preference_dir), over))
    assert cfg.rm.normalize_max_new_tokens == 14  # the task's response length
    result = RewardModelTrainer(cfg).train()

    rm = RewardModelReward(freeze(load_reward_model(result.final_dir)),
                           load_tokenizer(result.final_dir))
    # one fresh sample for each of 1024 training prompts (independent draws)
    prompts = distinct_prompts(load_examples(cfg.data.train))[-1024:]
    policy = freeze(load_causal_lm(sft))
    exp = generate(policy, load_tokenizer(sft), prompts, EvalSettings(1, 14, 1.0, seed=2024))
    scores = torch.tensor(rm(list(exp.prompts), list(exp.texts)), dtype=torch.float64)
    n = len(scores)
    assert n == 1024
    mean, std = float(scores.mean()), float(scores.std())
    # the offset is itself a mean of n_offset samples: the standard error of the difference
    # of two independent means of the same distribution is σ·sqrt(1/n + 1/n_offset)
    # (measured: σ ≈ 0.6, so se ≈ 0.023; tolerance 4·se ≈ 0.09)
    se = std * math.sqrt(1 / n + 1 / n_offset)
    assert abs(mean) < 4 * se, (mean, se)
    # and the normalisation did something: the raw scores were not centred already
    # (measured offset ≈ 0.4)
    assert abs(rm.offset) > 8 * se, (rm.offset, se)
