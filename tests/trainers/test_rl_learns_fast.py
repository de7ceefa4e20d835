"""A learning check fast enough for `make test-fast`: a sign error anywhere in the wiring
(advantages, ratio, loss, aggregation, optimiser step) makes it fail.

The reward is a bandit on the first answer token (1 when the answer starts with "7"). What is
measured is exact, not sampled: the policy's probability of "7" as the first answer token,
averaged over held-out prompts, from a forward pass before and after a few GRPO steps. RL must
raise it a lot; with the advantage's sign flipped it falls.
"""

from __future__ import annotations

import torch

from posttrain.trainers.rl import RLTrainer
from tests.trainers.test_rl import rl_config


def p_seven(trainer) -> float:
    tok = trainer.tokenizer
    seven = tok("7", add_special_tokens=False).input_ids[-1]
    total = 0.0
    with torch.no_grad():
        for ids, _ in trainer.eval_items[:32]:
            logits = trainer.model(input_ids=torch.tensor([ids])).logits[0, -1]
            total += float(torch.softmax(logits.float(), -1)[seven])
    return total / min(len(trainer.eval_items), 32)


def run(arithmetic_dir, tmp_path, name, flip=False):
    cfg = rl_config(arithmetic_dir, "grpo", tmp_path,
                    run={"name": name, "steps": 10, "eval_every": 0},
                    rollout={"prompts_per_step": 8, "samples_per_prompt": 8},
                    optim={"lr": 1e-3}, eval={"prompts": 32, "samples_per_prompt": 0},
                    algo={"kl_placement": "none", "mini_batches": 1},
                    reward={"terms": ["tests.trainers.user_rewards:starts_with_seven"]})
    trainer = RLTrainer(cfg)
    if flip:  # the defect this test exists for: the advantages' sign wired the wrong way
        real = trainer.advantages
        trainer.advantages = lambda exp: (lambda e: e.replace(advantages=-e.advantages))(
            real(exp))
    before = p_seven(trainer)
    trainer.train()
    return before, p_seven(trainer)


def test_grpo_raises_the_rewarded_tokens_probability(arithmetic_dir, arithmetic_sft_model,
                                                     tmp_path):
    before, after = run(arithmetic_dir, tmp_path, "fast")
    # measured 0.085 -> 0.72, 0.92, 0.92 at seeds 0, 1, 2 (4 prompts a step were too few:
    # 0.08 -> 0.08 .. 0.29 by seed)
    assert after > before + 0.3, (before, after)
    flipped_before, flipped_after = run(arithmetic_dir, tmp_path, "flipped", flip=True)
    assert flipped_before == before and flipped_after < before, (before, flipped_after)
