"""Monitors that read a run's metric history and say, with the step and the numbers, when
training goes wrong in one of the ways ALGORITHMS.md section 7 names.

- reward hacking: the training (proxy) reward keeps rising while the gold reward, or the
  held-out reward, falls from its best;
- over-optimisation against KL: the gold reward peaked at some KL and fell as the KL grew;
- entropy collapse, response-length collapse;
- the value-bias signature (VC-PPO): early tokens get larger mean advantages than late ones.

Each check is a pure function of the history, so the same warnings appear live (the RL
trainer runs them at every log step) and in the report.

A run's directory holds `alerts.jsonl` (each kind of alert, once, when it first fired) and
`monitors.json`, rewritten at every check: the step of the last metric row checked and how many
rows (and advantage-by-position rows) were checked. A run without alerts.jsonl but with a
`monitors.json` at its last step was watched and stayed healthy; one without `monitors.json`
was never watched (`read_monitor_status`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

Row = dict[str, float]


@dataclass(frozen=True)
class Alert:
    kind: str
    step: int
    message: str


def _series(rows: Sequence[Row], key: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[key])) for r in rows if key in r]


def _first_key(rows: Sequence[Row], keys: Sequence[str]) -> str | None:
    return next((k for k in keys if any(k in r for r in rows)), None)


def reward_hacking(rows: Sequence[Row], min_points: int = 3, drop: float = 0.2,
                   relative: float = 0.1) -> Alert | None:
    """Proxy up, judge down: the judge (gold reward, else the held-out reward) has fallen from
    its best evaluation by more than `drop` x its range and `relative` x its best value, while
    the proxy (the training reward) is at or above where it was at that best."""
    judge_key = _first_key(rows, ["eval/gold_sampled", "eval/gold"])
    if judge_key is not None:
        proxy_key = "eval/reward_sampled" if judge_key.endswith("_sampled") else "eval/reward"
        label = "gold"
    else:  # no gold: the held-out reward judges the training reward
        judge_key = _first_key(rows, ["eval/reward_sampled", "eval/reward"])
        proxy_key, label = "reward/mean", "held-out"
    if judge_key is None:
        return None
    judge, proxy = _series(rows, judge_key), dict(_series(rows, proxy_key))
    if len(judge) < min_points:
        return None
    values = [v for _, v in judge]
    span = max(values) - min(values)
    best_i = max(range(len(judge)), key=lambda i: judge[i][1])
    best_step, best = judge[best_i]
    last_step, last = judge[-1]
    fall = best - last
    if best_i == len(judge) - 1 or fall <= drop * span or fall <= relative * abs(best):
        return None
    p_best = _nearest(proxy, best_step)
    p_last = _nearest(proxy, last_step)
    if p_best is None or p_last is None or p_last < p_best:
        return None
    return Alert("reward_hacking", last_step,
                 f"reward hacking: the {label} reward fell from {best:.3g} (step {best_step}) "
                 f"to {last:.3g} (step {last_step}) while the training reward rose from "
                 f"{p_best:.3g} to {p_last:.3g}. Raise the KL coefficient, stop earlier, or "
                 "improve the reward model.")


def _nearest(series: dict[int, float], step: int) -> float | None:
    if not series:
        return None
    key = min(series, key=lambda s: abs(s - step))
    return series[key]


def kl_overoptimisation(rows: Sequence[Row], min_points: int = 3,
                        drop: float = 0.2) -> Alert | None:
    """The gold reward as a function of KL: it peaked and then fell while the KL kept growing
    (Gao et al.'s over-optimisation curve)."""
    gold_key = _first_key(rows, ["eval/gold_sampled", "eval/gold"])
    if gold_key is None:
        return None
    gold = _series(rows, gold_key)
    kl = dict(_series(rows, "kl/ref_seq"))
    pairs = [(k, g, s) for s, g in gold if (k := _nearest(kl, s)) is not None and s > 0]
    if len(pairs) < min_points:
        return None
    values = [g for _, g, _ in pairs]
    span = max(values) - min(values)
    best = max(range(len(pairs)), key=lambda i: pairs[i][1])
    kl_best, g_best, s_best = pairs[best]
    kl_last, g_last, s_last = pairs[-1]
    if best == len(pairs) - 1 or span <= 0 or g_best - g_last <= drop * span or kl_last <= kl_best:
        return None
    return Alert("kl_overoptimisation", s_last,
                 f"over-optimisation: the gold reward peaked at {g_best:.3g} at KL {kl_best:.3g}"
                 f" (step {s_best}) and fell to {g_last:.3g} at KL {kl_last:.3g} (step "
                 f"{s_last}). A KL budget near {kl_best:.2g} would have kept the best policy.")


def _collapse(rows: Sequence[Row], key: str, ratio: float, kind: str, what: str,
              advice: str) -> Alert | None:
    """`key` fell below `ratio` x its first logged value."""
    series = _series(rows, key)
    if len(series) < 3 or series[0][1] <= 0:
        return None
    (first_step, first), (step, last) = series[0], series[-1]
    if last >= ratio * first:
        return None
    return Alert(kind, step, f"{what} fell from {first:.3g} (step {first_step}) to {last:.3g} "
                             f"(step {step}). {advice}")


def entropy_collapse(rows: Sequence[Row], ratio: float = 0.1) -> Alert | None:
    return _collapse(rows, "policy/entropy", ratio, "entropy_collapse",
                     "entropy collapse: policy entropy",
                     "The policy has stopped exploring. Consider clip-higher, an entropy bonus "
                     "or a lower lr.")


def length_collapse(rows: Sequence[Row], ratio: float = 0.5) -> Alert | None:
    return _collapse(rows, "response/length", ratio, "length_collapse",
                     "response-length collapse: the mean length in tokens",
                     "With a critic, this is the symptom of value bias: pretrain the critic "
                     "(vc_ppo/vapo) or use decoupled GAE.")


def value_bias(positions: Sequence[dict], steps: int = 20, early: int = 5,
               threshold: float = 0.02) -> Alert | None:
    """Mean advantage over the first `early` positions, in the first `steps` steps, above the
    mean over later positions by more than `threshold` (seed 001: an RM-initialised critic
    makes every TD error positive, most at early tokens)."""
    head = positions[:steps]
    if len(head) < min(steps, 5):
        return None
    e_sum = e_n = l_sum = l_n = 0.0
    for p in head:
        for i, (a, n) in enumerate(zip(p["mean_advantage"], p["tokens"], strict=True)):
            if i < early:
                e_sum, e_n = e_sum + a * n, e_n + n
            else:
                l_sum, l_n = l_sum + a * n, l_n + n
    if not e_n or not l_n:
        return None
    e_mean, l_mean = e_sum / e_n, l_sum / l_n
    if e_mean - l_mean > threshold and e_mean > 0:
        return Alert("value_bias", int(head[-1]["step"]),
                     f"value-bias signature: in the first {len(head)} steps the first {early} "
                     f"tokens got a mean advantage of {e_mean:+.3f}, later tokens {l_mean:+.3f}. "
                     "The critic undervalues early states; pretrain it (algo."
                     "value_pretrain_steps) before RL.")
    return None


def check_all(rows: Sequence[Row], positions: Sequence[dict] = ()) -> list[Alert]:
    checks = [reward_hacking(rows), kl_overoptimisation(rows), entropy_collapse(rows),
              length_collapse(rows), value_bias(positions) if positions else None]
    return [a for a in checks if a is not None]


class MonitorLog:
    """Runs the checks on a growing history; each kind of alert is printed and written to
    `alerts.jsonl` once (the first time it fires), and `monitors.json` records what was last
    checked (see the module docstring)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / "alerts.jsonl"
        self.status_path = Path(run_dir) / "monitors.json"
        self.seen: set[str] = set()
        if self.path.exists():
            self.seen = {json.loads(line)["kind"] for line in self.path.open() if line.strip()}

    def update(self, rows: Sequence[Row], positions: Sequence[dict] = ()) -> list[Alert]:
        new = [a for a in check_all(rows, positions) if a.kind not in self.seen]
        for alert in new:
            self.seen.add(alert.kind)
            print(f"WARNING (step {alert.step}): {alert.message}", flush=True)
            with self.path.open("a") as f:
                f.write(json.dumps(asdict(alert)) + "\n")
        status = {"step": int(rows[-1]["step"]) if rows else None, "rows": len(rows),
                  "positions": len(positions)}
        tmp = self.status_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(status))
        tmp.replace(self.status_path)  # atomic: never a half-written record
        return new


def read_alerts(run_dir: Path) -> list[Alert]:
    path = Path(run_dir) / "alerts.jsonl"
    if not path.exists():
        return []
    return [Alert(**json.loads(line)) for line in path.open() if line.strip()]


def read_monitor_status(run_dir: Path) -> dict | None:
    """What the run's monitors last checked (`step`, `rows`, `positions`); None when they
    never ran."""
    path = Path(run_dir) / "monitors.json"
    return json.loads(path.read_text()) if path.exists() else None
