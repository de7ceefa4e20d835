"""The smallest honest end-to-end run the project can do today: GRPO on a tabular policy.

Until the full pipeline lands (tiny transformer, SFT -> RM -> PPO; see the README), the
quickstart shows the algorithms layer learning on its own: a policy that is a table of logits,
one row per prompt `a+b=`, one column per answer, starts out mostly wrong, samples a group of
answers per prompt, is rewarded 1 for the exact sum, and is updated with GRPO advantages and
the clipped policy loss from `posttrain.algos`. Held-out accuracy is not meaningful for a
table (every prompt has its own row), so the run reports training accuracy: the share of
probability the policy puts on the right answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain.algos import aggregate_loss, clipped_policy_loss, compute_advantages


@dataclass(frozen=True)
class DemoResult:
    accuracy: list[float]  # expected accuracy (mean probability of the right answer) per step
    reward: list[float]  # mean sampled reward per step


def grpo_table_demo(
    steps: int = 30,
    samples_per_prompt: int = 8,
    lr: float = 0.5,
    epochs: int = 2,
    max_operand: int = 5,
    seed: int = 0,
) -> DemoResult:
    gen = torch.Generator().manual_seed(seed)
    pairs = [(a, b) for a in range(max_operand) for b in range(max_operand)]
    n_answers = 2 * max_operand - 1
    correct = torch.tensor([a + b for a, b in pairs])
    # Start biased towards a wrong answer ("a+b-1", or 1 for 0+0), like an imperfect SFT model.
    wrong = torch.where(correct > 0, correct - 1, torch.ones_like(correct))
    logits = torch.zeros(len(pairs), n_answers, dtype=torch.float64)
    logits[torch.arange(len(pairs)), wrong] = 2.0
    logits.requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=lr)
    group_ids = torch.arange(len(pairs)).repeat_interleave(samples_per_prompt)
    accuracy, reward = [], []
    for _ in range(steps):
        with torch.no_grad():
            probs = logits.softmax(-1)
            answers = torch.multinomial(probs, samples_per_prompt, replacement=True, generator=gen)
            answers = answers.reshape(-1)
            rows = group_ids
            old_logp = probs[rows, answers].log()[:, None]  # (B, T=1)
            scores = (answers == correct[rows]).double()
        mask = torch.ones_like(old_logp, dtype=torch.bool)
        token_rewards = scores[:, None]  # the score sits on the one response token
        adv, _ = compute_advantages("grpo", token_rewards, mask, group_ids=group_ids)
        for _ in range(epochs):
            logp = logits.log_softmax(-1)[rows, answers][:, None]
            loss_mat, _ = clipped_policy_loss(logp, old_logp, adv, mask)
            loss = aggregate_loss(loss_mat, mask, "token-mean")
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            p_right = logits.softmax(-1)[torch.arange(len(pairs)), correct]
        accuracy.append(float(p_right.mean()))
        reward.append(float(scores.mean()))
    return DemoResult(accuracy, reward)
