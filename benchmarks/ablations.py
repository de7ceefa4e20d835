"""Each optimisation on and off, posttrain only: the before/after table of docs/performance.md.

    .venv/bin/python benchmarks/ablations.py            # about 10 minutes on 2 cores

1. Whole optimiser steps of the benchmark's workloads (`bench_posttrain.py`, its own process
   per run) with one optimisation switched back to the plain path.
2. Generation alone: the lean engine against `transformers`' generate with the prompt repeated
   n times (what TRL's GRPO trainer runs), on the workload's shape, on long prompts, and with
   responses that end early.
3. Padding-free against padded micro-batches on sequences of mixed lengths (8..96 tokens).
4. One AdamW step: torch's fused kernel (what the trainers use) against the default one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import assets  # noqa: E402

STEP_ABLATIONS = [
    # (workload, label, overrides of the plain path)
    ("grpo", "lean engine -> transformers generate", ["rollout.engine=hf"]),
    ("grpo", "reuse π_old -> recompute π_old", ["algo.recompute_old_logprobs=true"]),
    ("grpo", "both plain", ["rollout.engine=hf", "algo.recompute_old_logprobs=true"]),
    ("ppo", "reuse π_old -> recompute π_old", ["algo.recompute_old_logprobs=true"]),
    ("dpo", "reference precomputed -> per step", ["dpo.precompute_reference=false"]),
    ("sft", "gradient checkpointing (TRL's default) -> none", ["run.gradient_checkpointing=true"]),
]


def step_time(root: Path, work: Path, workload: str, sets: list[str], precision="fp32",
              steps=15) -> float:
    out = work / "ablations" / f"{workload}-{abs(hash(tuple(sets)))}-{precision}"
    cmd = [sys.executable, str(HERE / "bench_posttrain.py"), "--root", str(root), "--workload",
           workload, "--precision", precision, "--steps", str(steps), "--out", str(out)]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            return json.loads(line[13:])["median_s"]
    raise RuntimeError(proc.stderr[-2000:])


def timed(fn, repeats=7) -> float:
    fn()
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def generation_rows(root: Path) -> list[tuple[str, float, float]]:
    import torch

    from posttrain.models.load import load_causal_lm, load_tokenizer
    from posttrain.rollout.engine import HFGenerateEngine, LeanGenerateEngine, SamplingConfig

    model = load_causal_lm(root / "small")
    tok = load_tokenizer(root / "small")
    rng = torch.Generator().manual_seed(0)

    def prompts(k, length):
        return torch.randint(2, len(tok), (k, length), generator=rng).tolist()

    frequent = list(range(2, 66))  # 64 of 512 ids end a response: most end within ~10 tokens
    cases = [("2 prompts x 8, 16-token prompts, 32 new", prompts(2, 16), 8, tok.eos_token_id),
             ("2 prompts x 8, 256-token prompts, 32 new", prompts(2, 256), 8, tok.eos_token_id),
             ("2 prompts x 8, 16-token prompts, early EOS", prompts(2, 16), 8, frequent)]
    rows = []
    for label, ps, n, eos in cases:
        cfg = SamplingConfig(samples_per_prompt=n, max_new_tokens=32, seed=0)
        lean = LeanGenerateEngine(model, tok.pad_token_id, eos)
        hf = HFGenerateEngine(model, tok.pad_token_id, eos)
        t_lean = timed(lambda lean=lean, ps=ps, cfg=cfg: lean.generate(ps, cfg))
        t_hf = timed(lambda hf=hf, ps=ps, cfg=cfg: hf.generate(ps, cfg))
        rows.append((label, t_hf, t_lean))
    return rows


def packing_rows(root: Path) -> list[tuple[str, float, float]]:
    import torch

    from posttrain.data.collate import pad
    from posttrain.models.forward import sequence_logprobs
    from posttrain.models.load import load_causal_lm

    model = load_causal_lm(root / "small")
    rng = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, 97, (16,), generator=rng).tolist()
    rows_ = [torch.randint(2, 500, (n,), generator=rng).tolist() for n in lengths]
    ids = pad(rows_, 0)
    att = pad([[1] * n for n in lengths], 0).bool()

    def step(packed):
        model.zero_grad(set_to_none=True)
        logp, mask = sequence_logprobs(model, ids, att, att, packed=packed)
        (-(logp * mask).sum()).backward()

    label = (f"SFT forward+backward, 16 sequences of 8..96 tokens "
             f"({sum(lengths)} real of {ids.numel()} padded)")
    return [(label, timed(lambda: step(False)), timed(lambda: step(True)))]


def adamw_rows(root: Path) -> list[tuple[str, float, float]]:
    import torch

    from posttrain.models.load import load_causal_lm

    rows = []
    for size in ("small", "large"):
        model = load_causal_lm(root / size)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        times = []
        for fused in (None, True):
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=fused)
            times.append(timed(opt.step, repeats=21))
        n = sum(p.numel() for p in model.parameters())
        rows.append((f"one step, {size} model ({n / 1e6:.1f} M parameters)", *times))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=HERE / ".work")
    ap.add_argument("--repeats", type=int, default=3,
                    help="processes per side of each step ablation, interleaved")
    a = ap.parse_args()
    root = a.work / "assets"
    assets.build(root)
    lines = ["| optimisation | workload | plain s | optimised s | speed-up |",
             "|---|---|---|---|---|"]
    for workload, label, sets in STEP_ABLATIONS:
        # interleaved runs, median of their medians: this machine's step times drift by up
        # to +-15% between processes
        runs: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(a.repeats):
            runs[False].append(step_time(root, a.work, workload, sets))
            runs[True].append(step_time(root, a.work, workload, []))
        plain, fast = statistics.median(runs[False]), statistics.median(runs[True])
        lines.append(f"| {label} | {workload} step | {plain:.4f} | {fast:.4f} | "
                     f"{plain / fast:.2f}x |")
        print(lines[-1], flush=True)
    for label, plain, fast in generation_rows(root):
        lines.append(f"| lean generation | {label} | {plain:.4f} | {fast:.4f} | "
                     f"{plain / fast:.2f}x |")
        print(lines[-1], flush=True)
    for label, plain, fast in packing_rows(root):
        lines.append(f"| padding-free | {label} | {plain:.4f} | {fast:.4f} | "
                     f"{plain / fast:.2f}x |")
        print(lines[-1], flush=True)
    for label, plain, fast in adamw_rows(root):
        lines.append(f"| fused AdamW | {label} | {plain:.4f} | {fast:.4f} | "
                     f"{plain / fast:.2f}x |")
        print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / f"{time.strftime('%Y-%m-%d')}-ablations.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
