"""The registry of built-in tasks: `TASKS`, `list_tasks()`, `make_task(name, out_dir, ...)`.

`make` writes, into one directory:

- the data files, JSONL in the public formats of `posttrain.data.formats` (each task module
  lists its files);
- `task.json`: the task's name, description, seed, resolved options, each file with its kind
  and record count, the suggested reward function for RL, and the model directory;
- with `model=True`, `model/`: the tiny Llama and its character tokenizer
  (`posttrain.tasks.tiny.make_tiny_model`), loadable with `from_pretrained`.

Everything is deterministic from the seed: the same seed writes byte-identical data files.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from posttrain.data.formats import validate_record
from posttrain.errors import ConfigError
from posttrain.tasks import arithmetic, multiturn, preference
from posttrain.tasks.tiny import DEFAULT_CHARSET

Builder = Callable[[Path, int, Any], dict[str, list[dict[str, str]]]]
"""`build(out_dir, seed, config) -> {file stem: records}`; may write extra files (gold.json)."""


@dataclass(frozen=True)
class Task:
    """A built-in task: what it is, which files it writes, and how to build them."""

    name: str
    description: str
    """One line, shown by `posttrain tasks list`."""
    config_cls: type
    """Frozen dataclass of the task's options; `make(**options)` fills it."""
    files: Mapping[str, str]
    """File stem -> record kind, e.g. {"sft_train": "completion"}; each is `<stem>.jsonl`."""
    reward: Mapping[str, Any]
    """The reward function suggested for RL, as a spec for `posttrain.rewards` (task.json)."""
    build: Builder
    environment: str | None = None
    """Multi-turn tasks: the environment class for RL (`rollout.environment`), whose turn
    rewards replace `reward` (task.json)."""

    def config(self, **options: Any) -> Any:
        """The task's options, validated; an unknown name is an error naming the closest."""
        known = [f.name for f in fields(self.config_cls)]
        for key in options:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise ConfigError(
                    f"task {self.name!r} has no option {key!r}; {hint}its options are: "
                    f"{', '.join(known)}"
                )
        defaults = self.config_cls()
        for key, value in options.items():
            expected = type(getattr(defaults, key))
            # bool is an int in Python, but `max_operand=True` is a mistake, not a number.
            ok = isinstance(value, expected) and not (isinstance(value, bool) and expected is int)
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                ok, options[key] = True, float(value)
            if not ok:
                raise ConfigError(
                    f"task {self.name!r}: option {key}={value!r} must be of type "
                    f"{expected.__name__}"
                )
        return self.config_cls(**options)

    def make(
        self, out_dir: str | Path, seed: int = 0, model: bool = True, **options: Any
    ) -> Path:
        """Write the task's data files, `task.json` and (with `model`) the tiny model into
        `out_dir` (created if missing; files of an earlier make are overwritten). Returns
        `out_dir`."""
        config = self.config(**options)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        records = self.build(out, seed, config)
        if set(records) != set(self.files):
            raise RuntimeError(f"task {self.name!r} built {sorted(records)}, "
                               f"declared {sorted(self.files)}")  # a bug in the task, not usage
        _check_charset(self.name, records)
        files = {}
        for stem, kind in self.files.items():
            path = out / f"{stem}.jsonl"
            for i, record in enumerate(records[stem], start=1):
                validate_record(record, f"{path} line {i}", kind)
            _write_jsonl(path, records[stem])
            files[stem] = {"path": path.name, "kind": kind, "records": len(records[stem])}
        model_info = None
        if model:
            # Imported here: it pulls in torch and transformers, which `import posttrain`
            # must not.
            from posttrain.tasks.tiny import TinyModelSpec, make_tiny_model

            make_tiny_model(out / "model", seed=seed, charset=DEFAULT_CHARSET)
            model_info = {"path": "model", "charset": DEFAULT_CHARSET,
                          "spec": asdict(TinyModelSpec())}
        description = {
            "name": self.name,
            "description": self.description,
            "seed": seed,
            "options": asdict(config),
            "files": files,
            "reward": dict(self.reward),
            "model": model_info,
        }
        if self.environment is not None:
            description["environment"] = self.environment
        (out / "task.json").write_text(json.dumps(description, indent=2) + "\n")
        return out


