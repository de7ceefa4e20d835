"""Multi-turn RL from Python: an environment class written right here. The policy answers a
sum; a wrong answer is told "no" and gets one more try; a right one scores 1 at its turn.

    python examples/python/rl_environment.py
"""

import os

import posttrain
from posttrain.pipeline import ensure_sft, ensure_task
from posttrain.rollout.environment import Environment, Step


class SecondChance(Environment):
    def reset(self, prompt, answer, **columns):
        self.answer, self.turn = str(answer), 0

    def step(self, text):
        self.turn += 1
        right = text.strip() == self.answer
        if right or self.turn == 2:
            return Step(done=True, reward=float(right))
        return Step(observation="no")  # a user message, rendered by the chat template


task = ensure_task("arithmetic")
result = posttrain.rl(
    preset="grpo",
    model=str(ensure_sft(task)),
    train_dataset=str(task / "rl_train.jsonl"),  # a path works too
    environment=SecondChance,
    config={"rollout": {"max_new_tokens": 4, "max_turns": 2}, "optim.lr": 1e-4,
            "run": {"name": "example-py-second-chance",
                    "steps": int(os.environ.get("STEPS", 100)), "eval_every": 50}},
)
print(result.status, result.final_dir)
for key, value in sorted(result.eval_metrics.items()):
    print(f"  {key:<32} {value:.4f}")
