"""KTO from Python on unpaired examples (prompt, completion, label), here made from the
preference task's pairs: chosen responses desirable, rejected ones undesirable.

    python examples/python/kto.py
"""

import json
import os

import posttrain
from posttrain.pipeline import ensure_sft, ensure_task

task = ensure_task("preference")
examples = []
for line in open(task / "pref_train.jsonl"):
    pair = json.loads(line)
    examples.append({"prompt": pair["prompt"], "completion": pair["chosen"], "label": True})
    examples.append({"prompt": pair["prompt"], "completion": pair["rejected"], "label": False})

result = posttrain.kto(
    model=str(ensure_sft(task)),
    train_dataset=examples,  # a list of records works as a datasets.Dataset does
    config={"optim.lr": 5e-4,
            "run": {"name": "example-py-kto", "steps": int(os.environ.get("STEPS", 100)),
                    "batch_size": 32, "eval_every": 50}},
)
print(result.status, result.final_dir, result.eval_metrics)
