"""Reproduce the numbers in docs/results.md.

    .venv/bin/python scripts/measure_results.py [trainers] [rl] [cot] [preference_ppo]
        [value_bias] [cot_plots] [kl_sweep] [length] [multiturn] [guess_opening] [--out DIR]
        [--seeds 0,1,2]
        [--presets grpo,...]

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


REUSE = False
"""--reuse: a `cot` or `value_bias` run already finished in --out is read, not run again."""


def run_once(args: list[str], workdir: Path, name: str) -> float | None:
    """`run` unless --reuse and workdir/runs/NAME finished before (then None: no wall time)."""
    if REUSE and (workdir / "runs" / name / "final").exists():
        return None
    return run(args, workdir)


def ends(values: list[float], k: int = 3) -> tuple[float, float]:
    """The mean of the first k and of the last k values (a metric logged every 10 steps: a
    150-step run's steps 10-30 and 130-150)."""
    if not values:
        return float("nan"), float("nan")
    return sum(values[:k]) / len(values[:k]), sum(values[-k:]) / len(values[-k:])


def mean_wall(walls: list[float | None]) -> str:
    known = [w for w in walls if w is not None]
    return f"{sum(known) / len(known):.0f} s" if known else "(reused)"


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


def sft_stage(workdir: Path, task: str, overrides: dict | None = None) -> None:
    """Train the task's SFT stage in `workdir` now, if it is not there yet (the pipeline
    would otherwise train it inside the first run that needs it), with `overrides` of its
    config."""
    code = (f"from posttrain import pipeline; "
            f"pipeline.ensure_sft(pipeline.ensure_task({task!r}), {overrides!r})")
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


def cot_jobs(presets: list[str]) -> list[tuple[str, str, list[str]]]:
    """(row name, preset, extra flags) of the `cot` runs for these presets: each preset, and
    each variant whose preset is among them."""
    return [(p, p, []) for p in presets] + [v for v in COT_VARIANTS if v[1] in presets]


def cot_run_index(name: str) -> int:
    """The run directory number of a `cot` row (cot-N), the same whichever presets run."""
    return [*PRESETS, *(v[0] for v in COT_VARIANTS)].index(name)


def cot(workdir: Path, seeds: list[int], presets: list[str] = PRESETS) -> None:
    """Every preset on `arithmetic_cot` with the pipeline's defaults, and the item-2 variants
    (COT_VARIANTS), once per seed; prints the preset table and the claims' table."""
    jobs = cot_jobs(presets)
    names = [name for name, _, _ in jobs]
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for seed in seeds:
        d = seed_dir(workdir, "cot", seed, ("arithmetic_cot",))
        sft_stage(d, "arithmetic_cot")  # so that no preset's wall time includes it
        for name, preset, extra in jobs:
            i = cot_run_index(name)
            wall = run_once(["rl", "--preset", preset, "--task", "arithmetic_cot", "--run.seed",
                             str(seed), "--run.overwrite", "true", "--run.name", f"cot-{i}",
                             *extra], d, f"cot-{i}")
            rows = metrics(d / "runs" / f"cot-{i}")
            length = [r["response/length"] for r in rows if "response/length" in r]
            wrong = [r["response/length_wrong"] for r in rows if "response/length_wrong" in r]
            runs[name].append({
                "greedy": first_last(rows, "eval/reward"),
                "sampled": first_last(rows, "eval/reward_sampled"),
                "length": ends(length), "wrong": ends(wrong),
                "steps": max(r["step"] for r in rows), "wall": wall})
    print("\n| preset | held-out greedy accuracy: start -> end | held-out sampled accuracy: "
          "start -> end | greedy gain (smallest seed) | steps | wall time | seeds |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        rs = runs[name]
        cells = [f"{mean_sd([r[k][0] for r in rs])} -> {mean_sd([r[k][1] for r in rs])}"
                 for k in ("greedy", "sampled")]
        gains = [r["greedy"][1] - r["greedy"][0] for r in rs]
        print(f"| {name} | {cells[0]} | {cells[1]} | {mean_sd(gains)} ({min(gains):+.3f}) | "
              f"{rs[0]['steps']} | {mean_wall([r['wall'] for r in rs])} | "
              f"{', '.join(map(str, seeds))} |", flush=True)
    print("\n| run | held-out greedy accuracy at the end | sampled at the end | response length: "
          "first 3 -> last 3 logged steps | length of wrong answers: first 3 -> last 3 logged "
          "steps |")
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


def mean_curve(runs: list[list[dict]], key: str) -> tuple[list[int], list[float]]:
    """Steps and the mean over runs of `key` at each step some run logged it."""
    by_step: dict[int, list[float]] = {}
    for rows in runs:
        for r in rows:
            if key in r:
                by_step.setdefault(r["step"], []).append(r[key])
    steps = sorted(by_step)
    return steps, [sum(by_step[t]) / len(by_step[t]) for t in steps]


def cot_plots(workdir: Path, seeds: list[int], presets: list[str] = PRESETS) -> None:
    """Plots of the `cot` and `value_bias` runs already in `workdir` (read, not rerun):
    workdir/plots/cot_accuracy.png, cot_claims.png and value_bias.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = workdir / "plots"
    out.mkdir(exist_ok=True)
    names = [name for name, _, _ in cot_jobs(presets)]

    def runs_of(name: str) -> list[list[dict]]:
        i = cot_run_index(name)
        return [metrics(workdir / "cot" / f"seed{s}" / "runs" / f"cot-{i}") for s in seeds]

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for name in presets:
        for ax, key in zip(axes, ("eval/reward", "eval/reward_sampled"), strict=True):
            ax.plot(*mean_curve(runs_of(name), key), marker="o", markersize=3, label=name)
    for ax, what in zip(axes, ("greedy", "sampled"), strict=True):
        ax.set_title(f"arithmetic_cot: held-out {what} accuracy (mean of seeds "
                     f"{', '.join(map(str, seeds))})", fontsize=9)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    fig.savefig(out / "cot_accuracy.png", dpi=90, bbox_inches="tight")
    plt.close(fig)

    fig, axes = plt.subplots(1, len(COT_PAIRS), figsize=(4 * len(COT_PAIRS), 3.4))
    for ax, pair in zip(axes, COT_PAIRS, strict=True):
        key = "response/length_wrong" if pair == ("grpo", "dr_grpo") else "response/length"
        for name in pair:
            if name in names:
                ax.plot(*mean_curve(runs_of(name), key), label=name)
        ax.set_title(key.replace("response/", "").replace("_", " of ") + " answers"
                     if "wrong" in key else "response length", fontsize=9)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.savefig(out / "cot_claims.png", dpi=90, bbox_inches="tight")
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 3.6))
    for name in ("ppo", "vc_ppo"):
        dirs = [workdir / "cot" / f"seed{s}" / "runs" / f"bias-{name}" for s in seeds]
        if not all((d / "metrics.jsonl").exists() for d in dirs):
            continue
        pos = [json.loads(line) for d in dirs
               for line in list((d / "advantage_by_position.jsonl").open())[:20]]
        width = max(len(p["mean_advantage"]) for p in pos)
        axes[0].plot(range(width), [advantage_band(pos, i, i + 1) for i in range(width)],
                     label=name)
        axes[1].plot(*mean_curve([metrics(d) for d in dirs], "response/length"), label=name)
    axes[0].axhline(0, color="grey", lw=0.8)
    axes[0].set_title("mean advantage by response position, first 20 steps", fontsize=9)
    axes[0].set_xlabel("response token position")
    axes[1].set_title("response length", fontsize=9)
    axes[1].set_xlabel("RL step")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.savefig(out / "value_bias.png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    print(f"plots in {out}/", flush=True)


KL_COEFS = (0.0, 0.01, 0.05, 0.2)


def kl_sweep(workdir: Path, seeds: list[int]) -> None:
    """PPO on `preference` for 300 steps at fixed KL coefficients (0 = no KL): gold and proxy
    against the KL to the SFT policy at each evaluation (Gao et al.'s curve in miniature);
    table and workdir/plots/kl_sweep.png."""
    results: dict[float, list[list[dict]]] = {c: [] for c in KL_COEFS}
    walls: dict[float, list[float]] = {c: [] for c in KL_COEFS}
    for seed in seeds:
        d = seed_dir(workdir, "preference_ppo", seed, ("preference",))
        for coef in KL_COEFS:
            kl = (["--algo.kl_placement", "none"] if coef == 0 else
                  ["--algo.kl_controller", "fixed", "--algo.kl_coef", str(coef)])
            name = f"kl-{coef}"
            walls[coef].append(run(["rl", "--preset", "ppo", "--task", "preference", *kl,
                                    "--run.steps", "300", "--run.eval_every", "25",
                                    "--run.name", name, "--run.seed", str(seed),
                                    "--run.overwrite", "true"], d))
            results[coef].append(metrics(d / "runs" / name))

    def at_evals(rows: list[dict]) -> list[tuple[float, dict]]:
        # the KL of the training batch at (or just before) each evaluation's step
        kl, out = 0.0, []
        for r in rows:
            kl = r.get("kl/ref_seq", kl)
            if "eval/gold" in r:
                out.append((kl, r))
        return out

    print("\n| KL coefficient | final KL | gold, greedy: start -> peak -> end | gold, sampled: "
          "start -> peak -> end | proxy, sampled: start -> end | wall time |")
    print("|---|---|---|---|---|---|")
    for coef, runs in results.items():
        evals = [at_evals(rows) for rows in runs]
        cells = [mean_sd([e[-1][0] for e in evals], ".2f")]
        for key in ("eval/gold", "eval/gold_sampled"):
            first = [e[0][1][key] for e in evals]
            peak = [max(r[key] for _, r in e) for e in evals]
            last = [e[-1][1][key] for e in evals]
            cells.append(f"{mean_sd(first)} -> {mean_sd(peak)} -> {mean_sd(last)}")
        cells.append(f"{mean_sd([e[0][1]['eval/reward_sampled'] for e in evals])} -> "
                     f"{mean_sd([e[-1][1]['eval/reward_sampled'] for e in evals])}")
        cells.append(f"{sum(walls[coef]) / len(walls[coef]):.0f} s")
        print(f"| {coef:g} | {' | '.join(cells)} |", flush=True)
    print(f"\nseeds {', '.join(map(str, seeds))}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for coef, runs in results.items():
        for ax, key in zip(axes, ("eval/gold_sampled", "eval/reward_sampled"), strict=True):
            xs, ys = [], []
            for rows in runs:
                for kl, r in at_evals(rows):
                    xs.append(max(kl, 0.0) ** 0.5)
                    ys.append(r[key])
            ax.scatter(xs, ys, s=10, label=f"KL coef {coef:g}")
    for ax, what in zip(axes, ("gold (hidden scorer)", "proxy (reward model)"), strict=True):
        ax.set_title(f"PPO on preference: sampled {what} against sqrt KL, every evaluation "
                     f"of seeds {', '.join(map(str, seeds))}", fontsize=8)
        ax.set_xlabel("sqrt(KL to the SFT policy)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    (workdir / "plots").mkdir(exist_ok=True)
    fig.savefig(workdir / "plots" / "kl_sweep.png", dpi=90, bbox_inches="tight")
    plt.close(fig)


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
        run_once(["rm", "--task", "arithmetic_cot", *s], d, "tasks/arithmetic_cot/rm")
        rm = str(d / "runs" / "tasks" / "arithmetic_cot" / "rm" / "final")
        common = ["--task", "arithmetic_cot", "--algo.critic_init", "reward_model",
                  "--algo.critic_path", rm, "--run.steps", "100", "--run.eval_every", "50",
                  "--run.overwrite", "true", *s]
        run_once(["rl", "--preset", "ppo", *common, "--algo.kl_placement", "none",
                  "--run.name", "bias-ppo"], d, "bias-ppo")
        run_once(["rl", "--preset", "vc_ppo", *common, "--run.name", "bias-vc_ppo"], d,
                 "bias-vc_ppo")
        for name in results:
            run_dir = d / "runs" / f"bias-{name}"
            pos = [json.loads(line) for line in (run_dir / "advantage_by_position.jsonl").open()]
            rows = metrics(run_dir)
            lengths = [r["response/length"] for r in rows if "response/length" in r]
            results[name].append({
                "bands": [advantage_band(pos[:20], lo, hi)
                          for lo, hi in ((0, 5), (5, 15), (15, 10**6))],
                "length": ends(lengths),
                "greedy": first_last(rows, "eval/reward"),
                "sampled": first_last(rows, "eval/reward_sampled")})
    print(f"\nseeds {', '.join(map(str, seeds))}\n")
    print("| run | mean advantage at positions 0-4 / 5-14 / 15+ (first 20 steps) | "
          "response length: first 3 -> last 3 logged steps | held-out greedy accuracy: start -> "
          "end | held-out sampled accuracy: start -> end |")
    print("|---|---|---|---|---|")
    for name, rs in results.items():
        bands = " / ".join(mean_sd([r["bands"][i] for r in rs], "+.3f") for i in range(3))
        cells = [f"{mean_sd([r[k][0] for r in rs], fmt)} -> {mean_sd([r[k][1] for r in rs], fmt)}"
                 for k, fmt in (("length", ".1f"), ("greedy", ".3f"), ("sampled", ".3f"))]
        print(f"| {name} | {bands} | {' | '.join(cells)} |", flush=True)


# Issue 15's length claims on `arithmetic_cot_free`, where a response is the 2-5 character
# answer or the 8-32 character working, chosen at the first token: (row name, preset, flags).
# "rm critic" rows start the critic from a reward model trained on the task's pairs.
LENGTH_RUNS = [
    ("grpo", "grpo", []),
    ("dr_grpo", "dr_grpo", []),
    ("dapo (token-mean)", "dapo", []),
    ("dapo, seq-mean-token-mean", "dapo", ["--algo.aggregation", "seq-mean-token-mean"]),
    ("vapo (length-adaptive λ)", "vapo", []),
    ("vapo, fixed λ 0.95", "vapo", ["--algo.lambda_schedule", "fixed", "--algo.lam", "0.95"]),
    ("vc_ppo (critic λ 1.0, actor 0.95)", "vc_ppo", []),
    ("vc_ppo, one λ (0.95)", "vc_ppo", ["--algo.critic_lam", "0.95"]),
    ("ppo, rm critic, no value pretraining", "ppo", ["rm critic", "--algo.kl_placement", "none"]),
    ("vc_ppo, rm critic, value pretraining", "vc_ppo", ["rm critic"]),
]
LENGTH_PAIRS = [(0, 1, "response/length_wrong"), (2, 3, "response/length"),
                (4, 5, "response/length"), (6, 7, "response/length"),
                (8, 9, "response/length")]
"""(run, run, the metric that claim is about), indices into LENGTH_RUNS."""


def length(workdir: Path, seeds: list[int]) -> None:
    """LENGTH_RUNS on `arithmetic_cot_free`, once per seed, and a plot of each claim's pair:
    workdir/plots/length_claims.png."""
    task = "arithmetic_cot_free"
    runs: list[list[list[dict]]] = [[] for _ in LENGTH_RUNS]
    walls: list[list[float | None]] = [[] for _ in LENGTH_RUNS]
    for seed in seeds:
        d = seed_dir(workdir, "length", seed, (task,))
        sft_stage(d, task)
        s = ["--run.seed", str(seed)]
        rm = d / "runs" / "tasks" / task / "rm" / "final"
        if not rm.exists():  # the reward model the "rm critic" rows start their critic from
            run(["rm", "--task", task, *s], d)
        for i, (_, preset, extra) in enumerate(LENGTH_RUNS):
            if "rm critic" in extra:
                extra = ["--algo.critic_init", "reward_model", "--algo.critic_path", str(rm),
                         *(x for x in extra if x != "rm critic")]
            walls[i].append(run_once(["rl", "--preset", preset, "--task", task, *s,
                                      "--run.overwrite", "true", "--run.name", f"length-{i}",
                                      *extra], d, f"length-{i}"))
            runs[i].append(metrics(d / "runs" / f"length-{i}"))
    print(f"\nseeds {', '.join(map(str, seeds))}\n")
    print("| run | held-out greedy accuracy: start -> end | sampled: start -> end | response "
          "length: first 3 -> last 3 logged steps | length of wrong answers | length of right "
          "answers | mean advantage, positions 0-4, first 20 steps | wall time |")
    print("|---|---|---|---|---|---|---|---|")
    for i, (name, *_) in enumerate(LENGTH_RUNS):
        seeds_rows = runs[i]
        cells = []
        for key in ("eval/reward", "eval/reward_sampled"):
            ends_ = [first_last(rows, key) for rows in seeds_rows]
            cells.append(f"{mean_sd([e[0] for e in ends_])} -> {mean_sd([e[1] for e in ends_])}")
        for key in ("response/length", "response/length_wrong", "response/length_correct"):
            ends_ = [ends([r[key] for r in rows if key in r]) for rows in seeds_rows]
            cells.append(f"{mean_sd([e[0] for e in ends_], '.1f')} -> "
                         f"{mean_sd([e[1] for e in ends_], '.1f')}")
        d = [workdir / "length" / f"seed{s}" / "runs" / f"length-{i}" for s in seeds]
        pos = [[json.loads(line) for line in (x / "advantage_by_position.jsonl").open()][:20]
               for x in d]
        cells.append(mean_sd([advantage_band(p, 0, 5) for p in pos], "+.3f"))
        print(f"| {name} | {' | '.join(cells)} | {mean_wall(walls[i])} |", flush=True)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = workdir / "plots"
    out.mkdir(exist_ok=True)
    fig, axes = plt.subplots(1, len(LENGTH_PAIRS), figsize=(3.6 * len(LENGTH_PAIRS), 3.2))
    for ax, (a, b, key) in zip(axes, LENGTH_PAIRS, strict=True):
        for i in (a, b):
            ax.plot(*mean_curve(runs[i], key), label=LENGTH_RUNS[i][0])
        ax.set_title(key.replace("response/", "").replace("_", " of ") +
                     (" answers" if "wrong" in key else ""), fontsize=9)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(f"arithmetic_cot_free, mean of seeds {', '.join(map(str, seeds))}", fontsize=9)
    fig.savefig(out / "length_claims.png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    print(f"plot: {out}/length_claims.png", flush=True)


def advantage_band(steps: list[dict], lo: int, hi: int) -> float:
    """Token-weighted mean advantage at response positions lo..hi-1 over `steps`."""
    total, weight = 0.0, 0
    for p in steps:
        for i, (a, n) in enumerate(zip(p["mean_advantage"], p["tokens"], strict=True)):
            if lo <= i < hi and n:
                total += a * n
                weight += n
    return total / max(weight, 1)


def multiturn(workdir: Path, seeds: list[int]) -> None:
    """The multi-turn tasks (issue 18) with GRPO, once per seed: `calculator` (held-out
    greedy and sampled success, tool calls per episode) and `guess` (policy turns per
    episode, success)."""
    steps = {"calculator": 100, "guess": 100}
    out: dict[str, list[dict]] = {t: [] for t in steps}
    for seed in seeds:
        d = seed_dir(workdir, "multiturn", seed, tuple(steps))
        for task, n in steps.items():
            sft_stage(d, task)
            wall = run(["rl", "--preset", "grpo", "--task", task, "--run.seed", str(seed),
                        "--run.steps", str(n), "--run.eval_every", "25", "--eval.prompts",
                        "200", "--run.name", f"rl-{task}", "--run.overwrite", "true"], d)
            rows = metrics(d / "runs" / f"rl-{task}")
            out[task].append({k: first_last(rows, k) for k in (
                "eval/reward", "eval/reward_sampled", "eval/episode_turns",
                "eval/episode_turns_sampled", "eval/episode_tool_calls",
                "eval/episode_tool_calls_sampled")} | {"wall": wall})
    print(f"\nseeds {', '.join(map(str, seeds))}; GRPO, {steps['calculator']} steps; "
          "held-out prompts (200), greedy and sampled (4 per prompt)\n")
    print("| task | measure | SFT start | after RL | wall time |")
    print("|---|---|---|---|---|")
    rows_of = {"calculator": [("success, greedy", "eval/reward"),
                              ("success, sampled", "eval/reward_sampled"),
                              ("tool calls per episode, sampled",
                               "eval/episode_tool_calls_sampled")],
               "guess": [("policy turns per episode, greedy", "eval/episode_turns"),
                         ("policy turns per episode, sampled", "eval/episode_turns_sampled"),
                         ("reward (1 - (turns - 1)/6 when found), sampled",
                          "eval/reward_sampled")]}
    for task, measures in rows_of.items():
        rs = out[task]
        for i, (label, key) in enumerate(measures):
            wall = f"{sum(r['wall'] for r in rs) / len(rs):.0f} s" if i == 0 else ""
            print(f"| {task} | {label} | {mean_sd([r[key][0] for r in rs])} | "
                  f"{mean_sd([r[key][1] for r in rs])} | {wall} |", flush=True)


def guess_opening(workdir: Path, seeds: list[int]) -> None:
    """The guessing game made small (1..8 in 4 turns, SFT 300 steps) as its CI test trains
    it: GRPO 20 steps at lr 1e-3, and the policy's exact opening before and after (the
    opening's expected score under random play after it, the mass on the ends 1 and 8)."""
    n, turns = 8, 4
    probe = ("import json, sys; from transformers import AutoModelForCausalLM; "
             "from posttrain.models.load import load_tokenizer; "
             "from posttrain.tasks.multiturn import opening_probabilities as p; "
             f"print(json.dumps([p(AutoModelForCausalLM.from_pretrained(m), load_tokenizer(m), "
             f"{n}) for m in sys.argv[1:]]))")
    from posttrain.tasks.multiturn import opening_scores

    scores = opening_scores(n, turns)
    out = []
    for seed in seeds:
        d = workdir / "guess_opening" / f"seed{seed}"
        task = d / "runs" / "tasks" / "guess"
        d.mkdir(parents=True, exist_ok=True)
        if not (task / "task.json").exists():
            run(["tasks", "make", "guess", "--out", str(task), "--seed", str(seed), "--option",
                 f"max_number={n}", "--option", f"max_turns={turns}", "--option",
                 "n_sft=2000"], d, progress=False)
        sft_stage(d, "guess", {"run": {"steps": 300, "eval_every": 0, "progress": "none"}})
        env = {**os.environ, "POSTTRAIN_TASKS": str(d / "runs" / "tasks")}
        wall = run(["rl", "--preset", "grpo", "--task", "guess", "--run.seed", str(seed),
                    "--run.steps", "20", "--run.eval_every", "20", "--optim.lr", "1e-3",
                    "--eval.prompts", "64", "--eval.samples_per_prompt", "2",
                    "--run.name", "rl-guess", "--run.overwrite", "true"], d)
        proc = subprocess.run([sys.executable, "-c", probe, str(task / "sft" / "final"),
                               str(d / "runs" / "rl-guess" / "final")], cwd=d, env=env,
                              check=True, capture_output=True, text=True)
        before, after = json.loads(proc.stdout.strip().splitlines()[-1])
        rows = metrics(d / "runs" / "rl-guess")
        out.append({"score": [sum(a * v for a, v in zip(p, scores, strict=True)) / sum(p)
                              for p in (before, after)],
                    "ends": [p[0] + p[-1] for p in (before, after)],
                    "turns": first_last(rows, "eval/episode_turns_sampled"),
                    "greedy": first_last(rows, "eval/episode_turns"), "wall": wall})
    print(f"\nseeds {', '.join(map(str, seeds))}; guess 1..{n} in {turns} turns, SFT 300 "
          f"steps, GRPO 20 steps (lr 1e-3); uniform opening {sum(scores) / n:.3f}, the best "
          f"{max(scores):.3f}\n")
    print("| seed | opening score | P(opening 1 or 8) | turns, sampled | turns, greedy | RL |")
    print("|---|---|---|---|---|---|")
    for seed, r in zip(seeds, out, strict=True):
        print(f"| {seed} | " + " | ".join(f"{a:.3f} -> {b:.3f}" for a, b in (
            r["score"], r["ends"], r["turns"], r["greedy"])) + f" | {r['wall']:.0f} s |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sections = {"trainers": trainers, "rl": rl, "cot": cot, "preference_ppo": preference_ppo,
                "value_bias": value_bias, "cot_plots": cot_plots, "kl_sweep": kl_sweep,
                "length": length, "multiturn": multiturn, "guess_opening": guess_opening}
    parser.add_argument("sections", nargs="*", default=list(sections), choices=list(sections))
    parser.add_argument("--out", default="/tmp/posttrain-results")
    parser.add_argument("--seeds", default="0,1,2",
                        help="comma-separated seeds: each writes its own tasks and runs")
    parser.add_argument("--presets", default=",".join(PRESETS),
                        help="comma-separated RL presets of the `rl` and `cot` sections")
    parser.add_argument("--reuse", action="store_true",
                        help="cot, value_bias and length: read the runs already finished in --out "
                             "instead of running them again (tables after a script change)")
    args = parser.parse_args()
    global REUSE
    REUSE = args.reuse
    presets = args.presets.split(",")
    if unknown := sorted(set(presets) - set(PRESETS)):
        parser.error(f"--presets: unknown {', '.join(unknown)}; known: {', '.join(PRESETS)}")
    sections["rl"] = functools.partial(rl, presets=presets)
    sections["cot"] = functools.partial(cot, presets=presets)
    sections["cot_plots"] = functools.partial(cot_plots, presets=presets)
    workdir = Path(args.out)
    workdir.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    for section in args.sections:
        sections[section](workdir, seeds)


if __name__ == "__main__":
    main()
