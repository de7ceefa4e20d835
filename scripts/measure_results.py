"""Reproduce the numbers in docs/results.md.

    .venv/bin/python scripts/measure_results.py [trainers] [rl] [cot] [preference_ppo]
        [value_bias] [--out DIR] [--seeds 0,1,2] [--presets grpo,ppo,...]

Runs the `posttrain` commands shown in docs/results.md one after another (never in parallel:
two torch processes on 2 cores slow each other down many times over), reads their
metrics.jsonl and prints markdown tables. Everything is written under DIR (default
/tmp/posttrain-results), so nothing in the checkout changes.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from posttrain.pipeline import list_presets

PRESETS = list_presets()


def run(args: list[str], workdir: Path, progress: bool = True) -> float:
    """Run `posttrain ARGS` in `workdir`; returns the wall time in seconds."""
    env = {**os.environ, "POSTTRAIN_TASKS": str(workdir / "runs" / "tasks")}
    cmd = [sys.executable, "-m", "posttrain", *args, *(["--run.progress", "none"] * progress)]
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


def seed_dir(workdir: Path, section: str, seed: int, tasks: tuple[str, ...]) -> Path:
    """workdir/section/seedS, with its own copy of each task written with that seed (data,
    tiny model); the stages (SFT, reward model) are trained there on first use."""
    out = workdir / section / f"seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    for name in tasks:
        task = out / "runs" / "tasks" / name
        if not (task / "task.json").exists():
            run(["tasks", "make", name, "--out", str(task), "--seed", str(seed)], out,
                progress=False)
    return out


def trainers(workdir: Path, seeds: list[int]) -> None:
    results = []
    for seed in seeds:
        d = seed_dir(workdir, "trainers", seed, ("arithmetic", "preference"))
        tasks, s = d / "runs" / "tasks", ["--run.seed", str(seed)]
        t_sft = run(["sft", "--task", "arithmetic", *s], d)
        rows = metrics(tasks / "arithmetic" / "sft")
        run(["sft", "--task", "preference", *s], d)
        t_rm = run(["rm", "--task", "preference", *s], d)
        t_dpo = run(["dpo", "--task", "preference", "--run.name", "dpo", *s], d)
        results.append({
            "nll": first_last(rows, "eval/nll"), "acc": first_last(rows, "eval/exact_match"),
            "rm_acc": first_last(metrics(tasks / "preference" / "rm"), "eval/accuracy"),
            "gold_agreement": (None, rm_gold_agreement(tasks / "preference")),
            "dpo_gold": first_last(metrics(d / "runs" / "dpo"), "eval/reward"),
            "t_sft": t_sft, "t_rm": t_rm, "t_dpo": t_dpo})

    def cells(key: str) -> str:
        before = ([r[key][0] for r in results] if results[0][key][0] is not None else None)
        return (f"{mean_sd(before) if before else ''} | "
                f"{mean_sd([r[key][1] for r in results])}")

    def wall(key: str) -> str:
        return f"{sum(r[key] for r in results) / len(results):.0f} s"

    print(f"\nseeds {', '.join(map(str, seeds))}\n")
    print("| trainer | task | measure | before | after | wall time |")
    print("|---|---|---|---|---|---|")
    print(f"| SFT | arithmetic | held-out NLL per token | {cells('nll')} | {wall('t_sft')} |")
    print(f"| SFT | arithmetic | held-out exact match (greedy, 100 prompts) | {cells('acc')} | |")
    print(f"| RM | preference | held-out pairwise accuracy (noisy BT labels) | "
          f"{cells('rm_acc')} | {wall('t_rm')} |")
    print(f"| RM | preference | agreement with the gold ordering, held-out pairs | "
          f"{cells('gold_agreement')} | |")
    print(f"| DPO | preference | gold score of sampled responses (64 prompts x 4) | "
          f"{cells('dpo_gold')} | {wall('t_dpo')} |", flush=True)


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


def mean_sd(values: list[float], fmt: str = ".3f") -> str:
    import statistics

    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):{fmt}} ± {sd:{fmt.lstrip('+')}}"


def sft_stage(workdir: Path, task: str) -> None:
    """Train the task's SFT stage in `workdir` now, if it is not there yet (the pipeline
    would otherwise train it inside the first run that needs it)."""
    code = f"from posttrain import pipeline; pipeline.ensure_sft(pipeline.ensure_task({task!r}))"
    env = {**os.environ, "POSTTRAIN_TASKS": str(workdir / "runs" / "tasks")}
    subprocess.run([sys.executable, "-c", code], cwd=workdir, env=env, check=True,
                   capture_output=True)


def rl(workdir: Path, seeds: list[int], presets: list[str] = PRESETS) -> None:
    """Every preset on `arithmetic`, with the pipeline's defaults, once per seed: each seed
    writes its own task (data, tiny model, SFT start) and seeds RL with the same number."""
    runs: dict[str, list[dict]] = {p: [] for p in presets}
    for seed in seeds:
        d = seed_dir(workdir, "rl", seed, ("arithmetic",))
        sft_stage(d, "arithmetic")  # so that no preset's wall time includes it
        for preset in presets:
            wall = run(["rl", "--preset", preset, "--task", "arithmetic", "--run.seed",
                        str(seed), "--run.overwrite", "true"], d)
            rows = metrics(d / "runs" / f"rl-{preset}")
            runs[preset].append({"greedy": first_last(rows, "eval/reward"),
                                 "sampled": first_last(rows, "eval/reward_sampled"),
                                 "steps": max(r["step"] for r in rows), "wall": wall})
    print("\n| preset | held-out greedy accuracy: start -> end | held-out sampled accuracy: "
          "start -> end | greedy gain (smallest seed) | steps | wall time | seeds |")
    print("|---|---|---|---|---|---|---|")
    for preset, rs in runs.items():
        cells = []
        for key in ("greedy", "sampled"):
            cells.append(f"{mean_sd([r[key][0] for r in rs])} -> "
                         f"{mean_sd([r[key][1] for r in rs])}")
        gains = [r["greedy"][1] - r["greedy"][0] for r in rs]
        wall = sum(r["wall"] for r in rs) / len(rs)
        print(f"| {preset} | {cells[0]} | {cells[1]} | {mean_sd(gains)} ({min(gains):+.3f}) | "
              f"{rs[0]['steps']} | {wall:.0f} s | {', '.join(map(str, seeds))} |", flush=True)


# The claims of issue 15's item 2, each a preset against the same preset with one option
# changed, on arithmetic_cot's variable-length working: (row name, preset, extra flags).
COT_VARIANTS = [
    ("vc_ppo, one λ (0.95 for critic and actor)", "vc_ppo", ["--algo.critic_lam", "0.95"]),
    ("vapo, fixed λ 0.95", "vapo", ["--algo.lambda_schedule", "fixed", "--algo.lam", "0.95"]),
    ("dapo, seq-mean-token-mean", "dapo", ["--algo.aggregation", "seq-mean-token-mean"]),
]
COT_PAIRS = [("vc_ppo", COT_VARIANTS[0][0]), ("vapo", COT_VARIANTS[1][0]),
             ("dapo", COT_VARIANTS[2][0]), ("grpo", "dr_grpo")]


def cot(workdir: Path, seeds: list[int], presets: list[str] = PRESETS) -> None:
    """Every preset on `arithmetic_cot` with the pipeline's defaults, and the item-2 variants
    (COT_VARIANTS), once per seed; prints the preset table and the claims' table."""
    names = [*presets, *(v[0] for v in COT_VARIANTS)]
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for seed in seeds:
        d = seed_dir(workdir, "cot", seed, ("arithmetic_cot",))
        sft_stage(d, "arithmetic_cot")  # so that no preset's wall time includes it
        jobs = [(p, p, []) for p in presets] + [v for v in COT_VARIANTS]
        for i, (name, preset, extra) in enumerate(jobs):
            wall = run(["rl", "--preset", preset, "--task", "arithmetic_cot", "--run.seed",
                        str(seed), "--run.overwrite", "true", "--run.name", f"cot-{i}", *extra],
                       d)
            rows = metrics(d / "runs" / f"cot-{i}")
            length = [r["response/length"] for r in rows if "response/length" in r]
            wrong = [r["response/length_wrong"] for r in rows if "response/length_wrong" in r]
            runs[name].append({
                "greedy": first_last(rows, "eval/reward"),
                "sampled": first_last(rows, "eval/reward_sampled"),
                "length": (sum(length[:10]) / 10, sum(length[-10:]) / 10),
                # wrong answers grow rare: the first and last ten steps that had some
                "wrong": ((sum(wrong[:10]) / len(wrong[:10]), sum(wrong[-10:]) / len(wrong[-10:]))
                          if wrong else (float("nan"), float("nan"))),
                "steps": max(r["step"] for r in rows), "wall": wall})
    print("\n| preset | held-out greedy accuracy: start -> end | held-out sampled accuracy: "
          "start -> end | greedy gain (smallest seed) | steps | wall time | seeds |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        rs = runs[name]
        cells = [f"{mean_sd([r[k][0] for r in rs])} -> {mean_sd([r[k][1] for r in rs])}"
                 for k in ("greedy", "sampled")]
        gains = [r["greedy"][1] - r["greedy"][0] for r in rs]
        wall = sum(r["wall"] for r in rs) / len(rs)
        print(f"| {name} | {cells[0]} | {cells[1]} | {mean_sd(gains)} ({min(gains):+.3f}) | "
              f"{rs[0]['steps']} | {wall:.0f} s | {', '.join(map(str, seeds))} |", flush=True)
    print("\n| run | held-out greedy accuracy at the end | sampled at the end | response length: "
          "first 10 -> last 10 steps | length of wrong answers: first 10 -> last 10 steps |")
    print("|---|---|---|---|---|")
    for pair in COT_PAIRS:
        for name in pair:
            rs = runs.get(name)
            if not rs:
                continue
            cells = [mean_sd([r["greedy"][1] for r in rs]), mean_sd([r["sampled"][1] for r in rs])]
            cells += [f"{mean_sd([r[k][0] for r in rs], '.1f')} -> "
                      f"{mean_sd([r[k][1] for r in rs], '.1f')}" for k in ("length", "wrong")]
            print(f"| {name} | {' | '.join(cells)} |", flush=True)


def preference_ppo(workdir: Path, seeds: list[int]) -> None:
    """PPO against the learned reward model on `preference`: gold and proxy, greedy and
    sampled, once per seed."""
    results = []
    for seed in seeds:
        d = seed_dir(workdir, "preference_ppo", seed, ("preference",))
        wall = run(["rl", "--preset", "ppo", "--task", "preference", "--run.name", "pref-ppo",
                    "--run.seed", str(seed), "--run.overwrite", "true"], d)
        rows = metrics(d / "runs" / "pref-ppo")
        results.append({key: first_last(rows, key) for key in
                        ("eval/gold", "eval/gold_sampled", "eval/reward", "eval/reward_sampled")}
                       | {"kl": [r["kl/ref_seq"] for r in rows if "kl/ref_seq" in r][-1],
                          "wall": wall})
    print("\n| ppo on preference | greedy: start -> end | sampled: start -> end |")
    print("|---|---|---|")
    for label, key in (("gold reward", "eval/gold"), ("proxy (RM) reward", "eval/reward")):
        cells = [f"{mean_sd([r[k][0] for r in results])} -> {mean_sd([r[k][1] for r in results])}"
                 for k in (key, f"{key}_sampled")]
        print(f"| {label} | {cells[0]} | {cells[1]} |")
    print(f"\nfinal KL {mean_sd([r['kl'] for r in results])}, wall time "
          f"{sum(r['wall'] for r in results) / len(results):.0f} s, seeds "
          f"{', '.join(map(str, seeds))}")


def value_bias(workdir: Path, seeds: list[int]) -> None:
    """RM-initialised critic without value pretraining (ppo) vs with it (vc_ppo), both with
    the same critic start, on arithmetic_cot, once per seed."""
    results: dict[str, list[dict]] = {"ppo": [], "vc_ppo": []}
    for seed in seeds:
        d = seed_dir(workdir, "cot", seed, ("arithmetic_cot",))  # the cot section's SFT start
        s = ["--run.seed", str(seed)]
        run(["rm", "--task", "arithmetic_cot", *s], d)
        rm = str(d / "runs" / "tasks" / "arithmetic_cot" / "rm" / "final")
        common = ["--task", "arithmetic_cot", "--algo.critic_init", "reward_model",
                  "--algo.critic_path", rm, "--run.steps", "100", "--run.eval_every", "50",
                  "--run.overwrite", "true", *s]
        run(["rl", "--preset", "ppo", *common, "--algo.kl_placement", "none",
             "--run.name", "bias-ppo"], d)
        run(["rl", "--preset", "vc_ppo", *common, "--run.name", "bias-vc_ppo"], d)
        for name in results:
            run_dir = d / "runs" / f"bias-{name}"
            pos = [json.loads(line) for line in (run_dir / "advantage_by_position.jsonl").open()]
            rows = metrics(run_dir)
            lengths = [r["response/length"] for r in rows if "response/length" in r]
            results[name].append({
                "bands": [advantage_band(pos[:20], lo, hi)
                          for lo, hi in ((0, 5), (5, 15), (15, 10**6))],
                "length": (sum(lengths[:10]) / 10, sum(lengths[-10:]) / 10),
                "greedy": first_last(rows, "eval/reward"),
                "sampled": first_last(rows, "eval/reward_sampled")})
    print(f"\nseeds {', '.join(map(str, seeds))}\n")
    print("| run | mean advantage at positions 0-4 / 5-14 / 15+ (first 20 steps) | "
          "response length: first 10 -> last 10 steps | held-out greedy accuracy: start -> "
          "end | held-out sampled accuracy: start -> end |")
    print("|---|---|---|---|---|")
    for name, rs in results.items():
        bands = " / ".join(mean_sd([r["bands"][i] for r in rs], "+.3f") for i in range(3))
        cells = [f"{mean_sd([r[k][0] for r in rs], fmt)} -> {mean_sd([r[k][1] for r in rs], fmt)}"
                 for k, fmt in (("length", ".1f"), ("greedy", ".3f"), ("sampled", ".3f"))]
        print(f"| {name} | {bands} | {' | '.join(cells)} |", flush=True)


def advantage_band(steps: list[dict], lo: int, hi: int) -> float:
    """Token-weighted mean advantage at response positions lo..hi-1 over `steps`."""
    total, weight = 0.0, 0
    for p in steps:
        for i, (a, n) in enumerate(zip(p["mean_advantage"], p["tokens"], strict=True)):
            if lo <= i < hi and n:
                total += a * n
                weight += n
    return total / max(weight, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sections = {"trainers": trainers, "rl": rl, "cot": cot, "preference_ppo": preference_ppo,
                "value_bias": value_bias}
    parser.add_argument("sections", nargs="*", default=list(sections), choices=list(sections))
    parser.add_argument("--out", default="/tmp/posttrain-results")
    parser.add_argument("--seeds", default="0,1,2",
                        help="comma-separated seeds: each writes its own tasks and runs")
    parser.add_argument("--presets", default=",".join(PRESETS),
                        help="comma-separated RL presets of the `rl` and `cot` sections")
    args = parser.parse_args()
    presets = args.presets.split(",")
    if unknown := sorted(set(presets) - set(PRESETS)):
        parser.error(f"--presets: unknown {', '.join(unknown)}; known: {', '.join(PRESETS)}")
    sections["rl"] = functools.partial(rl, presets=presets)
    sections["cot"] = functools.partial(cot, presets=presets)
    workdir = Path(args.out)
    workdir.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    for section in args.sections:
        sections[section](workdir, seeds)


if __name__ == "__main__":
    main()
