"""`posttrain quickstart`: the InstructGPT pipeline on the built-in tasks, end to end.

    preference:  tiny model -> SFT -> reward model -> PPO with a KL penalty
                 (the learned reward model trains the policy; a hidden gold scorer judges)
    arithmetic:  tiny model -> SFT -> GRPO with an exact-answer reward

Then a before/after table and `report.html` (the runs' curves and monitors). Everything is
written under `--out` (default `runs/quickstart`); stages already there are reused.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BUDGETS = {"small": 0.4, "default": 1.0, "large": 3.0}
PIPELINES = {"preference": "ppo", "arithmetic": "grpo"}
EVAL_KEYS = ("eval/gold", "eval/gold_sampled", "eval/reward", "eval/reward_sampled")
"""What the summary compares before and after RL: greedy and sampled, gold and proxy."""


@dataclass
class Outcome:
    task: str
    preset: str
    run_dir: Path
    seconds: float
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    from posttrain.tracking.metrics import read_metrics

    return read_metrics(run_dir)


def _before_after(rows, key) -> tuple[float | None, float | None]:
    values = [r[key] for r in rows if key in r]
    return (values[0], values[-1]) if values else (None, None)


def run_pipeline(task: str, preset: str, out: Path, scale: float, progress: str,
                 engine: str = "lean") -> Outcome:
    from posttrain import pipeline
    from posttrain.config import load_config, merge
    from posttrain.trainers.rl import RLConfig, RLTrainer

    start = time.time()
    quiet = {"run": {"progress": progress}}
    task_dir = pipeline.ensure_task(task)
    pipeline.ensure_sft(task_dir, quiet)
    if task == "preference":
        pipeline.ensure_rm(task_dir, quiet)
    preset_cfg = pipeline.load_preset(preset)
    base = merge(preset_cfg, pipeline.rl_base(task_dir, preset_cfg))
    steps = max(10, round(150 * scale))
    over = {"run": {"output_dir": str(out), "name": f"{preset}-{task}", "steps": steps,
                    "eval_every": max(5, steps // 5), "progress": progress,
                    "overwrite": True},  # each quickstart trains RL afresh
            "eval": {"prompts": 250 if scale >= 1 else 100},
            "rollout": {"engine": engine}}
    if preset_cfg.get("algo", {}).get("kl_placement") == "reward" and task == "preference":
        # InstructGPT's guard against over-optimising the learned reward: keep the KL small
        over["algo"] = {"kl_coef": 0.1, "kl_target": 2.0}
    print(f"\n== {task}: RL with {preset} ({steps} steps, {engine} engine)", flush=True)
    trainer = RLTrainer(load_config(RLConfig, overrides=merge(base, over)))
    result = trainer.train()
    outcome = Outcome(task, preset, result.run_dir, time.time() - start)
    rows = _rows(result.run_dir)
    for key in EVAL_KEYS:
        b, a = _before_after(rows, key)
        if b is not None:
            outcome.before[key], outcome.after[key] = b, a
    kl = [r["kl/ref_seq"] for r in rows if "kl/ref_seq" in r]
    outcome.after["kl"] = kl[-1] if kl else 0.0
    return outcome


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _change(o: Outcome, key: str) -> str:
    if key not in o.before:
        return "-"
    return f"{_fmt(o.before[key])} -> {_fmt(o.after[key])}"


def summary_table(outcomes: list[Outcome]) -> list[list[str]]:
    """One row per pipeline and measure, greedy and sampled side by side: the greedy policy
    is what a user deploys, the sampled one is what RL trains on, and they can move apart
    (a reward-hacked greedy policy under a rising sampled gold reward)."""
    rows = [["pipeline", "measure (held-out prompts)", "greedy", "sampled", "KL to SFT",
             "wall time"]]
    for o in outcomes:
        name = f"{o.task}: SFT -> {'RM -> ' if o.task == 'preference' else ''}{o.preset}"
        if o.task == "preference":
            measures = [("gold reward", "eval/gold"), ("proxy (RM) reward", "eval/reward")]
        else:
            measures = [("accuracy", "eval/reward")]
        for i, (label, key) in enumerate(measures):
            rows.append([name if i == 0 else "", label, _change(o, key),
                         _change(o, f"{key}_sampled"),
                         f"{o.after['kl']:.2f}" if i == 0 else "",
                         f"{o.seconds:.0f} s" if i == 0 else ""])
    return rows


def write_summary_report(out: Path, outcomes: list[Outcome], table: list[list[str]]) -> Path:
    import html

    esc = html.escape
    parts = ["<!doctype html><html lang='en'><head><meta charset='utf-8'>",
             "<title>posttrain quickstart</title><style>body{font-family:system-ui,sans-serif;"
             "max-width:1300px;margin:2em auto;padding:0 1em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:.3em .6em}</style></head><body>",
             "<h1>posttrain quickstart</h1>",
             "<p>Each pipeline starts from a randomly initialised tiny model. Rewards are "
             "measured on held-out prompts, before and after RL.</p><table>"]
    parts.append("<tr>" + "".join(f"<th>{esc(c)}</th>" for c in table[0]) + "</tr>")
    for row in table[1:]:
        parts.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>")
    parts.append("</table><h2>Runs</h2><ul>")
    for o in outcomes:
        rel = os.path.relpath(o.run_dir / "report.html", out)
        parts.append(f"<li><a href='{esc(rel)}'>{esc(o.task)} with {esc(o.preset)}</a>: "
                     "curves, monitors and sample responses</li>")
    parts.append("</ul>")
    for o in outcomes:
        for plot in ("reward", "gold", "gold_vs_kl", "kl"):
            png = o.run_dir / "plots" / f"{plot}.png"
            if png.exists():
                import base64

                b64 = base64.b64encode(png.read_bytes()).decode()
                parts.append(f"<figure><img alt='{esc(o.task)} {plot}' "
                             f"src='data:image/png;base64,{b64}'><figcaption>{esc(o.task)}: "
                             f"{esc(plot)}</figcaption></figure>")
    parts.append("</body></html>")
    path = out / "report.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def run_quickstart(out: str | Path = "runs/quickstart", budget: str = "default",
                   tasks: tuple[str, ...] = ("preference", "arithmetic"),
                   presets: dict[str, str] | None = None, progress: str = "auto",
                   engine: str = "lean") -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ["POSTTRAIN_TASKS"] = str(out / "tasks")
    presets = {**PIPELINES, **(presets or {})}
    start = time.time()
    outcomes = [run_pipeline(task, presets[task], out, BUDGETS[budget], progress, engine)
                for task in tasks]
    table = summary_table(outcomes)
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    print("\nposttrain quickstart: before -> after RL, on held-out prompts\n")
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    report = write_summary_report(out, outcomes, table)
    print(f"\ntotal {time.time() - start:.0f} s. Report: {report}")
    print(f"Every stage is in {out}. To measure a policy further:\n"
          f"  POSTTRAIN_TASKS={out / 'tasks'} posttrain eval --task {outcomes[0].task} "
          f"--model {outcomes[0].run_dir / 'final'} --baseline "
          f"{out / 'tasks' / outcomes[0].task / 'sft' / 'final'}")
    return report
