"""A reward model from Python: a Bradley-Terry model on preference pairs.

    python examples/python/rm.py
"""

import os

import datasets

import posttrain
from posttrain.pipeline import ensure_sft, ensure_task

task = ensure_task("preference")
pairs = datasets.load_dataset("json", data_files=str(task / "pref_train.jsonl"), split="train")

result = posttrain.rm(
    model=str(ensure_sft(task)),  # the task's SFT model (trained once on first use)
    train_dataset=pairs,
    config={"optim.lr": 1e-3,
            "run": {"name": "example-py-rm", "steps": int(os.environ.get("STEPS", 150)),
                    "batch_size": 32, "eval_every": 50}},
)
print(result.status, result.final_dir, result.eval_metrics)  # eval/accuracy: held-out pairs
