"""Reward functions: `(prompts, responses, **columns) -> list[float]`, one score per response.

`prompts` are strings or chat-message lists, `responses` strings, and `columns` the dataset's
other columns (e.g. `answer`) by name, each a list aligned with `responses`. A reward function
ignores the columns it does not use.

This package is plain Python on strings and imports no heavy package; the reward-model scorer
(`posttrain.rewards.model`) is imported on its own.
"""

from posttrain.rewards.combine import (
    ON_ERROR,
    TermScores,
    WeightedSum,
    call_reward,
    describe,
    load_reward_function,
)
from posttrain.rewards.rules import (
    RULE_REWARDS,
    ExactMatch,
    FormatRegex,
    LengthPenalty,
    MathVerify,
    NumericAnswer,
    last_number,
    make_rule_reward,
)

__all__ = [
    "ON_ERROR",
    "RULE_REWARDS",
    "ExactMatch",
    "FormatRegex",
    "LengthPenalty",
    "MathVerify",
    "NumericAnswer",
    "TermScores",
    "WeightedSum",
    "call_reward",
    "describe",
    "last_number",
    "load_reward_function",
    "make_rule_reward",
]
