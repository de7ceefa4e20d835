"""torch.profiler table of two posttrain optimiser steps (after four untimed ones).

    .venv/bin/python benchmarks/profile_step.py sft              # any workload of workloads.py
    .venv/bin/python benchmarks/profile_step.py ppo large fp32   # size and precision too

The profile behind "what bounds it" in docs/performance.md (e.g. SFT: aten::mm's share).
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main() -> None:
    import assets
    import bench_posttrain
    from torch.profiler import ProfilerActivity, profile

    from posttrain.trainers import base

    workload, size, precision = (sys.argv[1:] + ["sft", "small", "fp32"][len(sys.argv) - 1:])[:3]
    root = HERE / ".work" / "assets"
    assets.build(root)
    sys.argv = ["profile", "--root", str(root), "--workload", workload, "--size", size,
                "--precision", precision, "--steps", "8", "--out", str(HERE / ".work" / "profile")]
    train = base.Trainer.train

    def profiled_train(self):
        step, count = self.optimizer_step, [0]
        prof = profile(activities=[ProfilerActivity.CPU])

        def wrapped(items):
            count[0] += 1
            if count[0] == 5:
                prof.__enter__()
            out = step(items)
            if count[0] == 6:
                prof.__exit__(None, None, None)
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
            return out

        self.optimizer_step = wrapped
        return train(self)

    base.Trainer.train = profiled_train
    bench_posttrain.main()


if __name__ == "__main__":
    main()
