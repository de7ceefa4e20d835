"""Each trainer end to end on a built-in task, with learning that must actually happen.

The task pipeline (task data -> SFT -> reward model) is built once per session, with the same
defaults `posttrain COMMAND --task NAME` uses.
"""

from __future__ import annotations

import json

import pytest
import torch

from posttrain import pipeline
from posttrain.config import load_config, merge
from posttrain.data.loading import load_examples
from posttrain.models.load import load_reward_model, load_tokenizer
from posttrain.rewards.model import RewardModelReward
from posttrain.trainers.dpo import DPOConfig, DPOTrainer
from posttrain.trainers.reward import RewardModelTrainer, RMConfig
from posttrain.trainers.sft import SFTConfig, SFTTrainer
from tests.conftest import QUIET


@pytest.fixture(scope="session")
def arithmetic_sft(arithmetic_sft_model):
    # the task's own SFT run: the session's task root is new, so the run that trained the
    # session's SFT model (2000 steps, the pipeline's settings) is what is judged here
    run_dir = arithmetic_sft_model.parent
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    return arithmetic_sft_model, rows


def evals(rows, key):
    return [(r["step"], r[key]) for r in rows if key in r]


def test_sft_lowers_held_out_nll_and_raises_accuracy(arithmetic_sft):
    final, rows = arithmetic_sft
    nll = evals(rows, "eval/nll")
    acc = evals(rows, "eval/exact_match")
    assert nll[0][0] == 0 and acc[0][0] == 0  # the untrained start is recorded
    assert nll[-1][1] < 0.5 * nll[0][1]
    # The demonstrator forgets 70% of carries, so SFT learns to forget them: its greedy
    # answers are right on most held-out prompts without a carry, few with one (measured
    # 0.56-0.62 over task seeds 0-3)
    assert acc[0][1] < 0.05 and 0.4 < acc[-1][1] < 0.7
    assert nll[-1][0] == pipeline.TASK_DEFAULTS["arithmetic"]["sft_steps"]
    assert (final / "model.safetensors").exists()


def test_every_evaluation_is_logged_whatever_log_every_says(arithmetic_dir, tmp_path):
    # evaluations at 3 and 6 (the end), training rows at 4 and 6: before, step 3's
    # evaluation was computed and thrown away
    over = merge(QUIET, {"run": {"output_dir": str(tmp_path), "steps": 6, "eval_every": 3,
                                 "log_every": 4, "batch_size": 8}})
    cfg = load_config(SFTConfig, overrides=merge(pipeline.sft_base(arithmetic_dir), over))
    result = SFTTrainer(cfg).train()
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").open()]
    assert [step for step, _ in evals(rows, "eval/nll")] == [0, 3, 6]
    assert [r["step"] for r in rows if "train/loss" in r] == [3, 4, 6]


def test_reward_model_beats_chance_on_held_out_gold_labelled_pairs(preference_dir, tmp_path):
    sft = pipeline.ensure_sft(preference_dir, QUIET)
    cfg = load_config(RMConfig, overrides=merge(pipeline.rm_base(preference_dir),
                                                {**QUIET, "run": {**QUIET["run"],
                                                                  "output_dir": str(tmp_path)}}))
    assert cfg.model.path == str(sft)
    trainer = RewardModelTrainer(cfg)
    result = trainer.train()
    # labels agree with the gold ordering ~81% of the time; chance is 50%. Measured 0.69 on
    # the tiny model of two heads of 32 (above 0.7 with four heads of 16, before issue 14)
    assert result.eval_metrics["eval/accuracy"] > 0.65
    # The saved reward model is normalised (rm.normalize: train_responses): scored as RL
    # scores it (the model loaded from disk, each training record's prompt + response encoded
    # afresh, the stored offset subtracted), the training responses, chosen and rejected,
    # have mean reward 0. (policy_samples is tested in test_preference_family.py.)
    assert cfg.rm.normalize == "train_responses"
    rm = RewardModelReward(load_reward_model(result.final_dir), load_tokenizer(result.final_dir))
    records = load_examples(cfg.data.train)
    prompts = [ex.prompt for ex in records] * 2
    responses = [ex.chosen for ex in records] + [ex.rejected for ex in records]
    rewards = torch.tensor(rm(prompts, responses), dtype=torch.float64)
    # measured: offset −0.0743, rewards' std 1.29 over 6000 responses, centred mean 1e-8
    # (float32 scores of different padding, summed in float64): 1e-5 leaves room for rounding
    # and is ~7000x smaller than the offset, so an offset that centred nothing would fail
    assert abs(rm.offset) > 1e-2
    assert abs(float(rewards.mean())) < 1e-5


