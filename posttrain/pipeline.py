"""`--task NAME`: run any trainer on a built-in task without writing a config.

The task's data and tiny model are written once under `runs/tasks/<task>/` (or
`$POSTTRAIN_TASKS/<task>/`); the stages a
trainer needs first (an SFT model for RM/DPO/RL, a reward model for PPO on `preference`) are
trained once with the task's defaults and reused. Anything can still be overridden on the
command line (`--optim.lr`, `--run.steps`, ...).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from posttrain.errors import ConfigError


def task_root() -> Path:
    """Where tasks and their stages are kept: $POSTTRAIN_TASKS, else runs/tasks."""
    return Path(os.environ.get("POSTTRAIN_TASKS", Path("runs") / "tasks"))


# Per task: SFT budget and response length that suit the tiny model on 2 CPU cores.
# arithmetic, measured over task seeds 0-3 (2000 steps, cosine): lr 1e-3 gives greedy held-out
# accuracy 0.56-0.62 at every seed; 3e-3 stayed on the loss plateau (about 1.0) at seed 2
# (greedy 0.12) and weight decay 0.1 did not help.
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "arithmetic": {"sft_steps": 2000, "max_new_tokens": 4, "sft_lr": 1e-3},
    # 600 steps left the tiny model copying digits wrong (greedy 0.78 of which most errors
    # were a misread operand digit, and RL lowered it); at 1,500 it reads them right and makes
    # the demonstrator's systematic slip, forgetting the carries (greedy 0.50, seed 0)
    "arithmetic_cot": {"sft_steps": 1500, "max_new_tokens": 40, "sft_lr": 3e-3},
    "arithmetic_cot_free": {"sft_steps": 1500, "max_new_tokens": 40, "sft_lr": 3e-3},
    "preference": {"sft_steps": 200, "max_new_tokens": 14, "sft_lr": 3e-3},
    # multi-turn: max_new_tokens per turn (calc(37*48) and #1776 fit 14), max_turns per episode
    "calculator": {"sft_steps": 1500, "max_new_tokens": 14, "sft_lr": 3e-3, "max_turns": 3},
    "guess": {"sft_steps": 1000, "max_new_tokens": 4, "sft_lr": 3e-3, "max_turns": 6},
}


def task_info(task_dir: Path) -> dict[str, Any]:
    return json.loads((task_dir / "task.json").read_text())


def ensure_task(name: str, root: Path | None = None, seed: int = 0) -> Path:
    """The task directory, written on first use."""
    from posttrain.tasks import get_task

    task = get_task(name)
    out = Path(root if root is not None else task_root()) / name
    if not (out / "task.json").exists():
        print(f"writing task {name!r} to {out}/", flush=True)
        task.make(out, seed=seed)
    return out


def _file(task_dir: Path, key: str) -> str:
    info = task_info(task_dir)
    if key not in info["files"]:
        raise ConfigError(f"task {info['name']!r} has no {key} data; it has "
                          f"{', '.join(info['files'])}")
    return str(task_dir / info["files"][key]["path"])


def _defaults(task_dir: Path) -> dict[str, Any]:
    return TASK_DEFAULTS.get(task_info(task_dir)["name"], TASK_DEFAULTS["arithmetic"])


def sft_base(task_dir: Path) -> dict[str, Any]:
    d = _defaults(task_dir)
    return {
        "model": {"path": str(task_dir / "model")},
        "data": {"train": _file(task_dir, "sft_train"), "eval": _file(task_dir, "sft_eval")},
        "optim": {"lr": d["sft_lr"], "warmup_steps": 20, "schedule": "cosine"},
        "run": {"output_dir": str(task_dir), "name": "sft", "steps": d["sft_steps"],
                "batch_size": 64, "eval_every": max(1, d["sft_steps"] // 3), "log_every": 25},
        "eval": {"generate_samples": 100, "max_new_tokens": d["max_new_tokens"]},
    }


def ensure_sft(task_dir: Path, overrides: dict[str, Any] | None = None) -> Path:
    """The task's SFT model (trained with the task defaults on first use)."""
    final = task_dir / "sft" / "final"
    if (final / "config.json").exists():
        return final
    from posttrain.config import load_config, merge
    from posttrain.trainers.sft import SFTConfig, SFTTrainer

    print(f"training the SFT model for {task_dir.name} first ({final})", flush=True)
    # an interrupted stage continues from its last checkpoint
    resume = {"run": {"resume": True}}
    cfg = load_config(SFTConfig,
                      overrides=merge(merge(sft_base(task_dir), resume), overrides or {}))
    SFTTrainer(cfg).train()
    return final


