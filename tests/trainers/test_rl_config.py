"""RL configs follow the registries: every algorithm choice is a registered name, a module
named in `imports:` can register its own, and impossible combinations are refused."""

from __future__ import annotations

import textwrap

import pytest
import torch

from posttrain.config import load_config
from posttrain.errors import ConfigError
from posttrain.trainers.rl import RLConfig, RLTrainer
from tests.trainers.test_rl import rl_config, rows_of

MINIMAL = {"model": {"path": "unused"}, "data": {"train": "unused.jsonl"}}


def config(**algo):
    return load_config(RLConfig, overrides={**MINIMAL, "algo": algo})


@pytest.mark.parametrize("field,typo,meant", [
    ("advantage", "grop", "grpo"),
    ("policy_loss", "clipd", "clipped"),
    ("aggregation", "token_mean", "token-mean"),
    ("whiten", "globl", "global"),
    ("kl_estimator", "k4", None),
    ("kl_controller", "adaptiv", "adaptive"),
    ("lambda_schedule", "length-adaptive", "length_adaptive"),
])
def test_every_choice_is_checked_by_its_registry(field, typo, meant):
    with pytest.raises(ConfigError, match=rf"algo: {field}: unknown .*'{typo}'") as err:
        config(**{field: typo})
    if meant:
        assert f"Did you mean '{meant}'" in str(err.value)


def test_gspo_on_policy_is_refused_with_what_to_do():
    with pytest.raises(ConfigError, match=r"gspo needs more than one update.*mini_batches >= 2"):
        config(policy_loss="gspo", epochs=1, mini_batches=1)
    assert config(policy_loss="gspo", mini_batches=2).algo.policy_loss == "gspo"


def test_group_estimators_need_groups():
    for name in ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"):
        with pytest.raises(ConfigError, match=f"advantage={name} .*samples_per_prompt >= 2"):
            load_config(RLConfig, overrides={**MINIMAL, "algo": {"advantage": name},
                                             "rollout": {"samples_per_prompt": 1}})


def test_rl_has_no_batch_size_to_be_ignored():
    with pytest.raises(ConfigError, match=r"unknown config key 'run\.batch_size'"):
        load_config(RLConfig, overrides={**MINIMAL, "run": {"batch_size": 8}})


USER_MODULE = '''
    import torch
    from posttrain.algos import POLICY_LOSSES, AGGREGATIONS

    CALLS = []

    @POLICY_LOSSES.register("user_reinforce")
    def user_reinforce(logp, old_logp, advantages, response_mask, *, clip_high=0.2):
        """REINFORCE: -A·ratio, recording the clip_high it was given."""
        CALLS.append((tuple(logp.shape), clip_high))
        ratio = torch.exp(logp - old_logp.detach())
        return torch.where(response_mask.bool(), -advantages * ratio, 0.0), {}

    @AGGREGATIONS.register("user_sum")
    def user_sum(loss_mat, mask, *, num_tokens=None, num_seqs=None, num_rows=None,
                 norm_len=None):
        return torch.where(mask.bool(), loss_mat, 0.0).sum() / num_rows
'''


def test_a_user_registered_loss_trains_from_yaml(arithmetic_dir, arithmetic_sft_model,
                                                 tmp_path):
    """`imports:` loads a module that registers a policy loss and an aggregation; a YAML
    config names them, and an RL run trains with them."""
    (tmp_path / "my_algos.py").write_text(textwrap.dedent(USER_MODULE))
    yaml_path = tmp_path / "user.yaml"
    yaml_path.write_text(textwrap.dedent(f"""
        imports: [{tmp_path / 'my_algos.py'}]
        algo:
          policy_loss: user_reinforce
          aggregation: user_sum
          clip_high: 0.5
    """))
    import yaml

    user = yaml.safe_load(yaml_path.read_text())
    cfg = rl_config(arithmetic_dir, "grpo", tmp_path, **user,
                    run={"name": "user-loss", "steps": 2, "eval_every": 0},
                    rollout={"prompts_per_step": 2}, eval={"prompts": 4})
    assert cfg.algo.policy_loss == "user_reinforce" and cfg.algo.aggregation == "user_sum"
    import sys

    calls = sys.modules["posttrain_user_my_algos"].CALLS
    trainer = RLTrainer(cfg)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    result = trainer.train()
    assert result.status == "finished"
    # two steps of two mini-batches, one micro-batch each; the loss got its own number
    assert len(calls) == 4 and all(c[1] == 0.5 for c in calls)
    assert any(not torch.equal(p, b) for p, b in zip(trainer.model.parameters(), before,
                                                     strict=True))
    assert all("loss/policy" in r for r in rows_of(result.run_dir) if "reward/mean" in r)
