"""DPO from Python, on a built-in task in one call: `task=` fills in the model (its SFT model),
the data and the held-out gold reward; anything else is yours to set.

    python examples/python/dpo.py
"""

import os

import posttrain

result = posttrain.dpo(
    task="preference",
    config={"dpo": {"beta": 0.1},  # or variant: ipo, simpo, orpo, ...
            "optim.lr": 5e-4,
            "run": {"name": "example-py-dpo", "steps": int(os.environ.get("STEPS", 100)),
                    "eval_every": 50}},
)
print(result.status, result.final_dir)
for key in ("eval/accuracy", "eval/margin", "eval/reward"):
    print(f"  {key:<14} {result.eval_metrics[key]:.4f}")
