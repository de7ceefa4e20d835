"""One benchmark workload with posttrain; run by `run.py` in posttrain's virtual environment.

    python bench_posttrain.py --root DIR --workload dpo --size small --precision fp32 --steps 15

Prints one `BENCH_RESULT {json}` line. Step times wrap the trainer's `train_step` (the
whole optimiser step: data, generation, scoring, update), as TRL's are the intervals between
its `on_step_end` callbacks.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from assets import digit_reward, records
from workloads import (
    LR,
    NEW_TOKENS,
    WORKLOADS,
    GenerationTimer,
    emit,
    summarise,
    worker_args,
)


def reward(prompts, completions, **_):
    return digit_reward(completions)


def _write(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def config(a, w) -> tuple[type, type, dict]:
    rows = records(a.root, 64)
    model_dir, rm_dir = str(a.root / a.size), str(a.root / f"{a.size}-rm")
    base = {
        "optim": {"lr": LR, "schedule": "constant", "warmup_steps": 0, "weight_decay": 0.0,
                  "max_grad_norm": 1.0},
        "run": {"output_dir": str(a.out), "name": w.name, "steps": a.steps, "batch_size": w.batch,
                "eval_every": 0, "save_every": 0, "log_every": 1, "tensorboard": False,
                "progress": "none", "device": "cpu", "seed": 0, "precision": a.precision,
                "overwrite": True,  # repeats reuse the run directory
                "gradient_checkpointing": a.checkpointing == "on"},
    }
    if w.name == "sft":
        from posttrain.trainers.sft import SFTConfig, SFTTrainer

        data = _write(a.out / "sft.jsonl", [{"prompt": r["prompt"], "completion": r["completion"]}
                                            for r in rows])
        return SFTTrainer, SFTConfig, {**base, "model": {"path": model_dir},
                            "data": {"train": data, "eval_fraction": 0},
                            "eval": {"generate_samples": 0}}
    if w.name in ("rm", "dpo"):
        pairs = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]
        if w.name == "rm":
            from posttrain.trainers.reward import RewardModelTrainer, RMConfig

            data = _write(a.out / "pref.jsonl", pairs)
            return RewardModelTrainer, RMConfig, {**base, "model": {"path": rm_dir},
                                        "data": {"train": data, "eval_fraction": 0}}
        from posttrain.trainers.dpo import DPOConfig, DPOTrainer

        data = _write(a.out / "pref.jsonl", pairs[: w.batch])  # every step: the same batch
        return DPOTrainer, DPOConfig, {**base, "model": {"path": model_dir},
                            "data": {"train": data, "eval_fraction": 0},
                            "dpo": {"beta": 0.1}, "eval": {"prompts": 0}}
    from posttrain.pipeline import load_preset
    from posttrain.trainers.rl import RLConfig, RLTrainer

    data = _write(a.out / "prompts.jsonl", [{"prompt": r["prompt"]} for r in rows])
    here = Path(__file__).resolve()
    run = {k: v for k, v in base["run"].items() if k != "batch_size"}  # RL: prompts_per_step
    cfg = {**base, "run": run, "model": {"path": model_dir},
           "data": {"train": data, "eval_fraction": 0},
           "rollout": {"prompts_per_step": w.batch, "samples_per_prompt": w.samples,
                       "max_new_tokens": NEW_TOKENS, "temperature": 1.0},
           "eval": {"prompts": 0, "samples_per_prompt": 0, "kl_to_reference": False,
                    "samples_logged": 0}}
    if w.name == "grpo":
        preset = load_preset("grpo")
        cfg["algo"] = {**preset["algo"], "kl_coef": w.beta, "mini_batches": 1,
                       "kl_placement": "loss" if w.beta else "none"}
        cfg["reward"] = {"terms": [{"name": "digits", "function": f"{here}:reward"}]}
    else:  # PPO as TRL's: reward model, critic from it, k1 KL in the reward, 1 epoch
        preset = load_preset("ppo")
        cfg["algo"] = {**preset["algo"], "epochs": 1, "mini_batches": 1,
                       "kl_controller": "fixed", "kl_target": None, "critic_path": rm_dir,
                       "critic_lr": LR}
        cfg["reward"] = {"terms": [{"name": "reward_model", "path": rm_dir}]}
    return RLTrainer, RLConfig, cfg


def main() -> None:
    ap = worker_args()
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. algo.recompute_old_logprobs=true (ablations)")
    a = ap.parse_args()

    import posttrain
    from posttrain.config import load_config

    w = WORKLOADS[a.workload]
    trainer_cls, config_cls, overrides = config(a, w)
    from posttrain.config import merge, parse_overrides

    overrides = merge(overrides, parse_overrides([f"--{kv}" for kv in a.set]))
    cfg = load_config(config_cls, overrides=overrides)
    trainer = trainer_cls(cfg)

    times: list[float] = []
    gen: list[tuple[float, int]] = []
    losses: list[float] = []
    timer = GenerationTimer(lambda exp, args, kwargs: int(exp.response_mask.sum()))
    if hasattr(trainer, "engine"):
        trainer.engine.generate = timer.wrap(trainer.engine.generate)
    step = trainer.train_step

    def timed_step():
        t0 = time.perf_counter()
        metrics, n = step()
        times.append(time.perf_counter() - t0)
        gen.append(timer.take())
        losses.append(float(metrics.get("train/loss", metrics.get("loss/policy", "nan"))))
        return metrics, n

    trainer.train_step = timed_step
    trainer.train()
    emit({"lib": "posttrain", "version": posttrain.__version__,
          "gradient_checkpointing": cfg.run.gradient_checkpointing,
          **summarise(times, gen if w.generated_per_step else None, losses)})


if __name__ == "__main__":
    main()
