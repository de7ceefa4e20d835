"""The workloads both libraries run, their FLOP counts, and the timing/reporting shared by the
two workers (`bench_posttrain.py`, `bench_trl.py`). Imports nothing of either library.

FLOPs per optimiser step use N = non-embedding parameters (see `assets.non_embedding_params`):
6·N per trained token, 2·N per token of a forward-only pass (reference, reward model, old
values) and per generated token (with a KV cache; the prompt's prefill is 2·N per prompt
token). This is the work the algorithm needs, the same number for both libraries; work a
library does beyond it (a recomputed π_old pass, say) shows up as a lower fraction of peak.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
from dataclasses import dataclass

from assets import COMPLETION_TOKENS, PROMPT_TOKENS

SEQ = PROMPT_TOKENS + COMPLETION_TOKENS + 1  # 48 tokens: prompt, completion, EOS
NEW_TOKENS = 32


@dataclass(frozen=True)
class Workload:
    name: str
    batch: int  # records (SFT), pairs (RM, DPO), prompts (GRPO/PPO)
    samples: int = 1  # responses per prompt (GRPO/PPO)
    beta: float = 0.0  # KL coefficient (GRPO)

    def flops(self, n: int) -> float:
        """FLOPs of one optimiser step for a model with N = n."""
        tokens = self.batch * SEQ
        if self.name == "sft":
            return 6 * n * tokens
        if self.name == "rm":
            return 6 * n * 2 * tokens
        if self.name == "dpo":  # policy trained on chosen+rejected, reference forward
            return (6 + 2) * n * 2 * tokens
        rollouts = self.batch * self.samples
        gen = 2 * n * (self.batch * PROMPT_TOKENS + rollouts * NEW_TOKENS)
        seq_tokens = rollouts * (PROMPT_TOKENS + NEW_TOKENS)
        if self.name == "grpo":
            ref = 2 * n * seq_tokens if self.beta else 0
            return gen + ref + 6 * n * seq_tokens
        if self.name == "ppo":  # + reference, reward model, old values; policy and critic
            return gen + 3 * 2 * n * seq_tokens + 2 * 6 * n * seq_tokens
        raise ValueError(self.name)

    @property
    def generated_per_step(self) -> int:
        return self.batch * self.samples * NEW_TOKENS if self.name in ("grpo", "ppo") else 0


WORKLOADS = {
    "sft": Workload("sft", batch=8),
    "rm": Workload("rm", batch=8),
    "dpo": Workload("dpo", batch=8),
    "grpo": Workload("grpo", batch=2, samples=8, beta=0.0),
    "grpo_kl": Workload("grpo", batch=2, samples=8, beta=0.04),
    "ppo": Workload("ppo", batch=16, samples=1),
}
LR = 1e-5
WARMUP = 5


def worker_args():
    """The arguments both workers take (their own extras are added by the caller)."""
    import argparse
    from pathlib import Path

    ap = argparse.ArgumentParser()
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--workload", required=True, choices=sorted(WORKLOADS))
    ap.add_argument("--size", default="small")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--checkpointing", default="off", choices=["off", "on"],
                    help="gradient (activation) checkpointing of the trained models")
    return ap


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class GenerationTimer:
    """Wraps a generate function to add up the seconds spent in it and the tokens it made
    (`count(result)` tells how many), read and reset once per optimiser step."""

    def __init__(self, count) -> None:
        self.count = count
        self.seconds = 0.0
        self.tokens = 0

    def wrap(self, fn):
        import functools
        import time

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self.seconds += time.perf_counter() - t0
            self.tokens += self.count(out, args, kwargs)
            return out

        return timed

    def take(self) -> tuple[float, int]:
        out = (self.seconds, self.tokens)
        self.seconds, self.tokens = 0.0, 0
        return out


def summarise(step_seconds: list[float], gen: list[tuple[float, int]] | None = None,
              losses: list[float] | None = None, note: str = "") -> dict:
    """Median over the steps after the warm-up ones; generated tokens per second of
    generation time over the same steps."""
    timed = step_seconds[WARMUP:]
    out = {"steps": len(step_seconds), "median_s": statistics.median(timed),
           "min_s": min(timed), "peak_rss_mb": peak_rss_mb(), "losses": losses or []}
    if gen:
        seconds = sum(s for s, _ in gen[WARMUP:])
        tokens = sum(n for _, n in gen[WARMUP:])
        out["gen_tokens_per_s"] = tokens / seconds if seconds else None
        out["gen_s_per_step"] = seconds / len(timed)
    if note:
        out["note"] = note
    return out


def emit(result: dict) -> None:
    """The worker's one line of output the driver reads."""
    sys.stdout.write("BENCH_RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()