def _write_jsonl(path: Path, records: list[dict[str, str]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _check_charset(name: str, records: Mapping[str, list[dict[str, str]]]) -> None:
    # A character outside the tokenizer's charset would become <unk>, and the model could
    # neither read nor write it; catch that here rather than as a silent accuracy ceiling.
    def texts(value):  # a message list's contents, not its keys and brackets
        if isinstance(value, list):
            return "".join(m["content"] for m in value)
        return str(value)

    used = {c for rs in records.values() for r in rs for v in r.values() for c in texts(v)}
    missing = sorted(used - set(DEFAULT_CHARSET))
    if missing:
        raise ConfigError(
            f"task {name!r}: the data uses characters the tiny tokenizer lacks: {missing}; "
            "change the task options so they use only "
            f"{DEFAULT_CHARSET!r} (posttrain.tasks.tiny.DEFAULT_CHARSET)"
        )


def _build_arithmetic(out: Path, seed: int, config: arithmetic.ArithmeticConfig):
    return arithmetic.build_arithmetic(seed, config)


def _build_arithmetic_cot(out: Path, seed: int, config: arithmetic.ArithmeticCotConfig):
    return arithmetic.build_arithmetic_cot(seed, config)


def _build_preference(out: Path, seed: int, config: preference.PreferenceConfig):
    scorer, records = preference.build_preference(seed, config)
    scorer.save(out / "gold.json")
    return records


_ARITHMETIC_FILES = {
    "sft_train": "completion",
    "sft_eval": "completion",
    "rl_train": "prompt",
    "rl_eval": "prompt",
}
_SUM_FILES = {**_ARITHMETIC_FILES, "ptx_train": "completion"}

TASKS: dict[str, Task] = {}
"""Name -> Task, in registration order."""


def register_task(task: Task) -> Task:
    """Add `task` to `TASKS`; a name can be registered only once."""
    if task.name in TASKS:
        raise ConfigError(f"a task named {task.name!r} is already registered; pick another name")
    TASKS[task.name] = task
    return task


register_task(Task(
    name="arithmetic",
    description="a+b= (operands 0..49) answered by the sum; exact-answer reward; the SFT "
    "demonstrator forgets 70% of carries",
    config_cls=arithmetic.ArithmeticConfig,
    files=_SUM_FILES,
    reward={"name": "exact_match", "column": "answer"},
    build=_build_arithmetic,
))
_COT = {"files": {**_SUM_FILES, "pref_train": "preference", "pref_eval": "preference"},
        "reward": {"name": "exact_match", "column": "answer",
                   "extract": arithmetic.ANSWER_PATTERN},
        "build": _build_arithmetic_cot}
"""What the two chain-of-thought tasks share: files, reward, builder."""
register_task(Task(
    name="arithmetic_cot",
    description="a+b= with 1-3 digit operands answered by column-by-column working, then "
    "#answer (responses vary ~4x in length); the SFT demonstrator forgets 70% of carries",
    config_cls=arithmetic.ArithmeticCotConfig,
    **_COT,
))
register_task(Task(
    name="arithmetic_cot_free",
    description="arithmetic_cot where half the demonstrations skip the working (347+85= -> "
    "#432): the response length is free to move (2-32 characters)",
    config_cls=arithmetic.ArithmeticCotFreeConfig,
    **_COT,
))
register_task(Task(
    name="preference",
    description="a hidden gold scorer; preference pairs labelled by Bradley-Terry on it "
    "(SFT -> reward model -> PPO/DPO, over-optimisation)",
    config_cls=preference.PreferenceConfig,
    files={
        "sft_train": "completion",
        "sft_eval": "completion",
        "pref_train": "preference",
        "pref_eval": "preference",
        "rl_train": "prompt",
        "rl_eval": "prompt",
    },
    # Resolved by importing `factory` and calling it with the path (relative to the task
    # directory); the result is a reward function `(prompts, responses, **columns)`.
    reward={"name": "gold", "factory": "posttrain.tasks.preference:GoldReward.from_file",
            "path": "gold.json"},
    build=_build_preference,
))


def list_tasks() -> list[str]:
    """The names of the registered tasks, in registration order."""
    return list(TASKS)


def get_task(name: str) -> Task:
    """The task called `name`; an unknown name is an error listing the valid ones."""
    try:
        return TASKS[name]
    except KeyError:
        close = difflib.get_close_matches(name, TASKS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(
            f"unknown task {name!r}; {hint}the built-in tasks are: {', '.join(TASKS)}"
        ) from None


def make_task(
    name: str, out_dir: str | Path, seed: int = 0, model: bool = True, **options: Any
) -> Path:
    """Write task `name` into `out_dir` (see `Task.make`); returns `out_dir`."""
    return get_task(name).make(out_dir, seed=seed, model=model, **options)

_MULTITURN_FILES = {"sft_train": "messages", "sft_eval": "messages", "rl_train": "prompt",
                    "rl_eval": "prompt"}
register_task(Task(
    name="calculator",
    description="two-digit products (37*48) with a calc tool; the SFT demonstrator guesses "
    "60% of the time and miscopies the tool's result 15% of the rest (multi-turn)",
    config_cls=multiturn.CalculatorConfig,
    files=_MULTITURN_FILES,
    reward={},
    build=lambda out, seed, config: multiturn.build_calculator(seed, config),
    environment="posttrain.tasks.multiturn:CalculatorEnv",
))
register_task(Task(
    name="guess",
    description="find a number in 1..16 from higher/lower feedback; fewer turns score more; "
    "the SFT demonstrator guesses at random within the interval left (multi-turn)",
    config_cls=multiturn.GuessConfig,
    files=_MULTITURN_FILES,
    reward={},
    build=lambda out, seed, config: multiturn.build_guess(seed, config),
    environment="posttrain.tasks.multiturn:GuessEnv",
))
