"""Reproduce the numbers in docs/results.md.

    .venv/bin/python scripts/measure_results.py [trainers] [rl] [value_bias] [--out DIR]

Runs the `posttrain` commands shown in docs/results.md one after another (never in parallel:
two torch processes on 2 cores slow each other down many times over), reads their
metrics.jsonl and prints markdown tables. Everything is written under DIR (default
/tmp/posttrain-results), so nothing in the checkout changes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from posttrain.pipeline import list_presets

PRESETS = list_presets()


def run(args: list[str], workdir: Path) -> float:
    """Run `posttrain ARGS` in `workdir`; returns the wall time in seconds."""
    env = {**os.environ, "POSTTRAIN_TASKS": str(workdir / "runs" / "tasks")}
    cmd = [sys.executable, "-m", "posttrain", *args, "--run.progress", "none"]
    print("$ posttrain " + " ".join(args), file=sys.stderr, flush=True)
    start = time.time()
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(args)}\n{proc.stderr[-3000:]}")
    return time.time() - start


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]


def first_last(rows: list[dict], key: str) -> tuple[float, float]:
    values = [r[key] for r in rows if key in r]
    return values[0], values[-1]


def trainers(workdir: Path) -> None:
    tasks = workdir / "runs" / "tasks"
    t_sft = run(["sft", "--task", "arithmetic"], workdir)
    rows = metrics(tasks / "arithmetic" / "sft")
    nll, acc = first_last(rows, "eval/nll"), first_last(rows, "eval/exact_match")
    run(["sft", "--task", "preference"], workdir)
    t_rm = run(["rm", "--task", "preference"], workdir)
    rm_rows = metrics(tasks / "preference" / "rm")
    rm_acc = first_last(rm_rows, "eval/accuracy")
    gold_agreement = rm_gold_agreement(tasks / "preference")
    t_dpo = run(["dpo", "--task", "preference", "--run.name", "dpo"], workdir)
    dpo_rows = metrics(workdir / "runs" / "dpo")
    gold = first_last(dpo_rows, "eval/reward")
    print("\n| trainer | task | measure | before | after | wall time |")
    print("|---|---|---|---|---|---|")
    print(f"| SFT | arithmetic | held-out NLL per token | {nll[0]:.3f} | {nll[1]:.3f} | "
          f"{t_sft:.0f} s |")
    print(f"| SFT | arithmetic | held-out exact match (greedy, 100 prompts) | {acc[0]:.2f} | "
          f"{acc[1]:.2f} | |")
    print(f"| RM | preference | held-out pairwise accuracy (noisy BT labels) | {rm_acc[0]:.3f} |"
          f" {rm_acc[1]:.3f} | {t_rm:.0f} s |")
    print(f"| RM | preference | agreement with the gold ordering, held-out pairs | | "
          f"{gold_agreement:.3f} | |")
    print(f"| DPO | preference | gold score of sampled responses (64 prompts x 4) | "
          f"{gold[0]:.2f} | {gold[1]:.2f} | {t_dpo:.0f} s |")


def rm_gold_agreement(task_dir: Path) -> float:
    """Share of held-out pairs where the reward model orders the two responses as the hidden
    gold scorer does (ties in gold excluded)."""
    from posttrain.data.loading import load_examples
    from posttrain.models.load import load_reward_model, load_tokenizer
    from posttrain.rewards.model import RewardModelReward
    from posttrain.tasks.preference import GoldReward

    rm_dir = task_dir / "rm" / "final"
    rm = RewardModelReward(load_reward_model(rm_dir).eval(), load_tokenizer(rm_dir))
    gold = GoldReward.from_file(task_dir / "gold.json")
    pairs = load_examples(task_dir / "pref_eval.jsonl", "preference")
    prompts = [p.prompt for p in pairs]
    a, b = [p.chosen for p in pairs], [p.rejected for p in pairs]
    ra, rb = rm(prompts, a), rm(prompts, b)
    ga, gb = gold(prompts, a), gold(prompts, b)
    agree = [(x > y) == (g > h) for x, y, g, h in zip(ra, rb, ga, gb, strict=True) if g != h]
    return sum(agree) / len(agree)


def rl(workdir: Path) -> None:
    print("\n| preset | held-out greedy accuracy: start -> end | held-out sampled accuracy: "
          "start -> end | steps | wall time |")
    print("|---|---|---|---|---|")
    for preset in PRESETS:
        wall = run(["rl", "--preset", preset, "--task", "arithmetic"], workdir)
        rows = metrics(workdir / "runs" / f"rl-{preset}")
        g, s = first_last(rows, "eval/reward"), first_last(rows, "eval/reward_sampled")
        steps = max(r["step"] for r in rows)
        print(f"| {preset} | {g[0]:.3f} -> {g[1]:.3f} | {s[0]:.3f} -> {s[1]:.3f} | {steps} | "
              f"{wall:.0f} s |", flush=True)
    wall = run(["rl", "--preset", "ppo", "--task", "preference", "--run.name", "pref-ppo"],
               workdir)
    rows = metrics(workdir / "runs" / "pref-ppo")
    gold, proxy = first_last(rows, "eval/gold_sampled"), first_last(rows, "eval/reward_sampled")
    kl = [r["kl/ref_seq"] for r in rows if "kl/ref_seq" in r][-1]
    print("\n| preset | task | gold reward: start -> end | proxy (RM) reward: start -> end | "
          "final KL | wall time |")
    print("|---|---|---|---|---|---|")
    print(f"| ppo | preference | {gold[0]:.2f} -> {gold[1]:.2f} | {proxy[0]:.2f} -> "
          f"{proxy[1]:.2f} | {kl:.2f} | {wall:.0f} s |")


def value_bias(workdir: Path) -> None:
    """RM-initialised critic without value pretraining (ppo) vs with it (vc_ppo), both with
    the same critic start, on arithmetic_cot."""
    tasks = workdir / "runs" / "tasks"
    run(["rm", "--task", "arithmetic_cot"], workdir)
    rm = str(tasks / "arithmetic_cot" / "rm" / "final")
    common = ["--task", "arithmetic_cot", "--algo.critic_init", "reward_model",
              "--algo.critic_path", rm, "--run.steps", "100", "--run.eval_every", "50"]
    run(["rl", "--preset", "ppo", *common, "--algo.kl_placement", "none",
         "--run.name", "bias-ppo"], workdir)
    run(["rl", "--preset", "vc_ppo", *common, "--run.name", "bias-vc_ppo"], workdir)
    print("\n| run | steps | mean advantage at positions 0-4 / 5-14 / 15+ (first 20 steps) | "
          "response length: first 10 -> last 10 steps | held-out sampled accuracy: start -> "
          "end |")
    print("|---|---|---|---|---|")
    for name in ("bias-ppo", "bias-vc_ppo"):
        run_dir = workdir / "runs" / name
        pos = [json.loads(line) for line in (run_dir / "advantage_by_position.jsonl").open()]
        early = pos[:20]

        def band(lo, hi, early=early):
            vals, weights = 0.0, 0
            for p in early:
                for i, (a, n) in enumerate(zip(p["mean_advantage"], p["tokens"], strict=True)):
                    if lo <= i < hi and n:
                        vals += a * n
                        weights += n
            return vals / max(weights, 1)

        rows = metrics(run_dir)
        lengths = [r["response/length"] for r in rows if "response/length" in r]
        s = first_last(rows, "eval/reward_sampled")
        print(f"| {name[5:]} | {len(pos)} | {band(0, 5):+.3f} / {band(5, 15):+.3f} / "
              f"{band(15, 10**6):+.3f} | {sum(lengths[:10]) / 10:.1f} -> "
              f"{sum(lengths[-10:]) / 10:.1f} | {s[0]:.3f} -> {s[1]:.3f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sections", nargs="*", default=["trainers", "rl", "value_bias"])
    parser.add_argument("--out", default="/tmp/posttrain-results")
    args = parser.parse_args()
    workdir = Path(args.out)
    workdir.mkdir(parents=True, exist_ok=True)
    for section in args.sections:
        {"trainers": trainers, "rl": rl, "value_bias": value_bias}[section](workdir)


if __name__ == "__main__":
    main()