def rm_base(task_dir: Path) -> dict[str, Any]:
    sft = ensure_sft(task_dir)
    return {
        "model": {"path": str(sft)},
        "data": {"train": _file(task_dir, "pref_train"), "eval": _file(task_dir, "pref_eval")},
        "optim": {"lr": 1e-3, "warmup_steps": 10, "schedule": "cosine"},
        "run": {"output_dir": str(task_dir), "name": "rm", "steps": 150, "batch_size": 32,
                "eval_every": 50, "log_every": 25},
        # the response length of the SFT policy's samples, if --rm.normalize policy_samples
        "rm": {"normalize_max_new_tokens": _defaults(task_dir)["max_new_tokens"]},
    }


def ensure_rm(task_dir: Path, overrides: dict[str, Any] | None = None) -> Path:
    """The task's reward model (trained with the task defaults on first use)."""
    final = task_dir / "rm" / "final"
    if (final / "config.json").exists():
        return final
    from posttrain.config import load_config, merge
    from posttrain.trainers.reward import RewardModelTrainer, RMConfig

    print(f"training the reward model for {task_dir.name} first ({final})", flush=True)
    # an interrupted stage continues from its last checkpoint
    resume = {"run": {"resume": True}}
    cfg = load_config(RMConfig, overrides=merge(merge(rm_base(task_dir), resume), overrides or {}))
    RewardModelTrainer(cfg).train()
    return final


def dpo_base(task_dir: Path) -> dict[str, Any]:
    sft = ensure_sft(task_dir)
    return {
        "model": {"path": str(sft)},
        "data": {"train": _file(task_dir, "pref_train"), "eval": _file(task_dir, "pref_eval")},
        "optim": {"lr": 5e-4, "warmup_steps": 10},
        "run": {"output_dir": "runs", "name": "dpo", "steps": 100, "batch_size": 32,
                "eval_every": 50, "log_every": 25},
        # the hidden gold scorer judges sampled responses (it is not trained on)
        "eval": {"reward": task_info(task_dir)["reward"], "reward_base_dir": str(task_dir),
                 "max_new_tokens": _defaults(task_dir)["max_new_tokens"]},
    }


def ensure_unpaired(task_dir: Path) -> dict[str, str]:
    """The task's preference pairs as KTO's unpaired records (`prompt`, `completion`, `label`:
    chosen -> true, rejected -> false), written once beside them as kto_train.jsonl and
    kto_eval.jsonl; returns their paths by split."""
    from posttrain.data.formats import unpair_preferences
    from posttrain.data.loading import load_examples

    out = {}
    for split in ("train", "eval"):
        path = task_dir / f"kto_{split}.jsonl"
        if not path.exists():
            rows = [{"prompt": ex.prompt, "completion": ex.completion, "label": ex.label,
                     **ex.extra}
                    for ex in unpair_preferences(load_examples(_file(task_dir, f"pref_{split}"),
                                                               "preference"))]
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
            tmp.replace(path)  # atomic: a half-written file is never read
        out[split] = str(path)
    return out


def kto_base(task_dir: Path) -> dict[str, Any]:
    """KTO on the task: its preference pairs unpaired, trained and judged like DPO."""
    base = dpo_base(task_dir)
    files = ensure_unpaired(task_dir)
    return {**base, "data": {"train": files["train"], "eval": files["eval"]},
            "run": {**base["run"], "name": "kto"}}


