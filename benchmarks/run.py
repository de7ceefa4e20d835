"""posttrain against TRL, side by side, on the same model, data and optimiser settings.

    .venv/bin/python benchmarks/run.py                 # everything (about 20 min on 2 cores)
    .venv/bin/python benchmarks/run.py --sizes small --precisions fp32 --workloads dpo,grpo
    .venv/bin/python benchmarks/run.py --checkpointing on --tag=-ckpt   # TRL's default

Installs TRL in its own virtual environments first (`benchmarks/setup_trl.sh`), builds the
model, tokenizer and data (`assets.py`), measures this machine's matmul peak, then runs every
workload once per library in its own process, interleaved (posttrain, TRL, TRL, posttrain, ...),
so both see the same machine state. Both run with the same settings, gradient checkpointing
included (`--checkpointing off|on`, applied to both; TRL's configs default it to on). Prints a
table and writes `benchmarks/results/<date><tag>.json` and `.md`. Never part of `make test`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import assets  # noqa: E402
from workloads import WARMUP, WORKLOADS  # noqa: E402

TRL_VENV = {"ppo": HERE / ".venv-trl-ppo"}  # TRL 1.16 has no PPO; 1.12 is the last with one
TRL_DEFAULT_VENV = HERE / ".venv-trl"


def run_worker(python: Path, script: str, args: list[str]) -> dict:
    cmd = [str(python), str(HERE / script), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ,
                          "PYTHONWARNINGS": "ignore", "TRANSFORMERS_VERBOSITY": "error"})
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            return json.loads(line[len("BENCH_RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-8:]
    return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}


def median_run(runs: list[dict]) -> dict:
    """Of a library's repeated runs, the one with the median step time (the lower middle
    for an even count), with every run's median kept; an error if none finished."""
    done = sorted((r for r in runs if "median_s" in r), key=lambda r: r["median_s"])
    if not done:
        return runs[0]
    out = dict(done[(len(done) - 1) // 2])
    out["median_s_runs"] = [r["median_s"] for r in runs if "median_s" in r]
    return out


def fmt(x, spec=".3f", none="-"):
    return none if x is None else format(x, spec)


def _onoff(flag) -> str:
    return "-" if flag is None else ("on" if flag else "off")


def table(rows: list[dict]) -> str:
    head = ("| workload | size | prec | ckpt pt/TRL | posttrain s/step | TRL s/step | ratio | "
            "gen tok/s pt | gen tok/s TRL | RSS MB pt | RSS MB TRL | GFLOP/step | % peak pt | "
            "% peak TRL |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        pt, trl = r["posttrain"], r.get("trl") or {}
        ratio = pt.get("median_s", 0) / trl["median_s"] if trl.get("median_s") else None
        lines.append("| " + " | ".join([
            r["workload"], r["size"], r["precision"],
            f"{_onoff(pt.get('gradient_checkpointing'))}/"
            f"{_onoff(trl.get('gradient_checkpointing'))}",
            fmt(pt.get("median_s"), ".4f", pt.get("error", "-")[:40]),
            fmt(trl.get("median_s"), ".4f", (trl.get("error") or trl.get("absent") or "-")[:40]),
            fmt(ratio, ".2f"),
            fmt(pt.get("gen_tokens_per_s"), ".0f"), fmt(trl.get("gen_tokens_per_s"), ".0f"),
            fmt(pt.get("peak_rss_mb"), ".0f"), fmt(trl.get("peak_rss_mb"), ".0f"),
            fmt(r["gflop_per_step"], ".2f"),
            fmt(pt.get("peak_fraction") and 100 * pt["peak_fraction"], ".1f"),
            fmt(trl.get("peak_fraction") and 100 * trl["peak_fraction"], ".1f"),
        ]) + " |")
    return "\n".join(lines)


def loss_curves(rows: list[dict]) -> str:
    """Learning, not just speed: DPO losses step by step, posttrain against TRL (identical
    weights, data and order; the first loss is ln 2)."""
    lines = ["| DPO loss curve | steps | first loss pt / TRL | last loss pt / TRL | "
             "max abs difference |", "|---|---|---|---|---|"]
    for r in rows:
        pt, trl = r["posttrain"].get("losses"), (r.get("trl") or {}).get("losses")
        if r["workload"] != "dpo" or not pt or not trl:
            continue
        n = min(len(pt), len(trl))
        diff = max(abs(a - b) for a, b in zip(pt[:n], trl[:n], strict=True))
        lines.append(f"| {r['size']} {r['precision']} | {n} | {pt[0]:.6f} / {trl[0]:.6f} | "
                     f"{pt[n - 1]:.6f} / {trl[n - 1]:.6f} | {diff:.2e} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--sizes", default="small,large")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--steps", type=int, default=WARMUP + 10,
                    help=f"optimiser steps per run; the first {WARMUP} are warm-up")
    ap.add_argument("--no-trl", action="store_true", help="posttrain only (no TRL install)")
    ap.add_argument("--work", type=Path, default=HERE / ".work",
                    help="assets and run directories")
    ap.add_argument("--results", type=Path, default=HERE / "results")
    ap.add_argument("--tag", default="", help="suffix of the result file names")
    ap.add_argument("--repeats", type=int, default=1,
                    help="processes per library and workload, interleaved; the table shows "
                         "the median run (this machine drifts up to +-15%% between processes)")
    ap.add_argument("--checkpointing", default="off", choices=["off", "on"],
                    help="gradient checkpointing in both libraries (TRL's default is on)")
    a = ap.parse_args()

    if not a.no_trl:
        subprocess.run(["bash", str(HERE / "setup_trl.sh")], check=True)
    info = assets.build(a.work / "assets")
    peaks = {p: assets.matmul_peak(p) for p in a.precisions.split(",")}
    print("matmul peak (1024^3, best of 1 s): " +
          ", ".join(f"{p} {v / 1e9:.1f} GFLOP/s" for p, v in peaks.items()), flush=True)

    rows = []
    flip = False
    for size in a.sizes.split(","):
        n = info["n_params"][size]
        for name in a.workloads.split(","):
            w = WORKLOADS[name]
            for prec in a.precisions.split(","):
                args = ["--root", str(a.work / "assets"), "--workload", name, "--size", size,
                        "--precision", prec, "--steps", str(a.steps),
                        "--checkpointing", a.checkpointing]
                libs = ["posttrain"] if a.no_trl else ["posttrain", "trl"]
                if flip:
                    libs.reverse()
                flip = not flip
                runs: dict[str, list[dict]] = {lib: [] for lib in libs}
                for _ in range(a.repeats):  # interleaved: pt, TRL, pt, TRL, ...
                    for lib in libs:
                        out = a.work / "runs" / f"{lib}-{size}-{name}-{prec}"
                        if lib == "posttrain":
                            r = run_worker(Path(sys.executable), "bench_posttrain.py",
                                           [*args, "--out", str(out)])
                        else:
                            venv = TRL_VENV.get(name, TRL_DEFAULT_VENV)
                            r = run_worker(venv / "bin" / "python", "bench_trl.py",
                                           [*args, "--out", str(out)])
                        runs[lib].append(r)
                        print(f"  {size:5} {name:8} {prec} {lib:9} "
                              f"{fmt(r.get('median_s'), '.4f', r.get('error', ''))}", flush=True)
                res = {lib: median_run(rs) for lib, rs in runs.items()}
                for r in res.values():
                    if "median_s" in r:
                        r["peak_fraction"] = w.flops(n) / r["median_s"] / peaks[prec]
                rows.append({"workload": name, "size": size, "precision": prec,
                             "n_params": n, "gflop_per_step": w.flops(n) / 1e9, **res})
    text = table(rows) + "\n\n" + loss_curves(rows)
    print(text)
    date = datetime.date.today().isoformat()
    a.results.mkdir(parents=True, exist_ok=True)
    stem = a.results / f"{date}{a.tag}"
    meta = {"date": date, "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "matmul_peak_flops": peaks, "steps": a.steps, "warmup": WARMUP,
            "checkpointing": a.checkpointing, "repeats": a.repeats,
            "command": " ".join(sys.argv)}
    stem.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    stem.with_suffix(".md").write_text(text + "\n")
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