def test_dpo_raises_the_gold_score_of_sampled_responses(preference_dir, tmp_path):
    pipeline.ensure_sft(preference_dir, QUIET)
    cfg = load_config(DPOConfig, overrides=merge(pipeline.dpo_base(preference_dir),
                                                 {**QUIET, "run": {**QUIET["run"],
                                                                   "output_dir": str(tmp_path)}}))
    result = DPOTrainer(cfg).train()
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").open()]
    gold = evals(rows, "eval/reward")
    loss = evals(rows, "eval/loss")
    assert loss[0][1] == pytest.approx(0.6931, abs=1e-3)  # policy = reference: ln 2
    assert gold[0][0] == 0 and gold[-1][1] > gold[0][1] + 1.0
    assert result.eval_metrics["eval/accuracy"] > 0.6


# ---------------------------------------------------------------------------- precision
# (beside test_rl.py's test_bf16_autocast_runs_with_float32_weights, which checks only that a
# bf16 run is finite: this checks that it computes what float32 computes)


def test_bf16_rl_update_gives_the_float32_losses_and_gradients_to_bf16_precision(
        arithmetic_dir, arithmetic_sft_model, tmp_path):
    """One PPO experience (8 sampled answers, rewarded, scored and given advantages in
    float32) through the policy and value losses and their gradients under run.precision
    fp32 and bf16: the losses agree to bfloat16's ~3 significant digits and the gradients
    point the same way (as test_loop.py checks for SFT)."""
    import dataclasses
    import functools

    from posttrain.trainers.accumulate import backward
    from posttrain.trainers.rl import RLTrainer
    from tests.trainers.test_rl import rl_config

    t = RLTrainer(rl_config(arithmetic_dir, "ppo", tmp_path,
                            run={"name": "bf16-vs-fp32", "steps": 2, "eval_every": 0},
                            rollout={"prompts_per_step": 8}, eval={"prompts": 4}))
    # two real steps first: the critic's fresh head is zero, and V = 0 gives the same value
    # loss in any precision; trained, the values (and the policy's distance to π_old) are not
    t.train()
    exp = t.rollout(t.next_prompts(8), seed=0, indices=range(8))
    exp = exp.replace(scores=t.rewards(exp)[0])
    assert 0 < float(exp.scores.mean()) < 1  # right and wrong answers: nonzero advantages
    batch = t.advantages(t.shape(t.score(exp)))  # π_old, values, returns: float32
    assert batch.values.abs().max() > 0
    counts = t.step_counts(batch)
    results = {}
    for precision in ("fp32", "bf16"):
        t.run = dataclasses.replace(t.run, precision=precision)
        for name, loss_fn, module in (("policy", t.policy_loss, t.model),
                                      ("value", t.value_loss, t.critic)):
            module.zero_grad(set_to_none=True)
            loss, _ = backward([functools.partial(loss_fn, batch, counts)], module, t.dist,
                               t.autocast)
            grad = torch.cat([p.grad.flatten() for p in module.parameters()
                              if p.grad is not None])
            assert loss.dtype == grad.dtype == torch.float32
            results[precision, name] = (loss, grad)
    for name in ("policy", "value"):
        (l32, g32), (l16, g16) = results["fp32", name], results["bf16", name]
        print(name, float(l32), float(l16),
              float(torch.nn.functional.cosine_similarity(g16, g32, dim=0)))
        assert not torch.equal(l32, l16) and not torch.equal(g32, g16), name  # bf16 ran
        torch.testing.assert_close(l16, l32, rtol=1e-2, atol=0, msg=name)
        assert torch.nn.functional.cosine_similarity(g16, g32, dim=0) > 0.99, name
