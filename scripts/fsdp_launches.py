"""Launch 2-rank FSDP2 SFT on CPU (gloo) N times and count the ranks that abort.

    .venv/bin/python scripts/fsdp_launches.py [--launches 20] [--out /tmp/fsdp-launches]

On 2026-11-22 about 1 launch in 6 aborted a rank with "terminate called without an active
exception" (torch 2.13, gloo); on 2026-12-04 none of 105 did (docs/distributed.md). Each
launch is `torchrun --nproc_per_node 2 -m posttrain sft --task arithmetic --run.parallel fsdp
--run.steps 4`, the test suite's; a failed launch's stderr is kept in OUT/launch-N.err.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ABORT = "terminate called without an active exception"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--launches", type=int, default=20)
    parser.add_argument("--out", default="/tmp/fsdp-launches")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "POSTTRAIN_TASKS": str(out / "tasks"), "OMP_NUM_THREADS": "1"}
    aborts = failures = 0
    for i in range(1, args.launches + 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
               "posttrain", "sft", "--task", "arithmetic", "--run.parallel", "fsdp",
               "--run.steps", "4", "--run.eval_every", "0", "--eval.generate_samples", "4",
               "--run.name", f"launch-{i}", "--run.overwrite", "true", "--run.progress",
               "none", "--run.output_dir", str(out / "runs")]
        start = time.time()
        proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True)
        aborted = ABORT in proc.stderr
        aborts += aborted
        failures += proc.returncode != 0
        if proc.returncode != 0:
            (out / f"launch-{i}.err").write_text(proc.stderr)
        print(f"launch {i}: exit {proc.returncode}{' (abort)' if aborted else ''}, "
              f"{time.time() - start:.0f} s", flush=True)
    print(f"{aborts} aborts and {failures} failed launches of {args.launches}")


if __name__ == "__main__":
    main()
