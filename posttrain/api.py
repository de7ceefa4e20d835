"""posttrain from Python: every trainer in a few lines, with the CLI's checks and errors.

    import posttrain

    sft = posttrain.sft(model="my-model", train_dataset=ds, config={"run": {"steps": 200}})
    rl = posttrain.rl(preset="grpo", model=sft.final_dir, train_dataset=prompts,
                      rewards=[my_reward], config={"run": {"steps": 50}})
    print(rl.eval_metrics, rl.final_dir)

Each of `sft`, `rm`, `dpo`, `kto` and `rl` trains and returns the run's `TrainResult` (status,
steps, run directory, final model directory, final evaluation); `build(command, ...)` returns
the trainer without starting it. The config comes in layers, later ones winning, exactly as
`posttrain COMMAND --preset P --task T --config FILE --KEY VALUE` builds it (the CLI calls
`build`): the preset, the task's defaults, `config` (a YAML file, a mapping, or a config
object), the objects given as arguments, then `overrides`.

Objects the CLI would name by path are accepted as objects here:
- `model` / `tokenizer`: a Hugging Face model and tokenizer (saved once, with
  `save_pretrained`, to `RUN_DIR/start_model/`, which the config then names) or paths;
- `train_dataset` / `eval_dataset`: a `datasets.Dataset`, a list of records or a path (records
  are written to `RUN_DIR/data/*.jsonl`, so a data error names a file and line there);
- `rewards` (rl): callables `(prompts, completions, **columns) -> list[float]` (TRL's form
  works), specs as in a config, or `{"function": callable, "weight": w, "name": n}`;
- `environment` (rl): an environment class (`posttrain.rollout.environment.Environment`).

A callable or class defined at the top of an importable module is written into the run's
config.yaml as `module:name`, so `posttrain rl --config RUN_DIR/config.yaml --resume` finds it
again; one defined in a notebook, a `__main__` script or a function lives in this process only
(`posttrain.api:registered.NAME`): resume such a run from Python, by calling the same function
with `resume=True`.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from posttrain.config import load_config, merge, to_dict
from posttrain.errors import ConfigError, DataError

__all__ = ["TRAINERS", "build", "dpo", "kto", "registered", "rl", "rm", "sft", "train"]

TRAINERS: dict[str, tuple[str, str, str, str]] = {
    "sft": ("posttrain.trainers.sft", "SFTConfig", "SFTTrainer",
            "supervised fine-tuning (completion-only loss)"),
    "rm": ("posttrain.trainers.reward", "RMConfig", "RewardModelTrainer",
           "train a Bradley-Terry reward model on preference pairs"),
    "dpo": ("posttrain.trainers.dpo", "DPOConfig", "DPOTrainer",
            "direct preference optimisation (DPO, cDPO, IPO, SimPO, ORPO, DPO-P, DPO+SFT)"),
    "kto": ("posttrain.trainers.kto", "KTOConfig", "KTOTrainer",
            "KTO on unpaired desirable/undesirable examples (prompt, completion, label)"),
    "rl": ("posttrain.trainers.rl", "RLConfig", "RLTrainer",
           "RL with a preset (--preset; `posttrain rl --help` lists them)"),
}

registered = SimpleNamespace()
"""Reward functions and environment classes given as objects that no import path reaches
(a notebook's, a lambda), by the name the run's config gives them."""


def config_class(command: str) -> type:
    """The config class of a trainer command (`sft`, `rm`, `dpo`, `kto`, `rl`)."""
    module, cfg_name, _, _ = _entry(command)
    return getattr(importlib.import_module(module), cfg_name)


def _entry(command: str) -> tuple[str, str, str, str]:
    if command not in TRAINERS:
        raise ConfigError(f"unknown trainer {command!r}; trainers: {', '.join(TRAINERS)}")
    return TRAINERS[command]


def build(command: str, config: str | os.PathLike | Mapping[str, Any] | Any = None, *,
          preset: str | None = None, task: str | None = None, model: Any = None,
          tokenizer: Any = None, train_dataset: Any = None, eval_dataset: Any = None,
          rewards: Sequence[Any] | None = None, environment: Any = None,
          callbacks: Iterable[Any] = (), overrides: Mapping[str, Any] | None = None,
          resume: bool = False) -> Any:
    """The trainer of `command`, configured and checked, not yet started (`.train()` runs it).

    Args:
        command: sft, rm, dpo, kto or rl.
        config: a YAML file (may say `base:`), a mapping (nested, or with dotted keys such as
            `{"optim.lr": 1e-4}`), or a config object (`posttrain.trainers.sft.SFTConfig`);
            a config object holds every value, so it takes no preset or task.
        preset: rl only: an algorithm preset (grpo, ppo, dapo, ...).
        task: a built-in task (`posttrain tasks list`): its data, tiny model and earlier
            stages, made under runs/tasks/NAME on first use, as `--task` does.
        model, tokenizer: a path or hub id, or a loaded model and tokenizer.
        train_dataset, eval_dataset: a `datasets.Dataset`, a list of records or a path.
        rewards: rl: the reward terms (callables, specs, or mappings with a callable).
        environment: rl: the environment class of multi-turn episodes.
        callbacks: `posttrain.callbacks.Callback`s (or functions `(trainer, step, metrics)`).
        overrides: the last layer, a mapping like `config`.
        resume: continue from the run's newest complete checkpoint.

    Raises:
        posttrain.PosttrainError: (ConfigError, DataError, ...) with the CLI's one-line message.
    """
    from posttrain import distributed, pipeline

    module, cfg_name, trainer_name, _ = _entry(command)
    mod = importlib.import_module(module)
    cls = getattr(mod, cfg_name)
    if command != "rl" and (preset or rewards is not None or environment is not None):
        given = [n for n, v in (("preset", preset), ("rewards", rewards),
                                ("environment", environment)) if v is not None]
        raise ConfigError(f"{command}: {', '.join(given)} is for rl only")
    dist = distributed.init()
    layers: list[dict[str, Any]] = []
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        if preset or task:
            raise ConfigError("give a preset or task, or a config object, not both (a config "
                              "object holds every value already; pass a mapping to adapt it)")
        layers.append(to_dict(config))
        config = None
    preset_values = pipeline.load_preset(preset) if preset else {}
    base: dict[str, Any] = {}
    if task:
        # Under torchrun rank 0 makes the task and its earlier stages alone, first.
        if dist.is_main:
            with distributed.local_only():
                base = _task_base(command, pipeline.ensure_task(task), preset_values)
        dist.barrier()
        base = _task_base(command, pipeline.ensure_task(task), preset_values)
    layers.insert(0, merge(preset_values, base) if command == "rl" else base)
    path = None
    if isinstance(config, str | os.PathLike):
        path = config
    elif isinstance(config, Mapping):
        layers.append(_nested(config, "config"))
    elif config is not None:
        raise ConfigError(f"config: expected a YAML file, a mapping or a {cfg_name}, got "
                          f"{type(config).__name__}")
    over = _nested(overrides or {}, "overrides")
    if resume:
        over = merge(over, {"run": {"resume": True}})
    base_data = {}
    for layer in layers:
        base_data = merge(base_data, layer)
    preset_dir = pipeline.preset_dir()
    # where the run writes, for the objects that have to become files first
    probe = merge(merge(base_data, _read(path, preset_dir)), over)
    run_dir = _run_dir(cls, probe)
    given = _objects(command, run_dir, dist.is_main, model, tokenizer, train_dataset,
                     eval_dataset, rewards, environment)
    dist.barrier()
    cfg = load_config(cls, path, merge(given, over), preset_dir=preset_dir, base=base_data)
    trainer = getattr(mod, trainer_name)(cfg)
    trainer.callbacks.extend(callbacks)
    return trainer


def train(command: str, config: Any = None, **kwargs: Any) -> Any:
    """`build(command, config, **kwargs).train()`: the run's `TrainResult`."""
    return build(command, config, **kwargs).train()


def sft(config: Any = None, **kwargs: Any) -> Any:
    """Supervised fine-tuning (completion-only loss) on prompt/completion, conversation or
    text records; see `build` for the arguments. Returns the run's `TrainResult`."""
    return train("sft", config, **kwargs)


def rm(config: Any = None, **kwargs: Any) -> Any:
    """A Bradley-Terry reward model on preference pairs (prompt, chosen, rejected); see
    `build`. Returns the run's `TrainResult`."""
    return train("rm", config, **kwargs)


def dpo(config: Any = None, **kwargs: Any) -> Any:
    """DPO and its variants (`loss.type`: sigmoid, ipo, simpo, orpo, ...) on preference pairs;
    see `build`. Returns the run's `TrainResult`."""
    return train("dpo", config, **kwargs)


def kto(config: Any = None, **kwargs: Any) -> Any:
    """KTO on unpaired (prompt, completion, label) records; see `build`. Returns the run's
    `TrainResult`."""
    return train("kto", config, **kwargs)


def rl(config: Any = None, **kwargs: Any) -> Any:
    """RL with a preset (`preset="grpo"`, ppo, dapo, rloo, ...) on prompt records, with
    `rewards` (callables or specs) and/or an `environment`; see `build`. Returns the run's
    `TrainResult`."""
    return train("rl", config, **kwargs)


# ------------------------------------------------------------------ the layers


def _task_base(command: str, task_dir: Path, preset: dict[str, Any]) -> dict[str, Any]:
    """What a built-in task fills in for `command` (making the stages it needs first)."""
    from posttrain import pipeline

    if command == "rl":
        # the task adapts the preset (e.g. a critic from the policy under rule rewards)
        return pipeline.rl_base(task_dir, preset)
    return {"sft": pipeline.sft_base, "rm": pipeline.rm_base,
            "dpo": pipeline.dpo_base, "kto": pipeline.kto_base}[command](task_dir)


def _nested(values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """`{"optim.lr": 1e-4, "run": {"steps": 5}}` -> `{"optim": {"lr": 1e-4}, "run": {...}}`."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{where}: key {key!r} is no config key")
        value = _nested(value, where) if isinstance(value, Mapping) else value
        *sections, leaf = key.split(".")
        out = merge(out, _tree(sections, {leaf: value}))
    return out


def _tree(sections: list[str], leaf: dict[str, Any]) -> dict[str, Any]:
    for name in reversed(sections):
        leaf = {name: leaf}
    return leaf


def _read(path: Any, preset_dir: Path) -> dict[str, Any]:
    from posttrain.config import read_yaml

    return read_yaml(path, preset_dir) if path is not None else {}


def _run_dir(cls: type, data: Mapping[str, Any]) -> Path:
    """The run directory a config of `cls` built from `data` will have."""
    run_field = next(f for f in dataclasses.fields(cls) if f.name == "run")
    default = run_field.default_factory()  # type: ignore[misc]
    run = data.get("run") or {}
    return Path(str(run.get("output_dir", default.output_dir))) / str(run.get("name",
                                                                              default.name))


def _objects(command: str, run_dir: Path, main: bool, model: Any, tokenizer: Any,
             train_dataset: Any, eval_dataset: Any, rewards: Sequence[Any] | None,
             environment: Any) -> dict[str, Any]:
    """The config values of the objects given as arguments (files written on rank 0)."""
    out: dict[str, Any] = {}
    if model is not None:
        out["model"] = _model(model, tokenizer, run_dir / "start_model", main)
    elif tokenizer is not None:
        if not isinstance(tokenizer, str | os.PathLike):
            raise ConfigError("tokenizer: a tokenizer object needs its model (model=...); "
                              "alone, give the tokenizer's directory")
        out["model"] = {"tokenizer": str(tokenizer)}
    data: dict[str, Any] = {}
    for key, records in (("train", train_dataset), ("eval", eval_dataset)):
        if records is not None:
            data[key] = _data_file(records, run_dir / "data" / f"{key}.jsonl", main,
                                   f"{key}_dataset")
    if data:
        out["data"] = data
    if rewards is not None:
        if isinstance(rewards, str | Mapping) or callable(rewards):
            rewards = [rewards]
        out["reward"] = {"terms": [_reward_term(r, i) for i, r in enumerate(rewards)]}
    if environment is not None:
        if isinstance(environment, str):
            spec = environment
        elif isinstance(environment, type):
            spec = _spec_of(environment, "environment")
        else:
            raise ConfigError(f"environment: expected a class (it is made once per episode) "
                              f"or 'module:Class', got a {type(environment).__name__}")
        out["rollout"] = {"environment": spec}
    return out


def _model(model: Any, tokenizer: Any, directory: Path, main: bool) -> dict[str, Any]:
    if isinstance(model, str | os.PathLike):
        values = {"path": str(model)}
        if tokenizer is not None and not isinstance(tokenizer, str | os.PathLike):
            tok_dir = directory.parent / "start_tokenizer"
            if main:
                tokenizer.save_pretrained(str(tok_dir))
            values["tokenizer"] = str(tok_dir)
        elif tokenizer is not None:
            values["tokenizer"] = str(tokenizer)
        return values
    if not callable(getattr(model, "save_pretrained", None)):
        raise ConfigError(f"model: expected a path, a hub id or a transformers model, got a "
                          f"{type(model).__name__}")
    if tokenizer is None or isinstance(tokenizer, str | os.PathLike):
        raise ConfigError("model: a model object needs its tokenizer object too "
                          "(tokenizer=...), saved beside it for the run")
    if main:
        # the run loads its policy, reference and critic from files, as from the CLI
        model.save_pretrained(str(directory), safe_serialization=True)
        tokenizer.save_pretrained(str(directory))
    return {"path": str(directory)}


def _data_file(records: Any, path: Path, main: bool, where: str) -> str:
    """A path as it is; records written to `path` as JSON lines (unchanged files are not
    rewritten)."""
    if isinstance(records, str | os.PathLike):
        return str(records)
    if hasattr(records, "to_list") and callable(records.to_list):  # datasets.Dataset
        records = records.to_list()
    elif hasattr(records, "to_dict") and hasattr(records, "columns"):  # pandas.DataFrame
        records = records.to_dict("records")
    if isinstance(records, Mapping) or not isinstance(records, Iterable):
        raise ConfigError(f"{where}: expected a datasets.Dataset, a list of records (dicts) or "
                          f"a path, got a {type(records).__name__}")
    lines = []
    for i, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise DataError(f"{where}[{i}]: expected a record (a dict of columns), got a "
                            f"{type(record).__name__}")
        try:
            lines.append(json.dumps(dict(record), ensure_ascii=False))
        except (TypeError, ValueError) as err:
            raise DataError(f"{where}[{i}]: a value JSON cannot hold ({err}); give columns of "
                            "strings, numbers, booleans, lists and dicts") from None
    if not lines:
        raise DataError(f"{where}: no records")
    text = "\n".join(lines) + "\n"
    if main and not (path.is_file() and path.read_text(encoding="utf-8") == text):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)  # atomic: a half-written file is never read
    return str(path)


def _reward_term(reward: Any, i: int) -> str | dict[str, Any]:
    where = f"rewards[{i}]"
    if isinstance(reward, str):
        return reward
    if isinstance(reward, Mapping):
        term = dict(reward)
        if callable(term.get("function")):
            fn = term["function"]
            term["function"] = _spec_of(fn, where)
            term.setdefault("name", _name_of(fn))
        return term
    if callable(reward):
        return {"name": _name_of(reward), "function": _spec_of(reward, where)}
    raise ConfigError(f"{where}: expected a function, a spec ('module:fn', {{name: "
                      f"exact_match, column: answer}}) or a mapping, got a "
                      f"{type(reward).__name__}")


def _name_of(obj: Any) -> str:
    name = getattr(obj, "__name__", type(obj).__name__)
    return re.sub(r"\W", "_", name).strip("_") or "reward"


def _spec_of(obj: Any, where: str) -> str:
    """`module:qualname` when an import finds `obj` again, else its name in `registered`."""
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", "")
    if module and module != "__main__" and "<" not in qualname:
        try:
            found: Any = importlib.import_module(module)
            for part in qualname.split("."):
                found = getattr(found, part)
        except (ImportError, AttributeError):
            found = None
        if found is obj:
            return f"{module}:{qualname}"
    for name, held in vars(registered).items():
        if held is obj:
            return f"{__name__}:registered.{name}"
    stem, n = _name_of(obj), 0
    while hasattr(registered, f"{stem}_{n}"):
        n += 1
    setattr(registered, f"{stem}_{n}", obj)
    return f"{__name__}:registered.{stem}_{n}"
