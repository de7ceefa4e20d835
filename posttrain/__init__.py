"""posttrain: post-training for language models.

`import posttrain` stays light: it imports neither `transformers` nor any other heavy optional
package. Import the sub-packages you need (`posttrain.algos`, ...).
"""

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
]
