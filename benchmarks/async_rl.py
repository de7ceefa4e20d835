"""Synchronous against asynchronous rollouts (rollout.async, max_staleness 1 and 2): step time,
held-out accuracy over the run, and time to a held-out greedy accuracy, on `arithmetic`.

    .venv/bin/python benchmarks/async_rl.py                      # grpo and ppo, ~10 min
    .venv/bin/python benchmarks/async_rl.py --presets grpo --repeats 2 --steps 100

Each run is `posttrain rl --preset P --task arithmetic` in a process of its own, the modes
interleaved (sync, k=1, k=2, then the next preset or repeat), so all see the same machine
state; the SFT start is trained once before. Every step is logged; "run s" is the wall time
from the first step to the last (evaluations included, the same for every mode), "time to X"
the wall time to the first evaluation at or above X. Prints a table and the learning
curves, and writes `benchmarks/results/<date>-async.md`. Never part of `make test`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODES = {"sync": [], "k=1": ["--rollout.async", "true", "--rollout.max_staleness", "1"],
         "k=2": ["--rollout.async", "true", "--rollout.max_staleness", "2"]}


def posttrain(args: list[str], workdir: Path) -> None:
    env = {**os.environ, "POSTTRAIN_TASKS": str(workdir / "tasks")}
    proc = subprocess.run([sys.executable, "-m", "posttrain", *args, "--run.progress", "none"],
                          cwd=workdir, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed: posttrain {' '.join(args)}\n{proc.stderr[-3000:]}")


def summary(run_dir: Path, target: float) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    steps = [r for r in rows if "perf/step_seconds" in r]
    evals = [(r["step"], r["eval/reward"], r["time"]) for r in rows if "eval/reward" in r]
    start = evals[0][2]  # the evaluation before the first step
    reached = next((t - start for s, v, t in evals if s > 0 and v >= target), None)
    return {"step_s": statistics.median(r["perf/step_seconds"] for r in steps),
            "total_s": rows[-1]["time"] - start, "evals": [(s, v) for s, v, _ in evals],
            "reached_s": reached,
            "wait_s": statistics.mean(r.get("async/trainer_wait_seconds", 0.0) for r in steps),
            "staleness": statistics.mean(r.get("async/staleness", 0.0) for r in steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="grpo,ppo")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--target", type=float, default=0.8,
                        help="held-out greedy accuracy for the time-to column")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="posttrain-async-"))
    posttrain(["sft", "--task", "arithmetic"], workdir)
    results: dict[tuple[str, str], list[dict]] = {}
    for rep in range(args.repeats):
        for preset in args.presets.split(","):
            for mode, flags in MODES.items():
                name = f"{preset}-{mode.replace('=', '')}-{rep}"
                print(f"{name} ...", file=sys.stderr, flush=True)
                posttrain(["rl", "--preset", preset, "--task", "arithmetic", "--run.name", name,
                           "--run.steps", str(args.steps), "--run.eval_every",
                           str(args.eval_every), "--run.log_every", "1", *flags], workdir)
                results.setdefault((preset, mode), []).append(
                    summary(workdir / "runs" / name, args.target))
    lines = [f"# Async RL on arithmetic, {datetime.date.today()}", "",
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
             f"{args.steps} steps, eval every {args.eval_every}, {args.repeats} repeat(s); "
             f"command: `.venv/bin/python benchmarks/async_rl.py --presets {args.presets} "
             f"--repeats {args.repeats} --steps {args.steps}`", "",
             f"| preset | mode | s/step (median) | run s | trainer wait s/step | staleness | "
             f"greedy start -> end | time to greedy {args.target} |",
             "|---|---|---|---|---|---|---|---|"]
    for (preset, mode), runs in results.items():
        def mean(key, runs=runs):
            return statistics.mean(r[key] for r in runs)
        reached = [r["reached_s"] for r in runs]
        to = (f"{statistics.mean(reached):.0f} s" if all(x is not None for x in reached)
              else f"not reached in {sum(x is None for x in reached)} of {len(runs)}")
        start = statistics.mean(r["evals"][0][1] for r in runs)
        end = statistics.mean(r["evals"][-1][1] for r in runs)
        lines.append(f"| {preset} | {mode} | {mean('step_s'):.3f} | {mean('total_s'):.0f} | "
                     f"{mean('wait_s'):.3f} | {mean('staleness'):.2f} | {start:.3f} -> "
                     f"{end:.3f} | {to} |")
    lines += ["", "Learning curves (held-out greedy accuracy at each evaluation, first repeat):",
              ""]
    for (preset, mode), runs in results.items():
        curve = ", ".join(f"{s}: {v:.3f}" for s, v in runs[0]["evals"])
        lines.append(f"- {preset} {mode}: {curve}")
    text = "\n".join(lines) + "\n"
    print(text)
    out = HERE / "results" / f"{datetime.date.today()}-async.md"
    out.write_text(text)
    print(f"written {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
