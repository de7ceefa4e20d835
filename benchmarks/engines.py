"""Rollout engines side by side: posttrain's `lean` and `vllm` engines, and TRL's GRPO with
its own vLLM (colocate mode), on the same model, data and settings, over model sizes.

    .venv/bin/python benchmarks/engines.py                       # tiny, small, large; ~15 min
    .venv/bin/python benchmarks/engines.py --sizes small --repeats 3

Every run is a process of its own (posttrain-lean, posttrain-vllm, TRL-vllm, then again), so
all see the same machine state. The workloads are `workloads.py`'s GRPO (2 prompts x 8
samples x 32 new tokens) and PPO (16 prompts); TRL 1.16 has no PPO, so its PPO cell says so.
vLLM's CPU build needs `transformers<5.20` (posttrain's `make test` venv has it) and a
head_dim it supports (32, 64, ...: every size here). TRL's venv is
`benchmarks/.venv-trl-vllm` (`benchmarks/setup_trl.sh trl-vllm`). Prints a table and writes
`benchmarks/results/<date>-engines.json` and `.md`. Never part of `make test`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import assets  # noqa: E402
from run import fmt, median_run, run_worker  # noqa: E402
from workloads import WARMUP  # noqa: E402

TRL_VLLM_VENV = HERE / ".venv-trl-vllm"
ENGINES = ("lean", "vllm", "trl-vllm")


def run_one(engine: str, args: list[str], out: Path) -> dict:
    if engine == "trl-vllm":
        if not (TRL_VLLM_VENV / "bin" / "python").exists():
            return {"absent": "no .venv-trl-vllm: setup_trl.sh trl-vllm"}
        if "ppo" in args:
            return {"absent": "TRL 1.16 has no PPO"}
        return run_worker(TRL_VLLM_VENV / "bin" / "python", "bench_trl.py",
                          [*args, "--vllm", "--out", str(out)])
    return run_worker(Path(sys.executable), "bench_posttrain.py",
                      [*args, "--set", f"rollout.engine={engine}", "--out", str(out)])


def _cell(run: dict, key: str, spec: str) -> str:
    return fmt(run.get(key), spec, (run.get("error") or run.get("absent") or "-")[:36])


def table(rows: list[dict]) -> str:
    head = ("| workload | size | N (non-emb.) | " +
            " | ".join(f"{e} s/step" for e in ENGINES) + " | " +
            " | ".join(f"{e} gen tok/s" for e in ENGINES) + " | vllm / lean step |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        res = r["runs"]
        lean, vllm = res["lean"].get("median_s"), res["vllm"].get("median_s")
        ratio = vllm / lean if lean and vllm else None
        lines.append("| " + " | ".join([
            r["workload"], r["size"], f"{r['n_params'] / 1e6:.2f} M",
            *(_cell(res[e], "median_s", ".3f") for e in ENGINES),
            *(_cell(res[e], "gen_tokens_per_s", ".0f") for e in ENGINES),
            fmt(ratio, ".2f")]) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="tiny,small,large")
    ap.add_argument("--workloads", default="grpo,ppo")
    ap.add_argument("--steps", type=int, default=WARMUP + 6,
                    help=f"optimiser steps per run; the first {WARMUP} are warm-up")
    ap.add_argument("--repeats", type=int, default=1,
                    help="processes per engine, interleaved; the table shows the median run")
    ap.add_argument("--work", type=Path, default=HERE / ".work")
    ap.add_argument("--results", type=Path, default=HERE / "results")
    a = ap.parse_args()

    info = assets.build(a.work / "assets")
    rows = []
    for size in a.sizes.split(","):
        for name in a.workloads.split(","):
            args = ["--root", str(a.work / "assets"), "--workload", name, "--size", size,
                    "--precision", "fp32", "--steps", str(a.steps)]
            runs: dict[str, list[dict]] = {e: [] for e in ENGINES}
            for _ in range(a.repeats):
                for engine in ENGINES:
                    out = a.work / "runs" / f"engines-{engine}-{size}-{name}"
                    r = run_one(engine, args, out)
                    runs[engine].append(r)
                    print(f"  {size:5} {name:5} {engine:9} "
                          f"{fmt(r.get('median_s'), '.4f', r.get('error') or r.get('absent'))}",
                          flush=True)
            rows.append({"workload": name, "size": size, "n_params": info["n_params"][size],
                         "runs": {e: median_run(rs) for e, rs in runs.items()}})
    text = table(rows)
    print(text)
    date = datetime.date.today().isoformat()
    a.results.mkdir(parents=True, exist_ok=True)
    stem = a.results / f"{date}-engines"
    meta = {"date": date, "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "steps": a.steps,
            "warmup": WARMUP, "repeats": a.repeats, "command": " ".join(sys.argv)}
    stem.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    stem.with_suffix(".md").write_text(text + "\n")
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