def rl_base(task_dir: Path, preset: dict[str, Any]) -> dict[str, Any]:
    """Model, data and rewards for RL on the task; the preset supplies the algorithm."""
    info = task_info(task_dir)
    d = _defaults(task_dir)
    sft = ensure_sft(task_dir)
    reward: dict[str, Any] = {"base_dir": str(task_dir)}
    algo: dict[str, Any] = {"critic_lr": 3e-3}
    if info["name"] == "preference":
        # InstructGPT: the learned reward model is the training signal; the hidden gold
        # scorer only judges.
        rm = ensure_rm(task_dir)
        reward["terms"] = [{"name": "reward_model", "path": str(rm)}]
        reward["gold"] = info["reward"]
    elif info.get("environment"):  # multi-turn: the environment's turn rewards
        reward["terms"] = []
    else:
        reward["terms"] = [info["reward"]]
    if info["name"] != "preference":
        if preset.get("algo", {}).get("critic_init", "reward_model") == "reward_model":
            algo["critic_init"] = "policy"  # rule rewards: there is no reward model
    if preset.get("algo", {}).get("lambda_schedule") == "length_adaptive":
        # VAPO's α = 0.05 is for chains of thought hundreds of tokens long (λ = 1 − 1/(α·l)
        # ≈ 0.98 and up). The built-in tasks answer in ~5 tokens, where α = 0.05 clamps λ to
        # 0 and leaves the policy a one-step TD of a young critic (measured on arithmetic:
        # runs that collapse or stall depending on the seed); α = 0.5 gives λ ≈ 0.5-0.8 there,
        # and learned at every seed tried.
        algo["length_alpha"] = 0.5
    if preset.get("algo", {}).get("ptx_coef"):
        # InstructGPT mixes in pretraining text, which keeps skills RL is not rewarding; a task
        # may ship such text (`ptx_train`), else the SFT demonstrations stand in. On
        # `arithmetic` the demonstrations carry the demonstrator's forgotten carries, and ptx on
        # them pulls the policy back to that slip (measured over seeds 0-2: greedy gain
        # 0.03 ± 0.07, against 0.21 ± 0.04 for PPO); with its `ptx_train`, the right
        # carry-free sums, the gain is 0.23 ± 0.04 (docs/results.md).
        ptx = "ptx_train" if "ptx_train" in info["files"] else "sft_train"
        algo["ptx_data"] = _file(task_dir, ptx)
    return {
        "model": {"path": str(sft)},
        "data": {"train": _file(task_dir, "rl_train"), "eval": _file(task_dir, "rl_eval")},
        "reward": reward,
        "algo": algo,
        "rollout": {"max_new_tokens": d["max_new_tokens"],
                    # a task made with its own game length plays that many turns
                    **({"environment": info["environment"],
                        "max_turns": info["options"].get("max_turns", d["max_turns"])}
                       if info.get("environment") else {})},
        # measured on arithmetic: lr 1e-4 raises sampled accuracy without eroding greedy;
        # the tiny critic needs a larger rate than the policy to fit in 50 steps
        "optim": {"lr": 1e-4},
        "run": {"output_dir": "runs", "name": f"rl-{preset.get('preset', 'custom')}",
                "steps": 150, "eval_every": 50, "log_every": 10},
        "eval": {"prompts": 250},
    }


def preset_dir() -> Path:
    return Path(__file__).parent / "presets"


def list_presets() -> list[str]:
    return sorted(p.stem for p in preset_dir().glob("*.yaml"))


def load_preset(name: str) -> dict[str, Any]:
    from posttrain.config import read_yaml

    path = preset_dir() / f"{name}.yaml"
    if not path.exists():
        import difflib

        close = difflib.get_close_matches(name, list_presets(), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(list_presets())}.{hint}")
    return read_yaml(path, preset_dir())
