"""Each trainer end to end on a built-in task, with learning that must actually happen.

The task pipeline (task data -> SFT -> reward model) is built once per session, with the same
defaults `posttrain COMMAND --task NAME` uses.
"""

from __future__ import annotations

import json

import pytest

from posttrain import pipeline
from posttrain.config import load_config, merge
from posttrain.trainers.dpo import DPOConfig, DPOTrainer
from posttrain.trainers.reward import RewardModelTrainer, RMConfig
from posttrain.trainers.sft import SFTConfig, SFTTrainer
from tests.conftest import QUIET


@pytest.fixture(scope="session")
def arithmetic_sft(arithmetic_dir):
    cfg = load_config(SFTConfig, overrides=merge(pipeline.sft_base(arithmetic_dir), QUIET))
    trainer = SFTTrainer(cfg)
    result = trainer.train()
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").open()]
    return result, rows


def evals(rows, key):
    return [(r["step"], r[key]) for r in rows if key in r]


def test_sft_lowers_held_out_nll_and_raises_accuracy(arithmetic_sft):
    result, rows = arithmetic_sft
    nll = evals(rows, "eval/nll")
    acc = evals(rows, "eval/exact_match")
    assert nll[0][0] == 0 and acc[0][0] == 0  # the untrained start is recorded
    assert nll[-1][1] < 0.5 * nll[0][1]
    assert acc[0][1] < 0.05 and acc[-1][1] > 0.5
    assert (result.final_dir / "model.safetensors").exists()


def test_reward_model_beats_chance_on_held_out_gold_labelled_pairs(preference_dir, tmp_path):
    sft = pipeline.ensure_sft(preference_dir, QUIET)
    cfg = load_config(RMConfig, overrides=merge(pipeline.rm_base(preference_dir),
                                                {**QUIET, "run": {**QUIET["run"],
                                                                  "output_dir": str(tmp_path)}}))
    assert cfg.model.path == str(sft)
    trainer = RewardModelTrainer(cfg)
    result = trainer.train()
    # labels agree with the gold ordering ~81% of the time; chance is 50%
    assert result.eval_metrics["eval/accuracy"] > 0.7
    # the saved reward model is normalised: mean score over the training responses is 0
    from posttrain.models.load import load_reward_model, load_tokenizer
    from posttrain.rewards.model import RewardModelReward

    rm = RewardModelReward(load_reward_model(result.final_dir), load_tokenizer(result.final_dir))
    assert rm.offset == pytest.approx(trainer.model.config.reward_offset)


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
