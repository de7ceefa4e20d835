"""`report.html`: one self-contained page per run (plots embedded as PNG data), with the
plots also written to `plots/*.png`.

It reads only the run directory (`metrics.jsonl`, `samples.jsonl`,
`advantage_by_position.jsonl`, `alerts.jsonl`, `config.yaml`), so `posttrain report RUN_DIR`
can redraw it at any time, during or after training. All text from the run (prompts,
responses) is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from posttrain.tracking.metrics import read_jsonl, read_metrics
from posttrain.tracking.monitors import SERIES, Alert, check_all, eval_key

PLOTS: list[tuple[str, str, list[str]]] = [
    ("reward", "Reward (train = sampled rollouts; eval = held-out prompts)",
     ["reward/mean", "eval/reward", "eval/reward_sampled"]),
    ("gold", "Gold reward on held-out prompts (the hidden judge)",
     ["eval/gold", "eval/gold_sampled"]),
    ("loss", "Loss", ["train/loss", "loss/policy", "eval/loss", "eval/nll"]),
    ("accuracy", "Accuracy", ["eval/exact_match", "eval/accuracy", "train/accuracy",
                              "rewards/accuracy"]),
    ("implicit_rewards", "DPO implicit rewards",
     ["rewards/chosen", "rewards/rejected", "rewards/margin", "eval/chosen", "eval/rejected"]),
    ("kl", "KL to the reference per sequence (k1: unbiased, can dip below 0; k3: ≥ 0)",
     ["kl/ref_seq", "kl/ref_seq_k3"]),
    ("entropy", "Policy entropy (per token)", ["policy/entropy"]),
    ("length", "Response length (tokens)",
     ["response/length", "eval/response_length", "eval/response_length_sampled"]),
    ("clipfrac", "Clip fraction", ["policy/clipfrac", "policy/dual_clipfrac", "value/clipfrac"]),
    ("value", "Critic: value loss and explained variance",
     ["loss/value", "value/explained_variance"]),
    ("grad_norm", "Gradient norm", ["train/grad_norm", "value/grad_norm"]),
    ("lr", "Learning rate", ["train/lr"]),
    ("throughput", "Tokens per second", ["perf/tokens_per_second"]),
]


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return buf.getvalue()


def _line_plot(rows, title, keys):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    drawn = False
    for key in keys:
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, markersize=3, label=key)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    data = _png(fig)
    plt.close(fig)
    return data


def _advantage_plot(positions):
    import matplotlib.pyplot as plt

    if not positions:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.2))
    n = len(positions)
    windows = [(0, max(1, n // 5)), (n // 2, n // 2 + max(1, n // 5)), (n - max(1, n // 5), n)]
    for lo, hi in dict.fromkeys(windows):
        chunk = positions[lo:hi]
        width = max(len(p["mean_advantage"]) for p in chunk)
        sums, counts = [0.0] * width, [0.0] * width
        for p in chunk:
            for i, (a, c) in enumerate(zip(p["mean_advantage"], p["tokens"], strict=True)):
                sums[i] += a * c
                counts[i] += c
        ys = [s / c if c else float("nan") for s, c in zip(sums, counts, strict=True)]
        ax.plot(range(width), ys, label=f"steps {chunk[0]['step']}-{chunk[-1]['step']}")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_title("Mean advantage by token position (value-bias signature)", fontsize=10)
    ax.set_xlabel("response token position")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    data = _png(fig)
    plt.close(fig)
    return data


def _gold_vs_kl(rows):
    """One line per evaluation series (greedy, sampled): the monitors judge them apart, since
    the deployed greedy policy can be over-optimised while the sampled one is not."""
    import matplotlib.pyplot as plt

    kl = {r["step"]: r["kl/ref_seq"] for r in rows if "kl/ref_seq" in r}
    if not kl:
        return None
    lines = []
    for series in SERIES:
        gold_key = eval_key("gold", series)
        pts = []
        for r in rows:
            if gold_key in r and r["step"] > 0:
                nearest = min(kl, key=lambda s, step=r["step"]: abs(s - step))
                pts.append((kl[nearest], r[gold_key], r["step"]))
        start = next((r[gold_key] for r in rows if gold_key in r and r["step"] == 0), None)
        if start is not None:
            pts.insert(0, (0.0, start, 0))
        if len(pts) >= 2:
            lines.append((f"{series} ({gold_key})", pts))
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for label, pts in lines:
        xs, ys, _ = zip(*pts, strict=True)
        ax.plot(xs, ys, marker="o", markersize=3, label=label)
        for x, y, s in pts:
            ax.annotate(str(s), (x, y), fontsize=6)
    ax.set_title("Gold reward against KL to the reference (over-optimisation)", fontsize=10)
    ax.set_xlabel("KL (nats per sequence)")
    ax.set_ylabel("gold reward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    data = _png(fig)
    plt.close(fig)
    return data


def _alert_source(alert: Alert) -> str:
    """The check and what it read, so two alerts of one kind (greedy, sampled) tell apart."""
    source = f"{alert.series} evaluation" if alert.series else "training metrics"
    return f"{alert.kind}, {source}"


def _config_summary(run_dir: Path) -> list[tuple[str, str]]:
    path = run_dir / "config.yaml"
    if not path.exists():
        return []
    import yaml

    cfg = yaml.safe_load(path.read_text()) or {}
    out = []
    for section, key in [("preset", None), ("model", "path"), ("data", "train"),
                         ("algo", "advantage"), ("algo", "kl_placement"), ("optim", "lr"),
                         ("run", "steps"), ("run", "batch_size"), ("rollout", "prompts_per_step"),
                         ("rollout", "samples_per_prompt")]:
        value = cfg.get(section) if key is None else (cfg.get(section) or {}).get(key)
        if value is not None:
            out.append((section if key is None else f"{section}.{key}", str(value)))
    return out


def write_report(run_dir: str | Path) -> Path:
    """Write `run_dir/report.html` and `run_dir/plots/*.png`; returns the report's path."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    positions = read_jsonl(run_dir / "advantage_by_position.jsonl")
    samples = read_jsonl(run_dir / "samples.jsonl")
    alerts = check_all(rows, positions)
    plots_dir = run_dir / "plots"
    plots_dir.mkdir(exist_ok=True)
    images: list[tuple[str, str, bytes]] = []
    for name, title, keys in PLOTS:
        data = _line_plot(rows, title, keys)
        if data:
            images.append((name, title, data))
    for name, title, data in [("advantage_by_position", "Advantage by position",
                               _advantage_plot(positions)),
                              ("gold_vs_kl", "Gold reward against KL", _gold_vs_kl(rows))]:
        if data:
            images.append((name, title, data))
    for name, _, data in images:
        (plots_dir / f"{name}.png").write_bytes(data)
    esc = html.escape
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>posttrain report: {esc(run_dir.name)}</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:1300px;margin:2em auto;"
        "padding:0 1em;color:#222}h1{font-size:1.5em}table{border-collapse:collapse;"
        "font-size:.9em}td,th{border:1px solid #ccc;padding:.25em .5em;text-align:left;"
        "vertical-align:top}.plots{display:flex;flex-wrap:wrap;gap:1em}.plots figure{margin:0}"
        ".alert{background:#fff3cd;border:1px solid #e0c36a;padding:.5em;margin:.5em 0}"
        "code{background:#f4f4f4}</style></head><body>",
        f"<h1>posttrain report: {esc(run_dir.name)}</h1>",
    ]
    summary = _config_summary(run_dir)
    last = {k: v for r in rows for k, v in r.items()}
    if summary:
        parts.append("<h2>Run</h2><table>")
        parts += [f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in summary]
        parts.append(f"<tr><th>steps logged</th><td>{int(last.get('step', 0))}</td></tr>")
        parts.append("</table>")
    parts.append("<h2>Monitors</h2>")
    if alerts:
        parts += [f"<div class='alert'><b>step {a.step}</b> ({esc(_alert_source(a))}): "
                  f"{esc(a.message)}</div>" for a in alerts]
    else:
        parts.append("<p>No warning: no reward hacking, over-optimisation, entropy or length "
                     "collapse, or value-bias signature was detected.</p>")
    parts.append("<h2>Curves</h2><div class='plots'>")
    for name, title, data in images:
        b64 = base64.b64encode(data).decode()
        parts.append(f"<figure><img alt='{esc(title)}' id='plot-{name}' "
                     f"src='data:image/png;base64,{b64}'></figure>")
    parts.append("</div>")
    if samples:
        final_step = samples[-1]["step"]
        shown = [s for s in samples if s["step"] == final_step][:20]
        parts.append(f"<h2>Sample responses (step {final_step})</h2><table>"
                     "<tr><th>prompt</th><th>response</th><th>reward</th></tr>")
        for s in shown:
            prompt = s["prompt"] if isinstance(s["prompt"], str) else json.dumps(s["prompt"])
            parts.append(f"<tr><td><code>{esc(prompt)}</code></td><td><code>"
                         f"{esc(str(s['response']))}</code></td><td>{s['reward']:.3f}</td></tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    out = run_dir / "report.html"
    out.write_text("\n".join(parts), encoding="utf-8")
    return out
