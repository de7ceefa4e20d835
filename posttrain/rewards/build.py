"""Reward specs (from a config or a task.json) -> reward functions.

A spec is either a string, `"package.module:function"` or `"path/file.py:function"`, or a
mapping with a `name`:
- a rule of `posttrain.rewards.rules` with its arguments: `{"name": "exact_match",
  "column": "answer"}`;
- `{"name": "reward_model", "path": DIR}`: score with a trained reward model;
- `{"name": ..., "function": "module:function"}`: a user's function;
- `{"name": ..., "factory": "module:callable", "path": ..., ...}`: call the factory with the
  other keys (a task's gold scorer is built this way).
Every spec may carry `weight` (used by `build_rewards` for weighted sums). Relative paths
are resolved against `base_dir` (the task directory).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from posttrain.errors import ConfigError
from posttrain.rewards.combine import WeightedSum, load_reward_function
from posttrain.rewards.rules import RULE_REWARDS, make_rule_reward


def resolve_path(path: Any, base_dir: str | Path | None) -> str:
    """`path`, or `base_dir/path` when it is relative and exists there."""
    p = Path(str(path))
    if not p.is_absolute() and base_dir is not None and (Path(base_dir) / p).exists():
        p = Path(base_dir) / p
    return str(p)


def build_reward(spec: str | Mapping[str, Any], base_dir: str | Path | None = None,
                 device: str | None = None) -> Any:
    """One reward function from a spec (see the module docstring)."""
    base = Path(base_dir) if base_dir is not None else None
    if isinstance(spec, str):
        return load_reward_function(spec)
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ConfigError(f"a reward spec is 'module:function' or a mapping with a 'name'; "
                          f"got {spec!r}")
    args = {k: v for k, v in spec.items() if k not in ("name", "weight")}
    name = spec["name"]
    if "factory" in args:
        factory = load_reward_function(args.pop("factory"))
        if "path" in args:
            args["path"] = resolve_path(args["path"], base)
        return factory(**args)
    if "function" in args:
        return load_reward_function(args["function"])
    if name == "reward_model":
        if "path" not in args:
            raise ConfigError("a reward_model reward needs 'path': the reward model directory")
        from posttrain.models.load import load_reward_model, load_tokenizer
        from posttrain.rewards.model import RewardModelReward

        path = resolve_path(args["path"], base)
        model = load_reward_model(path, device=device or "cpu")
        from posttrain.models.load import freeze

        return RewardModelReward(freeze(model), load_tokenizer(path),
                                 batch_size=int(args.get("batch_size", 32)))
    if name in RULE_REWARDS:
        return make_rule_reward(name, **args)
    raise ConfigError(f"unknown reward {name!r}: give a rule ({', '.join(sorted(RULE_REWARDS))}),"
                      " 'reward_model' with a path, or a 'function'/'factory' to import")


def build_rewards(specs: Sequence[str | Mapping[str, Any]], base_dir: str | Path | None = None,
                  device: str | None = None, on_error: str = "raise",
                  error_score: float = 0.0) -> WeightedSum:
    """A weighted sum of the specs' reward functions (weight 1 unless a spec says otherwise)."""
    if not specs:
        raise ConfigError("no reward configured: set reward.terms (or use --task)")
    terms = []
    for i, spec in enumerate(specs):
        try:
            fn = build_reward(spec, base_dir, device)
        except ConfigError as err:
            raise ConfigError(f"reward.terms[{i}]: {err}") from None
        name = spec if isinstance(spec, str) else str(spec.get("name", f"term{i}"))
        weight = 1.0 if isinstance(spec, str) else float(spec.get("weight", 1.0))
        terms.append((name, fn, weight))
    return WeightedSum(terms, on_error=on_error, error_score=error_score)
