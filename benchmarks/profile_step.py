"""torch.profiler table of two posttrain optimiser steps (after four untimed ones).

    .venv/bin/python benchmarks/profile_step.py sft              # any workload of workloads.py
    .venv/bin/python benchmarks/profile_step.py ppo large fp32   # size and precision too
    .venv/bin/python benchmarks/profile_step.py generate         # the lean engine alone, by shape

The profile behind "what bounds it" in docs/performance.md (e.g. SFT: aten::mm's share).
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def profile_generation(root: Path, size: str) -> None:
    """One `LeanGenerateEngine.generate` of the GRPO workload's shape (2 prompts x 8 samples,
    16-token prompts, 32 new tokens, an EOS that never comes), ops grouped by input shape."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from posttrain.models.load import load_causal_lm
    from posttrain.rollout.engine import LeanGenerateEngine, SamplingConfig

    model = load_causal_lm(root / size)
    engine = LeanGenerateEngine(model, pad_id=0, eos_id=model.config.vocab_size)
    prompts = torch.randint(2, 500, (2, 16), generator=torch.Generator().manual_seed(0)).tolist()
    sampling = SamplingConfig(samples_per_prompt=8, max_new_tokens=32, seed=0,
                              return_logprobs=True)
    for _ in range(3):
        engine.generate(prompts, sampling)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        engine.generate(prompts, sampling)
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total",
                                                             row_limit=15))


def main() -> None:
    import assets
    import bench_posttrain
    from torch.profiler import ProfilerActivity, profile

    from posttrain.trainers import base

    given = sys.argv[1:4]
    workload, size, precision = given + ["sft", "small", "fp32"][len(given):]
    root = HERE / ".work" / "assets"
    assets.build(root)
    if workload == "generate":
        profile_generation(root, size)
        return
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
