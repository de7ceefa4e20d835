"""Monitors that read a run's metric history and say, with the step and the numbers, when
training goes wrong in one of the ways ALGORITHMS.md section 7 names.

- reward hacking: the proxy reward keeps rising while the gold reward, or the held-out reward,
  falls from its best;
- over-optimisation against KL: the gold reward peaked at some KL and fell as the KL grew;
- entropy collapse, response-length collapse;
- the value-bias signature (VC-PPO): early tokens get larger mean advantages than late ones.

The RL trainer evaluates two ways, and the two can disagree: the greedy series (`eval/gold`,
`eval/reward`, `eval/response_length`) is the policy as deployed, the sampled one (the same
keys with `_sampled`) the policy as trained. A PPO run once had its greedy gold reward fall
(0.79 -> -0.40) while its greedy proxy rose (-1.09 -> 2.47) and the sampled gold rose, so the
reward-hacking, over-optimisation and evaluation length-collapse checks judge each series on
its own, and an alert's `series` says which one fired (None for checks on training metrics).

Each check is a pure function of the history, so the same warnings appear live (the RL
trainer runs them at every log step) and in the report.

A run's directory holds `alerts.jsonl` (each kind of alert, once per series, when it first
fired) and `monitors.json`, rewritten at every check: the step of the last metric row checked
and how many rows (and advantage-by-position rows) were checked. A run without alerts.jsonl but
with a `monitors.json` at its last step was watched and stayed healthy; one without
`monitors.json` was never watched (`read_monitor_status`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

Row = dict[str, float]
Series = Literal["greedy", "sampled"]
SERIES: tuple[Series, ...] = ("sampled", "greedy")  # the order checks without `series` try


@dataclass(frozen=True)
class Alert:
    """`kind` names the check; `series` the evaluation series it judged ("greedy" or
    "sampled"), None when it read training metrics (and in alerts.jsonl files written before
    the series were told apart)."""

    kind: str
    step: int
    message: str
    series: str | None = None


def eval_key(metric: str, series: Series) -> str:
    """The metric-row key of an evaluation metric (`gold`, `reward`, `response_length`) in one
    series: the greedy one is unsuffixed, the sampled one ends in `_sampled`."""
    return f"eval/{metric}_sampled" if series == "sampled" else f"eval/{metric}"


def _series(rows: Sequence[Row], key: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[key])) for r in rows if key in r]


def _first(alerts: Iterable[Alert | None]) -> Alert | None:
    return next((a for a in alerts if a is not None), None)


def reward_hacking(rows: Sequence[Row], min_points: int = 3, drop: float = 0.2,
                   relative: float = 0.1, *, series: Series | None = None) -> Alert | None:
    """Proxy up, judge down, in one evaluation series: the judge (the series' gold reward, else
    its held-out reward) has fallen from its best evaluation by more than `drop` x its range
    and `relative` x its best value, while the proxy (the series' reward-model score, else the
    training reward) is at or above where it was at that best.

    Without `series`, the sampled series is judged, then the greedy one, and the first alert is
    returned; `check_all` judges both and reports each."""
    if series is None:
        return _first(reward_hacking(rows, min_points, drop, relative, series=s) for s in SERIES)
    gold_key = eval_key("gold", series)
    if any(gold_key in r for r in rows):
        judge_key, proxy_key = gold_key, eval_key("reward", series)
        judge_name, proxy_name = f"{series} gold reward", f"{series} proxy reward"
    else:  # no gold: the held-out reward judges the training reward
        judge_key, proxy_key = eval_key("reward", series), "reward/mean"
        judge_name, proxy_name = f"{series} held-out reward", "training reward"
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
                 f"reward hacking: the {judge_name} fell from {best:.3g} (step {best_step}) "
                 f"to {last:.3g} (step {last_step}) while the {proxy_name} rose from "
                 f"{p_best:.3g} to {p_last:.3g}. Raise the KL coefficient, stop earlier, or "
                 "improve the reward model.", series)


def _nearest(series: dict[int, float], step: int) -> float | None:
    if not series:
        return None
    key = min(series, key=lambda s: abs(s - step))
    return series[key]


def kl_overoptimisation(rows: Sequence[Row], min_points: int = 3, drop: float = 0.2, *,
                        series: Series | None = None) -> Alert | None:
    """One series' gold reward as a function of KL: it peaked and then fell while the KL kept
    growing (Gao et al.'s over-optimisation curve).

    Without `series`, the sampled series is judged, then the greedy one, and the first alert is
    returned; `check_all` judges both and reports each."""
    if series is None:
        return _first(kl_overoptimisation(rows, min_points, drop, series=s) for s in SERIES)
    gold = _series(rows, eval_key("gold", series))
    kl = dict(_series(rows, "kl/ref_seq"))
    pairs = [(k, g, s) for s, g in gold if (k := _nearest(kl, s)) is not None and s > 0]
    if len(pairs) < min_points:
        return None
    # the fall is judged against the whole range, the start included: a fall of a fifth of
    # what RL gained is a trend, a wobble at the top of a large gain is not
    values = [g for _, g, _ in pairs] + [g for s, g in gold if s == 0]
    span = max(values) - min(values)
    best = max(range(len(pairs)), key=lambda i: pairs[i][1])
    kl_best, g_best, s_best = pairs[best]
    kl_last, g_last, s_last = pairs[-1]
    if best == len(pairs) - 1 or span <= 0 or g_best - g_last <= drop * span or kl_last <= kl_best:
        return None
    return Alert("kl_overoptimisation", s_last,
                 f"over-optimisation: the {series} gold reward peaked at {g_best:.3g} at KL "
                 f"{kl_best:.3g} (step {s_best}) and fell to {g_last:.3g} at KL {kl_last:.3g} "
                 f"(step {s_last}). A KL budget near {kl_best:.2g} would have kept the best "
                 "policy.", series)


def _collapse(rows: Sequence[Row], key: str, ratio: float, kind: str, what: str,
              advice: str, series: Series | None = None) -> Alert | None:
    """`key` fell below `ratio` x its first logged value."""
    points = _series(rows, key)
    if len(points) < 3 or points[0][1] <= 0:
        return None
    (first_step, first), (step, last) = points[0], points[-1]
    if last >= ratio * first:
        return None
    return Alert(kind, step, f"{what} fell from {first:.3g} (step {first_step}) to {last:.3g} "
                             f"(step {step}). {advice}", series)


def entropy_collapse(rows: Sequence[Row], ratio: float = 0.1) -> Alert | None:
    return _collapse(rows, "policy/entropy", ratio, "entropy_collapse",
                     "entropy collapse: policy entropy",
                     "The policy has stopped exploring. Consider clip-higher, an entropy bonus "
                     "or a lower lr.")


def length_collapse(rows: Sequence[Row], ratio: float = 0.5, *,
                    series: Series | None = None) -> Alert | None:
    """The mean response length fell below `ratio` x its first value: in the training rollouts
    (`response/length`) without `series`, else in that evaluation series, which can collapse
    on its own (greedy decoding finds the short answer first)."""
    if series is None:
        key, where = "response/length", "the training rollouts'"
    else:
        key, where = eval_key("response_length", series), f"the {series} evaluation's"
    return _collapse(rows, key, ratio, "length_collapse",
                     f"response-length collapse: {where} mean length in tokens",
                     "With a critic, this is the symptom of value bias: pretrain the critic "
                     "(vc_ppo/vapo) or use decoupled GAE.", series)


def value_bias(positions: Sequence[dict], steps: int = 20, early: int = 5,
               threshold: float = 0.02) -> Alert | None:
    """Mean advantage over the first `early` positions, in the first `steps` steps, above the
    mean over later positions by more than `threshold` (seed 001: an RM-initialised critic
    makes every TD error positive, most at early tokens). Steps without a critic are not
    judged (a record with `"critic": false`): with one advantage per sequence, later positions
    exist only in longer responses, which in a multi-turn game are the lower-scoring ones."""
    head = [p for p in positions if p.get("critic", True)][:steps]
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
    """Every check, the evaluation ones once per series, so a greedy policy that is hacked
    while the sampled one is not (or the reverse) still raises its alert."""
    checks = [*(reward_hacking(rows, series=s) for s in SERIES),
              *(kl_overoptimisation(rows, series=s) for s in SERIES),
              entropy_collapse(rows), length_collapse(rows),
              *(length_collapse(rows, series=s) for s in SERIES),
              value_bias(positions) if positions else None]
    return [a for a in checks if a is not None]


class MonitorLog:
    """Runs the checks on a growing history; each kind of alert is printed and written to
    `alerts.jsonl` once per series (the first time it fires: reward hacking of the greedy
    policy and of the sampled one are two alerts), and `monitors.json` records what was last
    checked (see the module docstring)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / "alerts.jsonl"
        self.status_path = Path(run_dir) / "monitors.json"
        self.seen: set[tuple[str, str | None]] = set()
        if self.path.exists():  # a resumed run: what fired before the restart stays reported
            self.seen = {(a.kind, a.series) for a in read_alerts(run_dir)}

    def update(self, rows: Sequence[Row], positions: Sequence[dict] = ()) -> list[Alert]:
        new = [a for a in check_all(rows, positions) if (a.kind, a.series) not in self.seen]
        for alert in new:
            self.seen.add((alert.kind, alert.series))
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
    """The alerts a run recorded, oldest first; lines written before alerts had a `series`
    read back with series None."""
    path = Path(run_dir) / "alerts.jsonl"
    if not path.exists():
        return []
    return [Alert(**json.loads(line)) for line in path.open() if line.strip()]


def read_monitor_status(run_dir: Path) -> dict | None:
    """What the run's monitors last checked (`step`, `rows`, `positions`); None when they
    never ran."""
    path = Path(run_dir) / "monitors.json"
    return json.loads(path.read_text()) if path.exists() else None
