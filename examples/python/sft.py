"""Supervised fine-tuning from Python, as in a notebook.

The built-in `arithmetic` task gives a tiny model and prompt/completion records; use your own
model directory (or hub id) and `datasets.Dataset` the same way.

    python examples/python/sft.py
"""

import os

import datasets

import posttrain
from posttrain.pipeline import ensure_task

task = ensure_task("arithmetic")  # data files and a tiny model, written once
train = datasets.load_dataset("json", data_files=str(task / "sft_train.jsonl"), split="train")

result = posttrain.sft(
    model=str(task / "model"),
    train_dataset=train,
    config={
        "optim": {"lr": 1e-3, "schedule": "cosine", "warmup_steps": 20},
        "run": {"name": "example-py-sft", "steps": int(os.environ.get("STEPS", 2000)),
                "batch_size": 64, "eval_every": 500},
        "eval": {"max_new_tokens": 4},
    },
)
print(result.status, result.final_dir, result.eval_metrics)
