"""GRPO from Python with a reward function written right here (TRL's signature works:
prompts, completions and the dataset's columns by keyword).

    python examples/python/rl_grpo.py
"""

import os

import datasets

import posttrain
from posttrain.pipeline import ensure_sft, ensure_task


def correct(prompts, completions, answer, **kwargs):
    """1 for a completion that is the record's `answer` exactly, else 0."""
    return [1.0 if c.strip() == str(a) else 0.0 for c, a in zip(completions, answer, strict=True)]


task = ensure_task("arithmetic")
prompts = datasets.load_dataset("json", data_files=str(task / "rl_train.jsonl"), split="train")

result = posttrain.rl(
    preset="grpo",
    model=str(ensure_sft(task)),
    train_dataset=prompts,
    rewards=[correct],
    config={"rollout": {"max_new_tokens": 4}, "optim.lr": 1e-4, "eval.prompts": 250,
            "run": {"name": "example-py-grpo", "steps": int(os.environ.get("STEPS", 150)),
                    "eval_every": 50}},
)
print(result.status, result.final_dir)
print(f"  greedy accuracy {result.eval_metrics['eval/reward']:.3f}, "
      f"sampled {result.eval_metrics['eval/reward_sampled']:.3f}")
