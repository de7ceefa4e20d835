"""One benchmark workload with TRL; run by `run.py` inside a TRL virtual environment.

    python bench_trl.py --root DIR --workload dpo --size small --precision fp32 --steps 15

Prints one `BENCH_RESULT {json}` line. Step times are the intervals between TRL's
`on_step_end` callbacks (the whole optimiser step: data, generation, scoring, update).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from assets import digit_reward, records
from workloads import (
    LR,
    NEW_TOKENS,
    SEQ,
    WORKLOADS,
    GenerationTimer,
    emit,
    summarise,
    worker_args,
)


def reward(prompts=None, completions=None, **_):
    return digit_reward([c if isinstance(c, str) else c[-1]["content"] for c in completions])


def _count_generated(out, args, kwargs) -> int:
    seqs = getattr(out, "sequences", out)
    ids = kwargs.get("input_ids", args[0] if args else None)
    return int(seqs.shape[0] * (seqs.shape[1] - ids.shape[1]))


def _count_vllm(outputs, args, kwargs) -> int:
    return sum(len(c.token_ids) for o in outputs for c in o.outputs)


def main() -> None:
    ap = worker_args()
    ap.add_argument("--vllm", action="store_true",
                    help="GRPO samples with TRL's vLLM in colocate mode (engines.py)")
    a = ap.parse_args()
    if a.vllm:  # colocate mode runs vLLM in this process, as one rank of a world of one
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                           ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29533"),
                           ("VLLM_ENABLE_V1_MULTIPROCESSING", "0"),
                           ("VLLM_CPU_KVCACHE_SPACE", "1")):
            os.environ.setdefault(key, value)

    import torch
    import transformers
    from datasets import Dataset
    from transformers import TrainerCallback

    torch.manual_seed(0)
    w = WORKLOADS[a.workload]
    model_dir = str(a.root / a.size)
    rm_dir = str(a.root / f"{a.size}-rm")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    timer = GenerationTimer(_count_vllm if a.vllm else _count_generated)
    if a.vllm:
        import vllm
        import vllm.model_executor.layers.utils as layer_utils

        vllm.LLM.generate = timer.wrap(vllm.LLM.generate)

        # On a CPU vLLM packs linear weights and drops them, so TRL's weight sync
        # (`load_weights`) fails ('Parameter' object has no attribute 'weight_loader'). The
        # same fix posttrain's engine applies: the CPU linears keep and read their weights.
        def read_weight(layer, remove_weight):
            layer.cpu_linear = lambda x, w, b: torch.nn.functional.linear(x, w, b)

        layer_utils.dispatch_cpu_unquantized_gemm = read_weight
    else:
        transformers.GenerationMixin.generate = timer.wrap(
            transformers.GenerationMixin.generate)

    times: list[float] = []
    gen: list[tuple[float, int]] = []
    losses: list[float] = []

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            timer.take()
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            times.append(now - self.t)
            gen.append(timer.take())
            self.t = now

        def on_log(self, args, state, control, logs=None, **kw):
            for key in ("loss", "train_loss", "loss/policy_avg"):
                if logs and key in logs and key != "train_loss":
                    losses.append(float(logs[key]))
                    break

    common = dict(output_dir=str(a.out), max_steps=a.steps, learning_rate=LR,
                  lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                  max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to="none",
                  use_cpu=True, seed=0, data_seed=0, bf16=a.precision == "bf16",
                  dataloader_num_workers=0, disable_tqdm=True, gradient_accumulation_steps=1,
                  gradient_checkpointing=a.checkpointing == "on")
    rows = records(a.root, 64)
    if w.name == "sft":
        from trl import SFTConfig, SFTTrainer

        data = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]}
                                  for r in rows])
        trainer = SFTTrainer(model=model_dir, processing_class=tokenizer, train_dataset=data,
                             args=SFTConfig(per_device_train_batch_size=w.batch, max_length=SEQ,
                                            **common), callbacks=[StepTimer()])
    elif w.name in ("rm", "dpo"):
        data = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")}
                                  for r in rows])
        if w.name == "rm":
            from trl import RewardConfig, RewardTrainer

            trainer = RewardTrainer(model=rm_dir, processing_class=tokenizer, train_dataset=data,
                                    args=RewardConfig(per_device_train_batch_size=w.batch,
                                                      max_length=SEQ, **common),
                                    callbacks=[StepTimer()])
        else:
            from trl import DPOConfig, DPOTrainer

            # a.steps steps over the first `batch` pairs: every step sees the same batch
            data = data.select(range(w.batch))
            trainer = DPOTrainer(model=model_dir, processing_class=tokenizer, train_dataset=data,
                                 args=DPOConfig(per_device_train_batch_size=w.batch, beta=0.1,
                                                loss_type="sigmoid", max_length=SEQ,
                                                num_train_epochs=a.steps, **common),
                                 callbacks=[StepTimer()])
    elif w.name == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        data = Dataset.from_list([{"prompt": r["prompt"]} for r in rows])
        cfg = GRPOConfig(per_device_train_batch_size=w.batch * w.samples,
                         num_generations=w.samples, max_completion_length=NEW_TOKENS,
                         beta=w.beta, temperature=1.0, top_p=1.0, num_iterations=1,
                         loss_type="grpo", scale_rewards="group", log_completions=False,
                         **({"use_vllm": True, "vllm_mode": "colocate",
                             "vllm_gpu_memory_utilization": 0.3} if a.vllm else {}),
                         **common)
        trainer = GRPOTrainer(model=model_dir, reward_funcs=[reward], args=cfg,
                              train_dataset=data, processing_class=tokenizer,
                              callbacks=[StepTimer()])
    elif w.name == "ppo":
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
        from trl.experimental.ppo import PPOConfig, PPOTrainer

        data = Dataset.from_list([{"input_ids": tokenizer(r["prompt"]).input_ids}
                                  for r in rows])
        cfg = PPOConfig(per_device_train_batch_size=w.batch, num_mini_batches=1,
                        num_ppo_epochs=1, response_length=NEW_TOKENS,
                        total_episodes=w.batch * a.steps, local_rollout_forward_batch_size=w.batch,
                        num_sample_generations=0, stop_token="eos", kl_coef=0.05,
                        temperature=1.0, **common)
        policy = AutoModelForCausalLM.from_pretrained(model_dir)
        ref = AutoModelForCausalLM.from_pretrained(model_dir)
        rm = AutoModelForSequenceClassification.from_pretrained(rm_dir, num_labels=1)
        value = AutoModelForSequenceClassification.from_pretrained(rm_dir, num_labels=1)
        trainer = PPOTrainer(args=cfg, processing_class=tokenizer, model=policy, ref_model=ref,
                             reward_model=rm, value_model=value, train_dataset=data,
                             callbacks=[StepTimer()])
    else:
        raise SystemExit(f"unknown workload {w.name}")
    trainer.train()
    # what TRL really did (TRL 1.12's PPO trainer, say, accepts the flag but never applies it)
    model = trainer.accelerator.unwrap_model(trainer.model)
    model = getattr(model, "policy", model)
    checkpointed = any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    emit({"lib": "trl", "version": __import__("trl").__version__,
          "gradient_checkpointing": checkpointed,
          **summarise(times, gen if w.generated_per_step else None, losses)})


if __name__ == "__main__":
    main()
