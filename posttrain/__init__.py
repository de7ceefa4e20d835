"""posttrain: post-training for language models.

`import posttrain` stays light: it imports neither `transformers` nor any other heavy optional
package. Import the sub-packages you need (`posttrain.algos`, ...).

Training from Python (`posttrain.api`; docs/guide.md "Python API"):

    import posttrain
    result = posttrain.sft(task="arithmetic", config={"run": {"steps": 200}})
    result = posttrain.rl(preset="grpo", model=result.final_dir, train_dataset=prompts,
                          rewards=[my_reward])
"""

from posttrain.api import build, dpo, kto, rl, rm, sft, train
from posttrain.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    NonFiniteError,
    PosttrainError,
    RewardError,
    ShapeError,
)

__version__ = "0.1.0.dev0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "NonFiniteError",
    "PosttrainError",
    "RewardError",
    "ShapeError",
    "__version__",
    "build",
    "dpo",
    "kto",
    "rl",
    "rm",
    "sft",
    "train",
]
