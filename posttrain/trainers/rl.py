"""One RL trainer for every preset: PPO, PPO-ptx, GRPO, Dr. GRPO, DAPO, RLOO, REINFORCE++,
REINFORCE++-baseline, VC-PPO, VAPO, GSPO, CISPO and SAPO differ only in `AlgoConfig` fields.

    step = rollout -> score -> shape -> advantages -> update -> (log, checkpoint)

Every formula lives in `posttrain.algos` (the loss of a micro-batch is
`algos.objective.policy_objective`); every optimiser step goes through the accumulation
primitive (`trainers/accumulate.py`); this file only wires the phases together. Each
algorithm choice is a string looked up in its registry, so a loss or estimator that a user
registers (config key `imports:`) is chosen from YAML like a built-in one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from posttrain import algos, distributed
from posttrain.algos import (
    ADVANTAGE_ESTIMATORS,
    POLICY_LOSSES,
    compute_advantages,
    kl_estimate,
    masked_mean,
    masked_sum,
    whiten_advantages,
)
from posttrain.algos.objective import StepCounts, lm_objective, policy_objective, value_objective
from posttrain.checkpoint import load_torch
from posttrain.config import doc
from posttrain.data.collate import (
    TokenizedExample,
    TokenStats,
    TruncationPolicy,
    apply_chat_template_option,
    collate_sequences,
    micro_batches_by_tokens,
    tokenize_prompts,
    tokenize_sft,
)
from posttrain.data.formats import Example
from posttrain.data.loading import load_examples, shuffled, split_examples
from posttrain.errors import ConfigError
from posttrain.models.forward import (
    TokenValues,
    response_logprobs,
    response_values,
    sequence_logprobs,
)
from posttrain.models.load import (
    check_same_tokenizer,
    enable_gradient_checkpointing,
    load_causal_lm,
    load_critic,
    load_tokenizer,
    save_model,
    unwrap_peft,
)
from posttrain.rewards.build import build_rewards, resolve_path
from posttrain.rollout.engine import RolloutEngine, SamplingConfig, build_engine
from posttrain.rollout.environment import load_environment
from posttrain.rollout.episodes import EpisodeLimits, run_episodes
from posttrain.rollout.experience import Experience
from posttrain.rollout.vllm_engine import hf_named_weights
from posttrain.rollout.worker import (
    Request,
    RolloutWorker,
    WorkerSpec,
    result_from_state,
    result_state,
)
from posttrain.tracking.metrics import read_jsonl
from posttrain.trainers.accumulate import join_job, on_nonfinite
from posttrain.trainers.base import LoopConfig, OptimConfig, Trainer, lr_lambda
from posttrain.trainers.common import (
    DataConfig,
    ModelConfig,
    reference_model,
    report_truncation,
    tokenize_train_eval,
)

log = logging.getLogger(__name__)

Metrics = dict[str, float]


@dataclass(frozen=True)
class AlgoConfig:
    """The choices that make an algorithm (ALGORITHMS.md section 8)."""

    advantage: str = doc("Advantage estimator (a name in algos.ADVANTAGE_ESTIMATORS: gae, "
                         "grpo, dr_grpo, rloo, reinforce_pp, reinforce_pp_baseline, or one "
                         "you register).", "grpo")
    gamma: float = doc("Discount γ.", 1.0)
    lam: float = doc("GAE λ of the policy's advantages (λ_actor).", 0.95)
    critic_lam: float | None = doc("GAE λ of the critic's returns (decoupled GAE; null: = lam).",
                                   None)
    lambda_schedule: str = doc(
        "λ schedule (algos.LAMBDA_SCHEDULES): fixed λ, or VAPO's length_adaptive "
        "λ = 1 − 1/(α·|y|).", "fixed")
    length_alpha: float = doc("α of the length-adaptive λ.", 0.05)
    whiten: str = doc("Advantage whitening (algos.WHITEN_MODES): none, group, global.", "none")
    kl_placement: Literal["none", "reward", "loss"] = doc(
        "KL to the reference: off, as a token-level penalty in the reward, or a loss term.",
        "loss")
    kl_estimator: str = doc("KL estimator of the loss placement (algos.KL_ESTIMATORS: k1, k2, "
                            "k3); the reward placement uses k1.", "k3")
    kl_coef: float = doc("KL coefficient β (the start value for adaptive controllers).", 0.04)
    kl_controller: str = doc(
        "KL controller (algos.KL_CONTROLLERS): fixed β, adaptive (the proportional controller "
        "of Ziegler et al.), or ppo_adaptive (the PPO-paper rule).", "fixed")
    kl_target: float | None = doc("Target KL per sequence for adaptive controllers.", None)
    kl_horizon: float = doc("Horizon of the proportional controller.", 10000.0)
    policy_loss: str = doc(
        "Surrogate loss (algos.POLICY_LOSSES): clipped, unclipped, gspo, gspo_token, cispo, "
        "sapo, or one you register.", "clipped")
    clip_low: float = doc("ε_low of the clipped ratio (GSPO: of the sequence ratio; CISPO: of "
                          "the importance weight).", 0.2)
    clip_high: float = doc("ε_high of the clipped ratio (clip-higher: 0.28).", 0.2)
    dual_clip: float | None = doc("Dual-clip constant c for A < 0 (null: off).", None)
    tau_pos: float = doc("SAPO: temperature of the soft gate for positive advantages.", 1.0)
    tau_neg: float = doc("SAPO: temperature of the soft gate for negative advantages.", 1.05)
    aggregation: str = doc(
        "How the per-token policy loss becomes a scalar (algos.AGGREGATIONS): token-mean, "
        "seq-mean-token-mean, seq-mean-token-sum-norm. The KL-in-loss and entropy terms use it "
        "too.", "seq-mean-token-mean")
    value_aggregation: str | None = doc(
        "Aggregation of the critic's value loss, in RL and in value pretraining (null: the "
        "policy's `aggregation`).", None)
    epochs: int = doc("Update epochs over each rollout batch (K).", 1)
    mini_batches: int = doc("Optimiser steps per epoch (the batch is split in this many).", 1)
    entropy_coef: float = doc("Entropy bonus coefficient c_ent.", 0.0)
    reward_clip: float | None = doc("Clip sequence rewards to [−c, c] (null: off).", None)
    reward_whiten: bool = doc("Whiten sequence rewards over the batch (scale only).", False)
    ptx_coef: float = doc("γ_ptx: weight of the pretraining/SFT NLL (PPO-ptx).", 0.0)
    ptx_data: str | None = doc("Text or prompt+completion data for the ptx loss.", None)
    ptx_batch_size: int = doc("ptx sequences per optimiser step.", 8)
    positive_lm_coef: float = doc("μ of VAPO's NLL on correct responses.", 0.0)
    positive_threshold: float = doc("A response is correct when its reward is above this.", 0.5)
    critic_init: Literal["reward_model", "policy"] = doc(
        "Initialise the critic from the reward model or from the policy (fresh head).",
        "reward_model")
    critic_path: str | None = doc("Critic start weights (default: the reward model for "
                                  "reward_model init, else the policy).", None)
    critic_lr: float | None = doc("Critic learning rate (default: optim.lr).", None)
    value_clip: float | None = doc("ε_v of the clipped value loss (null: off).", 0.2)
    value_pretrain_steps: int = doc("Steps fitting the critic to Monte-Carlo returns with the "
                                    "policy frozen, before RL (VC-PPO/VAPO).", 0)
    value_pretrain_patience: int = doc(
        "Stop value pretraining when neither the explained variance (by 0.01) nor the value "
        "loss (by 1%) has improved for this many steps.", 10)
    recompute_old_logprobs: bool = doc(
        "Recompute π_old log-probs with a no-grad pass even on-policy (one epoch, one "
        "mini-batch). Off: the update's own forward gives them (ratio 1, as recomputing "
        "would), and the sampling pass gives their values for the KL penalty and metrics.",
        False)
    dynamic_sampling: bool = doc("DAPO: drop groups whose rewards are all equal and refill.",
                                 False)
    max_sampling_rounds: int = doc("Rollout rounds tried to fill a batch (dynamic sampling).", 4)
    overlong: Literal["none", "penalty", "mask"] = doc(
        "Responses that hit max_new_tokens: keep, soft length penalty (DAPO), or mask out (a "
        "masked response gets no loss and is left out of its group's statistics).", "none")
    overlong_cache: int = doc("L_cache of the soft overlong penalty, in tokens.", 4)
    overlong_penalty: float = doc("Penalty at and beyond the limit.", 1.0)
    is_correction: str = doc(
        "Importance correction for a sampling engine that is not the trainer (ALGORITHMS.md "
        "6c; a no-gradient weight on each token's policy loss, the clip staying around "
        "π_old): none, tis (token min(π_old/μ, C)), seq_is, icepop (masked IS), seq_mask, "
        "opsm, or any registered in IS_CORRECTIONS. auto: tis when the engine samples with "
        "other weights or code than the trainer's forward (rollout.dtype differs, vLLM), "
        "none when it is the trainer's own model (then μ = π_old and every correction is the "
        "identity).", "auto")
    is_cap: float = doc("C of tis and seq_is.", 2.0)
    is_low: float = doc("Lower bound a of icepop and seq_mask, and of mismatch/outside.", 0.5)
    is_high: float = doc("Upper bound b of icepop and seq_mask, and of mismatch/outside.", 2.0)
    opsm_delta: float = doc("δ of opsm: a negative-advantage sequence is dropped when "
                            "mean_t(log μ − log π_θ) exceeds it.", 1e-3)

    def __post_init__(self) -> None:
        for name, registry in _CHOICES.items():
            _check_choice(name, registry(), getattr(self, name))
        if self.value_aggregation is not None:
            _check_choice("value_aggregation", algos.AGGREGATIONS, self.value_aggregation)
        if self.is_correction != "auto":
            _check_choice("is_correction", algos.IS_CORRECTIONS, self.is_correction)
        if not 0 < self.is_low <= 1 <= self.is_high or self.is_cap < 1:
            raise ConfigError(f"algo.is_low, is_high and is_cap must satisfy 0 < is_low <= 1 "
                              f"<= is_high and is_cap >= 1, got {self.is_low}, "
                              f"{self.is_high}, {self.is_cap}")
        if self.value_pretrain_steps > 0 and not self.needs_critic:
            raise ConfigError(f"algo.value_pretrain_steps needs a critic, but the advantage "
                              f"estimator {self.advantage!r} uses none (use gae)")
        if self.epochs < 1 or self.mini_batches < 1:
            raise ConfigError("algo.epochs and algo.mini_batches must be >= 1")
        if self.kl_controller != "fixed" and self.kl_target is None:
            raise ConfigError(f"algo.kl_controller={self.kl_controller} needs algo.kl_target")
        if self.ptx_coef > 0 and not self.ptx_data:
            raise ConfigError("algo.ptx_coef > 0 needs algo.ptx_data (text or SFT data)")
        if self.on_policy and getattr(POLICY_LOSSES.get(self.policy_loss), "needs_off_policy",
                                      False):
            # GSPO's sequence ratio is exactly 1 on the policy that sampled: one on-policy
            # update would clip nothing and train a plain sequence-level REINFORCE (TRL #3834)
            raise ConfigError(
                f"algo.policy_loss={self.policy_loss} needs more than one update per rollout "
                "batch (its ratio is 1 on-policy): set algo.mini_batches >= 2 or "
                "algo.epochs >= 2")

    @property
    def value_loss_aggregation(self) -> str:
        return self.value_aggregation or self.aggregation

    @property
    def loss_params(self) -> dict[str, float | None]:
        """The numbers a policy loss may declare (each gets those it takes)."""
        return {"clip_low": self.clip_low, "clip_high": self.clip_high,
                "dual_clip": self.dual_clip, "tau_pos": self.tau_pos, "tau_neg": self.tau_neg}

    @property
    def is_params(self) -> dict[str, float]:
        return {"is_cap": self.is_cap, "is_low": self.is_low, "is_high": self.is_high,
                "opsm_delta": self.opsm_delta}

    @property
    def on_policy(self) -> bool:
        """One update per rollout batch: π_old is the policy being updated."""
        return self.epochs == 1 and self.mini_batches == 1

    @property
    def needs_critic(self) -> bool:
        return ADVANTAGE_ESTIMATORS.get(self.advantage).needs_values

    @property
    def needs_groups(self) -> bool:
        return ADVANTAGE_ESTIMATORS.get(self.advantage).needs_groups


# Every string choice of AlgoConfig and the registry that validates it (looked up lazily, so a
# module named in `imports:` has registered its entries before a config is built).
_CHOICES = {
    "advantage": lambda: ADVANTAGE_ESTIMATORS,
    "policy_loss": lambda: POLICY_LOSSES,
    "aggregation": lambda: algos.AGGREGATIONS,
    "whiten": lambda: algos.WHITEN_MODES,
    "kl_estimator": lambda: algos.KL_ESTIMATORS,
    "kl_controller": lambda: algos.KL_CONTROLLERS,
    "lambda_schedule": lambda: algos.LAMBDA_SCHEDULES,
}


def _check_choice(name: str, registry, value: str) -> None:
    try:
        registry.get(value)
    except ConfigError as err:
        raise ConfigError(f"{name}: {err}") from None


@dataclass(frozen=True)
class RolloutConfig:
    prompts_per_step: int = doc("Prompts per RL step (global).", 8)
    samples_per_prompt: int = doc("Responses per prompt (the group size G).", 4)
    max_new_tokens: int = doc("Response length limit.", 16)
    temperature: float = doc("Sampling temperature (also used for the log-probs).", 1.0)
    top_p: float = doc("Nucleus sampling (1: off).", 1.0)
    top_k: int = doc("Top-k sampling (0: off).", 0)
    engine: Literal["lean", "hf", "vllm"] = doc(
        "lean: our KV-cache decode loop (one prefill per prompt, finished rows dropped, "
        "log-probs from sampling); hf: transformers' generate with prompts repeated; vllm: "
        "vLLM in this process (pip install 'posttrain[vllm]'), weights pushed after each "
        "optimiser step, its log-probs μ corrected by algo.is_correction (docs/rollout.md).",
        "lean")
    compile: bool = doc(
        "Lean engine: decode with a static KV cache and a torch.compile'd forward (faster "
        "per token once compiled; the first rollout pays the compilation, and finished rows "
        "are not dropped).", False)
    seed_per_prompt: bool = doc(
        "Sample each prompt's group with a seed of its own (slower: no batching across "
        "prompts), so responses do not depend on how prompts are split over ranks.", False)
    dtype: Literal["auto", "float32", "bfloat16"] = doc(
        "Weights the engine samples with. auto: a bfloat16 copy under run.precision bf16, "
        "else the policy itself; float32 or bfloat16: a copy of that dtype (synced before "
        "each rollout), whose log-probs μ differ from the trainer's π_old: the mismatch "
        "metrics measure it and algo.is_correction corrects for it. vllm: auto is the "
        "policy's dtype.", "auto")
    vllm_max_model_len: int = doc(
        "vllm: the longest prompt + response the engine serves (0: the longest training or "
        "held-out prompt plus max_new_tokens, rounded up to 64).", 0)
    vllm_gpu_memory_utilization: float = doc(
        "vllm: share of the GPU's memory the engine may take for its weights and KV cache "
        "(the rest is the trainer's).", 0.3)
    vllm_sleep: bool = doc(
        "vllm: release the engine's GPU memory while the trainer trains (vLLM sleep mode; "
        "CUDA only, ignored on a CPU).", False)
    vllm_tensor_parallel_size: int = doc("vllm: GPUs one engine spans.", 1)
    vllm_cpu_kv_cache_gib: int = doc("vllm on a CPU: the KV cache's size in whole GiB (what "
                                     "vLLM's VLLM_CPU_KVCACHE_SPACE takes).", 1)
    server: str | None = doc(
        "vllm: sample on a rollout server (`posttrain rollout-server --model DIR`) at this "
        "URL, e.g. http://127.0.0.1:8000, instead of in this process; the weights are sent "
        "to it after each optimiser step.", None)
    async_: bool = doc(
        "Sample in a worker process of its own (key `rollout.async`) while the trainer "
        "updates, from weights at most rollout.max_staleness optimiser steps old; the update "
        "is decoupled PPO (clip around π_old recomputed by the trainer, weighted by "
        "algo.is_correction's π_old/μ). docs/rollout.md.", False)
    max_staleness: int = doc(
        "async: how many optimiser steps older than the weights it trains a batch's sampling "
        "weights may be (0: none, the synchronous run exactly; 1: the worker samples the next "
        "step's batch during this step's update).", 1)
    worker_timeout: float = doc(
        "async: seconds without a batch from the worker before the run stops with an error "
        "(a hung worker).", 600.0)
    worker_threads: int = doc(
        "async: torch threads of the worker process (0: the trainer's).", 0)
    worker_device: str = doc(
        "async: the worker's device (auto: the trainer's; e.g. cuda:1 to sample on a GPU of "
        "its own).", "auto")

    environment: str | None = doc(
        "Multi-turn episodes: the environment class that answers each turn, "
        "'package.module:Class' or 'path/file.py:Class' (posttrain.rollout.environment; "
        "docs/guide.md). max_new_tokens is then per turn.", None)
    max_turns: int = doc("environment: the policy's turns per episode at most.", 4)
    max_episode_tokens: int = doc(
        "environment: tokens after the prompt per episode at most, the policy's and the "
        "observations' (0: max_turns x max_new_tokens x 2).", 0)

    @property
    def response_tokens(self) -> int:
        """The tokens after a prompt at most: a response's, or an episode's."""
        if self.environment is None:
            return self.max_new_tokens
        return self.max_episode_tokens or self.max_turns * self.max_new_tokens * 2

    def __post_init__(self) -> None:
        if self.environment is not None:
            if self.max_turns < 1:
                raise ConfigError(f"rollout.max_turns must be >= 1, got {self.max_turns}")
            if self.max_episode_tokens < 0:
                raise ConfigError("rollout.max_episode_tokens must be >= 0 (0: max_turns x "
                                  f"max_new_tokens x 2), got {self.max_episode_tokens}")
            if self.async_:
                raise ConfigError("rollout.environment with rollout.async: episodes are "
                                  "sampled by the trainer's engine only (not built for the "
                                  "worker yet); set rollout.async false")
            if self.server:
                raise ConfigError("rollout.environment with rollout.server: not built yet; "
                                  "use a colocated engine")
        if self.async_:
            if self.server:
                raise ConfigError("rollout.async with rollout.server: a rollout server "
                                  "samples in a process of its own already; use one of them")
            if self.engine == "vllm" and self.vllm_tensor_parallel_size != 1:
                raise ConfigError("rollout.async: the worker's vLLM engine spans one device; "
                                  "set rollout.vllm_tensor_parallel_size 1")
            if self.engine == "vllm" and self.vllm_sleep:
                raise ConfigError("rollout.vllm_sleep frees the GPU between rollouts, and an "
                                  "async worker samples while the trainer trains: turn one "
                                  "of them off")
            if self.max_staleness < 0:
                raise ConfigError(f"rollout.max_staleness must be >= 0, got "
                                  f"{self.max_staleness}")
            if self.worker_timeout <= 0:
                raise ConfigError(f"rollout.worker_timeout must be > 0, got "
                                  f"{self.worker_timeout}")
        if self.compile and self.engine != "lean":
            raise ConfigError("rollout.compile needs rollout.engine=lean")
        if self.server and self.engine != "vllm":
            raise ConfigError("rollout.server needs rollout.engine=vllm")
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ConfigError("rollout.vllm_gpu_memory_utilization must be in (0, 1], got "
                              f"{self.vllm_gpu_memory_utilization}")


@dataclass(frozen=True)
class RewardConfig:
    terms: list[dict[str, Any] | str] = doc(
        "Reward terms, summed with their `weight`: a rule ({name: exact_match, column: "
        "answer}), {name: reward_model, path: DIR}, {name: x, function: 'module:fn', weight: "
        "0.5}, or just 'module:fn' / 'file.py:fn'.", default_factory=list)
    gold: dict[str, Any] | None = doc("A gold reward for evaluation only (e.g. a task's hidden "
                                      "scorer), logged as eval/gold.", None)
    on_error: Literal["raise", "score"] = doc("A reward function that fails: stop the run, or "
                                              "score the sample with error_score.", "raise")
    error_score: float = doc("Score of a failing sample with on_error=score.", 0.0)
    base_dir: str | None = doc("Directory that relative reward paths are resolved against.", None)


@dataclass(frozen=True)
class RLEvalConfig:
    prompts: int = doc("Held-out prompts answered (greedily) at each evaluation.", 64)
    kl_to_reference: bool = doc("Measure the KL to the reference even when the algorithm has "
                                "no KL term (one more forward pass per step).", True)
    samples_logged: int = doc("Sample responses written to samples.jsonl per logging step.", 4)
    samples_per_prompt: int = doc(
        "Responses sampled per held-out prompt at the rollout temperature (eval/reward_sampled:"
        " the accuracy of the stochastic policy itself; 0: greedy only).", 4)


@dataclass(frozen=True)
class RLConfig:
    model: ModelConfig = doc("The policy, usually the SFT model; also the reference.")
    data: DataConfig = doc("Prompt records (with the columns the reward needs).")
    reward: RewardConfig = doc("Reward functions.", default_factory=RewardConfig)
    algo: AlgoConfig = doc("The algorithm.", default_factory=AlgoConfig)
    rollout: RolloutConfig = doc("Sampling.", default_factory=RolloutConfig)
    optim: OptimConfig = doc("Policy optimiser (the lr suits a full fine-tune of a real model, as "
                             "TRL's GRPO; LoRA wants 10-100x more).",
                             default_factory=lambda: OptimConfig(lr=1e-6))
    run: LoopConfig = doc("The loop (run.steps counts RL steps; the batch is "
                          "rollout.prompts_per_step x rollout.samples_per_prompt).",
                          default_factory=lambda: LoopConfig(name="rl"))
    eval: RLEvalConfig = doc("Held-out evaluation.", default_factory=RLEvalConfig)
    reference: str | None = doc("Reference model (default: model.path).", None)
    preset: str | None = doc("The preset this config started from (informational).", None)
    imports: list[str] = doc(
        "Python modules (names, or .py files relative to the working directory) imported "
        "before the config is checked, so the losses, estimators and aggregations they "
        "register can be named in `algo`.", default_factory=list)

    def __post_init__(self) -> None:
        if self.algo.needs_groups and self.rollout.samples_per_prompt < 2:
            raise ConfigError(
                f"algo.advantage={self.algo.advantage} compares the samples of a prompt: it "
                f"needs rollout.samples_per_prompt >= 2, got {self.rollout.samples_per_prompt}")


class RLTrainer(Trainer):
    kind = "rl"

    def __init__(self, config: RLConfig) -> None:
        super().__init__(config, config.run, config.optim)
        m, a = config.model, config.algo
        self.algo = a
        if config.preset is None and self.dist.is_main:
            print(f"rl: no preset given; running the algo section as set (advantage "
                  f"{a.advantage}, policy_loss {a.policy_loss}, KL {a.kl_placement} "
                  f"{a.kl_coef}); --preset NAME starts from a named algorithm", flush=True)
        self.tokenizer = load_tokenizer(m.tokenizer_path, m.trust_remote_code)
        self.tokenizer = apply_chat_template_option(self.tokenizer, config.model.chat_template)
        self.model = load_causal_lm(m.path, m.dtype, self.device, m.trust_remote_code, m.lora)
        self.reference = None
        if a.kl_placement != "none" or config.eval.kl_to_reference:
            self.reference = reference_model(m, self.model, config.reference, self.device)
        self.critic = None
        if a.needs_critic:
            path, init = self._critic_source()
            check_same_tokenizer(self.tokenizer, path, "critic's start model",
                                 m.trust_remote_code)
            self.critic = load_critic(path, init, m.dtype, self.device, m.trust_remote_code)
            self.critic.config.pad_token_id = self.tokenizer.pad_token_id
        base_dir = config.reward.base_dir
        # an environment's turn rewards may be the only ones: reward.terms then adds to them
        self.reward_fn = (build_rewards(config.reward.terms, base_dir, str(self.device),
                                        config.reward.on_error, config.reward.error_score)
                          if config.reward.terms or not config.rollout.environment else None)
        self.gold_fn = (build_rewards([config.reward.gold], base_dir, str(self.device))
                        if config.reward.gold else None)
        self.kl_ctl = algos.make_kl_controller(a.kl_controller, a.kl_coef, a.kl_target,
                                               a.kl_horizon)
        self.environment = (load_environment(config.rollout.environment)
                            if config.rollout.environment else None)
        self._load_data(config)  # before the engine: vllm sizes itself by the longest prompt
        self.engine = self._build_engine(config.rollout)
        self._engine_step: int | None = None  # the step whose weights the engine has
        # μ = π_old only when the engine samples with the trainer's own model and code
        self.engine_is_trainer = (self.engine.model is self.model
                                  and config.rollout.engine in ("lean", "hf"))
        self.is_correction = (a.is_correction if a.is_correction != "auto" else
                              "none" if self.engine_is_trainer else "tis")
        # per batch: π_old is the sampler's log-probs / the correction; a stale batch (async)
        # recomputes π_old, the proximal policy, and corrects by π_old/μ (decoupled PPO)
        self._reuse_now = self.reuse_old_logprobs
        self._correction_now = self.is_correction
        self._stale_correction = a.is_correction if a.is_correction != "auto" else "tis"
        self.worker: RolloutWorker | None = None  # rollout.async: started on first use
        self._requested: dict[tuple[int, int], Request] = {}  # sent, result not yet used
        self._restored_in_flight: list = []  # batches a checkpoint kept, for the worker
        self._async_log: list[dict[str, float]] = []
        self._versions: list[int] = []  # the weights each part of this step was sampled from
        self.async_dropped = 0
        self.prompt_cursor = 0
        self.value_pretrained = a.value_pretrain_steps == 0
        self.skipped_rollouts = 0  # steps dropped for a non-finite reward, log-prob or value
        self._order: tuple[int, list[int]] | None = None
        self.positions: list[dict[str, Any]] = []  # mean advantage by token position, per step

    def _build_engine(self, r: RolloutConfig) -> RolloutEngine:
        if r.engine == "vllm" and r.async_:  # the worker's vLLM serves evaluation too
            return WorkerEngine(self)
        if r.engine == "vllm":
            return self._build_vllm_engine(r)
        return build_engine(self.model, self.tokenizer, r.engine, r.dtype, r.compile,
                            self.run.precision)

    def _build_vllm_engine(self, r: RolloutConfig) -> RolloutEngine:
        from posttrain.rollout.vllm_engine import VLLMEngine

        config = unwrap_peft(self.model).config
        tok = self.tokenizer
        if r.server:
            from posttrain.rollout.server import RemoteVLLMEngine

            return RemoteVLLMEngine(r.server, config, tok.pad_token_id, tok.eos_token_id,
                                    decode=tok.decode, device=self.device)
        options = self._vllm_options(r)
        return VLLMEngine(options.pop("config"), tok.pad_token_id, tok.eos_token_id,
                          decode=tok.decode, sleep=r.vllm_sleep,
                          tensor_parallel_size=r.vllm_tensor_parallel_size, device=self.device,
                          **options)

    def _vllm_options(self, r: RolloutConfig) -> dict[str, Any]:
        """What a vLLM engine is built with, here or in the async worker: the policy's config
        (vLLM builds the model from it), its dtype, length, seed and memory."""
        from posttrain.rollout.vllm_engine import default_max_model_len

        length = r.vllm_max_model_len or default_max_model_len(
            (len(ids) for ids, _ in [*self.train_items, *self.eval_items]), r.response_tokens)
        policy_dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")
        return {"config": unwrap_peft(self.model).config,
                "dtype": r.dtype if r.dtype != "auto" else policy_dtype,
                "max_model_len": length, "seed": self.run.seed,
                "gpu_memory_utilization": r.vllm_gpu_memory_utilization,
                "cpu_kv_cache_gib": r.vllm_cpu_kv_cache_gib}

    def _load_data(self, config: RLConfig) -> None:
        d = config.data
        train = load_examples(d.train, "prompt", d.split, d.limit)
        if d.eval:
            held = load_examples(d.eval, "prompt", d.split)
        elif d.eval_fraction > 0:  # as the other trainers: a share of the training prompts
            train, held = split_examples(train, d.eval_fraction, config.run.seed)
        else:
            held = []
        limit = d.sequence_limit(self.model, self.tokenizer)
        new = config.rollout.response_tokens
        knob = ("rollout.max_new_tokens" if config.rollout.environment is None
                else "rollout.max_episode_tokens")
        if limit is not None and new >= limit:
            source = ("data.max_sequence_tokens" if d.max_sequence_tokens is not None
                      else "the model's maximum positions")
            raise ConfigError(
                f"{knob} ({new}) leaves no room for a prompt within {limit} tokens ({source}); "
                f"lower {knob}" + ("" if config.rollout.environment is None else
                                   " (0 means max_turns x max_new_tokens x 2)"))
        # a prompt gets what the response's max_new_tokens leave of the sequence limit
        self.train_items, held_items = tokenize_train_eval(
            tokenize_prompts, train, held, self.tokenizer, d, self.model, response_tokens=new)
        self.eval_items = held_items[: config.eval.prompts]
        self.ptx_items: list[TokenizedExample] = []
        if self.algo.ptx_coef > 0:
            ptx = TruncationPolicy(on_overflow=d.on_overflow, max_sequence_tokens=limit)
            stats = TokenStats()
            self.ptx_items = tokenize_sft(load_examples(self.algo.ptx_data), self.tokenizer,
                                          ptx, stats)
            report_truncation(stats, d, ptx, "ptx data")

    def _critic_source(self) -> tuple[str, str]:
        a, cfg = self.algo, self.config
        if a.critic_path:
            return a.critic_path, a.critic_init
        if a.critic_init == "reward_model":
            rm = next((t for t in cfg.reward.terms if isinstance(t, dict)
                       and t.get("name") == "reward_model"), None)
            if rm is None:
                raise ConfigError(
                    "algo.critic_init=reward_model but no reward_model reward term is set; give "
                    "algo.critic_path, or set algo.critic_init=policy (rule rewards)")
            return resolve_path(rm["path"], cfg.reward.base_dir), "reward_model"
        return cfg.model.path, "policy"

    # ----------------------------------------------------------------- optimisers, state
    def build_optimizer(self) -> None:
        if self.run.gradient_checkpointing and self.critic is not None:
            enable_gradient_checkpointing(self.critic)  # before DDP wraps it, as the policy
        super().build_optimizer()
        pad = self.tokenizer.pad_token_id
        self.accumulators["model"].join = join_job(self.fwd, pad, self.device)
        self.critic_optimizer = None
        if self.critic is not None:
            o, a = self.optim_cfg, self.algo
            self.critic_optimizer = self.adamw(
                [p for p in self.critic.parameters() if p.requires_grad], a.critic_lr)
            # value pretraining steps the critic's schedule too: its warm-up happens there
            self.critic_scheduler = torch.optim.lr_scheduler.LambdaLR(
                self.critic_optimizer, lr_lambda(o, self.run.steps + a.value_pretrain_steps))
            self.accumulator("critic", self.critic_optimizer, self.critic_fwd,
                             join=join_job(self.critic_fwd, pad, self.device), prefix="value/")

    def prepare_parallel(self) -> None:
        if self.sharded:
            raise ConfigError("RL under run.parallel=fsdp is not supported yet (generation "
                              "would need every rank in lockstep); use run.parallel=ddp")
        super().prepare_parallel()
        if getattr(self, "critic_fwd", None) is not None:
            return
        self.critic_fwd = None
        if self.critic is not None:
            self.critic_fwd = distributed.wrap(TokenValues(self.critic), self.dist,
                                               self.run.parallel)

    def trained(self) -> dict[str, tuple[Any, Any, Any]]:
        out = super().trained()
        if self.critic is not None:
            out["critic"] = (self.critic, self.critic_optimizer, self.critic_scheduler)
        return out

    def memory_models(self) -> tuple[list[torch.nn.Module], list[torch.nn.Module]]:
        trained = [m for m in (self.model, self.critic) if m is not None]
        frozen = [m for m in (self.reference, self.engine.model)
                  if isinstance(m, torch.nn.Module) and m is not self.model]
        return trained, frozen

    def save_final(self, directory: Path, states: dict[str, Any]) -> None:
        super().save_final(directory, states)
        if self.critic is not None:
            save_model(self.critic, directory / "critic", self.tokenizer)

    def extra_state(self) -> dict[str, Any]:
        return {"kl": self.kl_ctl.state_dict(), "prompt_cursor": self.prompt_cursor,
                "value_pretrained": self.value_pretrained,
                "skipped_rollouts": self.skipped_rollouts, "async_dropped": self.async_dropped}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.kl_ctl.load_state_dict(state["kl"])
        self.prompt_cursor = state["prompt_cursor"]
        self.value_pretrained = state["value_pretrained"]
        self.skipped_rollouts = state.get("skipped_rollouts", 0)
        self.async_dropped = state.get("async_dropped", 0)

    def gather(self) -> dict[str, Any]:
        """The checkpoint's parts, and (async) the batches in flight: the worker finishes
        them, they are saved, and a resumed run trains on them as the run would have (exact
        resume, whatever max_staleness)."""
        payload = super().gather()
        if not self.config.rollout.async_:
            return payload
        mine = []
        if self.worker is not None:
            for key in sorted(self._requested):
                result = self.worker.result(*key)
                self.worker.keep(result)
                mine.append({"request": self._requested[key].state(),
                             "result": result_state(result)})
        every = [mine]
        if self.dist.enabled:
            every = [None] * self.dist.world_size
            torch.distributed.all_gather_object(every, mine)
        payload["in_flight"] = every
        return payload

    def _write_checkpoint(self, directory: Path, payload: dict[str, Any]) -> None:
        super()._write_checkpoint(directory, payload)
        if any(payload.get("in_flight", [])):
            torch.save(payload["in_flight"], directory / "in_flight.pt")

    def restore(self, directory: Path) -> None:
        super().restore(directory)
        path = directory / "in_flight.pt"
        if path.exists() and self.config.rollout.async_:
            every = load_torch(path)
            mine = every[self.dist.rank] if self.dist.rank < len(every) else []
            for item in mine:
                request = Request.from_state(item["request"])
                self._requested[(request.step, request.round)] = request
                self._restored_in_flight.append(result_from_state(item["result"]))

    @property
    def skipped_steps(self) -> int:
        return super().skipped_steps + self.skipped_rollouts

    def log_files(self) -> tuple[str, ...]:
        return (*super().log_files(), "advantage_by_position.jsonl")

    def load_logs(self) -> None:
        super().load_logs()
        self.positions = read_jsonl(self.run_dir / "advantage_by_position.jsonl")

    def monitor_series(self) -> dict[str, Any]:
        return {"positions": self.positions}

    # ----------------------------------------------------------------- the step
    progress_keys = ("reward/mean", "eval/reward", "kl/ref_seq", "perf/tokens_per_second")

    def train_step(self) -> tuple[Metrics, int]:
        if not self.value_pretrained:
            self.pretrain_values()
        exp, metrics = self.collect()                 # rollout + score (+ dynamic sampling)
        if self.drop_nonfinite(exp, "the step"):      # nothing of it reaches the update
            self.scheduler.step()                     # a skipped step still advances them
            if self.critic is not None:
                self.critic_scheduler.step()
            self.publish_weights()                    # the same weights, the next version
            return ({"train/skipped": 1.0, "kl/coef": self.kl_ctl.value,
                     "train/lr": self.scheduler.get_last_lr()[0]},
                    int(exp.response_lengths.sum()))
        exp = self.shape(exp)                         # KL-in-reward, clipping, overlong
        exp = self.advantages(exp)                    # estimator, λ schedule, whitening
        self.phase("update")
        metrics.update(self.update(exp))              # K epochs of mini-batch updates
        metrics.update(self.rollout_metrics(exp))
        metrics = self.dist.all_reduce_mean(metrics)  # every rank's share, averaged
        if hasattr(self, "_mismatch_max"):  # the step's max over micro-batches and ranks
            worst = self._mismatch_max.float().to(self.device)
            if self.dist.enabled:
                torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)
            metrics["mismatch/abs_logp_max"] = float(worst)
            del self._mismatch_max
        metrics["kl/coef"] = self.kl_ctl.value
        metrics["train/lr"] = self.scheduler.get_last_lr()[0]
        if "kl/ref_seq" in metrics:  # the controller sees the whole step's sample count
            samples = self.dist.all_reduce_sum(torch.tensor(float(len(exp)),
                                                            device=self.device))
            self.kl_ctl.update(metrics["kl/ref_seq"], int(samples))
        self.scheduler.step()
        if self.critic is not None:
            self.critic_scheduler.step()
        self.publish_weights()                        # async: the worker's next weights
        metrics.update(self.async_metrics())
        self.log_samples(exp)
        return metrics, int(exp.response_lengths.sum())  # sampled tokens, for tokens/s

    # -- rollout and score
    def next_prompts(self, n: int) -> list[tuple[list[int], Example]]:
        """The next `n` prompts of a seeded per-epoch shuffle; the cursor survives resume."""
        out = []
        total = len(self.train_items)
        for _ in range(n):
            epoch, pos = divmod(self.prompt_cursor, total)
            if self._order is None or self._order[0] != epoch:
                self._order = (epoch, shuffled(range(total), self.run.seed + epoch))
            out.append(self.train_items[self._order[1][pos]])
            self.prompt_cursor += 1
        return out

    def rollout(self, prompts: list[tuple[list[int], Example]], seed: int,
                indices: Sequence[int] | None = None) -> Experience:
        """Sample the prompts' groups; `indices` are the prompts' global positions in the
        data stream (they become the group ids, and the per-prompt seeds)."""
        return self._generate(self._request(self.step, 0, prompts, seed, indices))

    def _generate(self, request: Request) -> Experience:
        """Serve `request` with this process's engine, from the current weights."""
        self.sync_engine()
        with self.autocast():
            exp = self._engine_generate(request.prompt_ids, request.sampling, request.prompts,
                                        request.meta, request.seeds)
        return self._sampled(exp, request, self.step)

    def _engine_generate(self, prompt_ids, sampling: SamplingConfig, prompts, meta,
                         seeds=None) -> Experience:
        """Responses from the engine, or multi-turn episodes with rollout.environment."""
        if self.environment is None:
            return self.engine.generate(prompt_ids, sampling, prompts=prompts, meta=meta,
                                        seeds=seeds)
        r = self.config.rollout
        return run_episodes(self.engine, self.tokenizer, self.environment, prompt_ids,
                            sampling, EpisodeLimits(r.max_turns, r.response_tokens),
                            prompts=prompts, meta=meta, seeds=seeds).to(self.device)

    def _request(self, step: int, round_: int, prompts: list[tuple[list[int], Example]],
                 seed: int, indices: Sequence[int] | None) -> Request:
        """What the engine samples for these prompts, at step `step` (the worker's request,
        which the synchronous engine serves the same way)."""
        r = self.config.rollout
        sampling = SamplingConfig(samples_per_prompt=r.samples_per_prompt,
                                  max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                                  top_p=r.top_p, top_k=r.top_k, seed=seed,
                                  return_logprobs=True)
        indices = list(indices) if indices is not None else list(range(len(prompts)))
        seeds = [(seed * 7919 + i) % (2**31) for i in indices] if r.seed_per_prompt else None
        return Request(step, round_, [ids for ids, _ in prompts], [ex.prompt for _, ex in prompts],
                       _columns([ex for _, ex in prompts]), sampling, seeds,
                       version=max(step - r.max_staleness, 0) if r.async_ else step,
                       indices=indices)

    def _sampled(self, exp: Experience, request: Request, version: int) -> Experience:
        """A sampled batch as the trainer uses it: group ids from the prompts' positions, the
        engine's log-probs as μ (the behaviour policy), and as π_old too when the batch is
        on-policy (sampled from the weights it trains, and the preset reuses them)."""
        group = torch.as_tensor(request.indices, device=exp.group_ids.device)
        fresh = version == self.step
        self._versions.append(version)
        # π_old is otherwise the trainer's own: recomputed in `score` (the proximal policy of
        # decoupled PPO when the batch is stale), or the update's forward pass on-policy
        return exp.replace(group_ids=group.repeat_interleave(request.sampling.samples_per_prompt),
                           behavior_logp=exp.old_logp,
                           old_logp=exp.old_logp if self.reuse_old_logprobs and fresh else None)

    def rewards(self, exp: Experience) -> tuple[Tensor, Metrics]:
        """Each response's reward: the reward terms' sum, plus, for multi-turn episodes, the
        environment's turn rewards (an environment may be the only reward)."""
        total = torch.zeros(len(exp), device=self.device)
        metrics: Metrics = {}
        if exp.token_scores is not None:
            total = exp.token_scores.sum(-1).float().to(self.device)
            metrics.update(episode_metrics(exp, "episode/"))
        if self.reward_fn is not None:
            meta = {k: v for k, v in exp.meta.items() if k not in EPISODE_COLUMNS}
            result = self.reward_fn.score(list(exp.prompts), list(exp.texts),
                                          completion_ids=_completion_ids(exp), **meta)
            metrics.update({f"reward/{k}": sum(v) / len(v) for k, v in result.terms.items()})
            metrics.update({f"reward/{k}_errors": float(v)
                            for k, v in result.errors.items() if v})
            total = total + torch.tensor(result.total, dtype=torch.float32, device=self.device)
        return total, metrics

    def collect(self) -> tuple[Experience, Metrics]:
        """Rollout and score this rank's share of the step's prompts. With dynamic sampling
        (DAPO) only groups whose rewards differ are kept, and more prompts are sampled until
        `prompts_per_step` groups are kept or `max_sampling_rounds` run out; the metrics say
        how many groups the update trains on (none, when every group was all-equal: their
        advantages are 0, so there is nothing to learn from). Every rank draws the same
        global prompts and takes its share, so the data stream does not depend on the number
        of ranks."""
        r, a, dist = self.config.rollout, self.algo, self.dist
        parts: list[Experience] = []
        self._versions = []
        kept = sampled = 0
        rounds = a.max_sampling_rounds if a.dynamic_sampling else 1
        for round_ in range(rounds):
            need = r.prompts_per_step - kept
            need += -need % dist.world_size  # every rank gets at least one prompt
            exp, metrics = self._sample_round(need, round_)
            if a.dynamic_sampling:
                keep = _groups_with_variance(exp.scores, exp.group_ids)
                exp = exp.select(torch.nonzero(keep).flatten().cpu())
            parts.append(exp)
            groups = torch.tensor(float(len(exp) // r.samples_per_prompt), device=self.device)
            kept += int(dist.all_reduce_sum(groups).item())
            sampled += need
            if kept >= r.prompts_per_step:
                break
        # π_old is the sampler's only if every part was sampled from the weights it trains
        fresh = all(v == self.step for v in self._versions)
        self._reuse_now = self.reuse_old_logprobs and fresh
        self._correction_now = self.is_correction if fresh else self._stale_correction
        if not self._reuse_now:
            parts = [p.replace(old_logp=None) for p in parts]
        exp = Experience.concat(parts, self.tokenizer.pad_token_id) if len(parts) > 1 else parts[0]
        metrics["sampling/rounds"] = float(round_ + 1)
        if a.dynamic_sampling:
            metrics.update(self._sampling_report(kept, sampled))
        self.phase("score")
        return self.score(exp.to(self.device)), metrics

    def _plan(self, step: int, need: int, round_: int) -> Request:
        """The request for this rank's share of the next `need` prompts of the data stream,
        sampled for step `step` (round `round_` of its dynamic sampling)."""
        seed = (self.run.seed * 1_000_003 + step * 101 + round_) % (2**31)
        first = self.prompt_cursor
        prompts = self.next_prompts(need)
        mine = self.dist.shard(list(zip(range(first, first + need), prompts, strict=True)))
        return self._request(step, round_, [p for _, p in mine], seed, [i for i, _ in mine])

    def _sample_round(self, need: int, round_: int) -> tuple[Experience, Metrics]:
        """Sample and score this rank's share of the next `need` prompts."""
        self.phase("rollout")
        if self.config.rollout.async_ and self.value_pretrained:  # the frozen policy of
            exp = self._async_round(need, round_)                 # value pretraining: here
        else:
            exp = self._generate(self._plan(self.step, need, round_))
        self.phase("reward")
        with self.autocast():
            scores, metrics = self.rewards(exp)
        return exp.replace(scores=scores), metrics

    # -- asynchronous rollouts (rollout.async)
    def _async_round(self, need: int, round_: int) -> Experience:
        """This step's batch of round `round_` from the worker: round 0 was requested up to
        max_staleness steps ahead (the next steps' round 0 are requested now, so the worker
        samples them during this update); later rounds of dynamic sampling are requested
        when needed, from the current weights."""
        r = self.config.rollout
        worker = self._ensure_worker()
        if (self.step, round_) not in self._requested:
            self._send(self._plan(self.step, need, round_) if round_ == 0 else
                       dataclasses.replace(self._plan(self.step, need, round_),
                                           version=self.step))
        if round_ == 0:
            for ahead in range(self.step + 1, min(self.step + r.max_staleness,
                                                  self.run.steps - 1) + 1):
                if (ahead, 0) not in self._requested:
                    self._send(self._plan(ahead, need, 0))
        got = worker.result(self.step, round_)
        request = self._requested.pop((self.step, round_))
        stale = self.step - got.version
        if stale > r.max_staleness:  # never trained on (the exact versions rule it out)
            self.async_dropped += 1
            log.warning("step %d: a batch %d steps stale (rollout.max_staleness %d) dropped "
                        "and sampled again", self.step + 1, stale, r.max_staleness)
            self._send(dataclasses.replace(request, version=self.step))
            got = worker.result(self.step, round_)
            self._requested.pop((self.step, round_))
        self._async_log.append({"staleness": float(self.step - got.version),
                                "sample_seconds": got.sample_seconds,
                                "worker_idle_seconds": got.idle_seconds})
        return self._sampled(got.exp.to(self.device), request, got.version)

    def _send(self, request: Request) -> None:
        self._requested[(request.step, request.round)] = request
        self._ensure_worker().request(request)

    def _ensure_worker(self) -> RolloutWorker:
        """The rollout worker, started on first use with the current weights."""
        if self.worker is None:
            m, r = self.config.model, self.config.rollout
            device = str(self.device) if r.worker_device == "auto" else r.worker_device
            spec = WorkerSpec(m.path, m.tokenizer_path, str(m.dtype), m.trust_remote_code,
                              m.chat_template, r.engine, r.dtype, r.compile,
                              self.run.precision, device,
                              r.worker_threads or torch.get_num_threads(),
                              self._vllm_options(r) if r.engine == "vllm" else None)
            self.worker = RolloutWorker(spec, hf_named_weights(self.model), r.worker_timeout)
            self.worker.publish(hf_named_weights(self.model), self.step)
            for result in self._restored_in_flight:  # batches a checkpoint kept
                self.worker.keep(result)
            self._restored_in_flight = []
        return self.worker

    def publish_weights(self) -> None:
        """After an optimiser step: the worker may sample from the new weights (once it has
        taken the older ones the requests it has not started need)."""
        if self.worker is not None:
            self.worker.publish(hf_named_weights(self.model), self.step + 1)

    def async_metrics(self) -> Metrics:
        """The step's staleness and timings (the batches of all its rounds)."""
        if not self._async_log:
            return {}
        rows, self._async_log = self._async_log, []
        out = {f"async/{k}": sum(row[k] for row in rows) / len(rows) for k in rows[0]}
        out["async/staleness_max"] = max(row["staleness"] for row in rows)
        out["async/trainer_wait_seconds"] = self.worker.take_wait() if self.worker else 0.0
        out["async/dropped_batches"] = float(self.async_dropped)
        return out

    def close_worker(self) -> None:
        if self.worker is not None:
            self.worker.close()
            self.worker = None

    def train(self):
        try:
            return super().train()
        finally:
            self.close_worker()

    def _sampling_report(self, kept: int, sampled: int) -> Metrics:
        target = self.config.rollout.prompts_per_step
        if kept < target and self.dist.is_main:
            what = "nothing (every group's rewards were equal)" if kept == 0 else \
                f"{kept} of {target} groups"
            log.warning("step %d: dynamic sampling kept %s after %d sampled groups; the "
                        "update trains on that", self.step + 1, what, sampled)
        return {"sampling/kept_fraction": kept / sampled,  # over every round of the step
                "sampling/groups_trained": float(kept),
                "sampling/filled": min(kept / target, 1.0)}

    @property
    def reuse_old_logprobs(self) -> bool:
        return self.algo.on_policy and not self.algo.recompute_old_logprobs

    @torch.no_grad()
    def score(self, exp: Experience) -> Experience:
        """One no-grad pass each: π_old log-probs (unless on-policy, where sampling gave
        them), π_ref log-probs (if KL), values (if critic)."""
        t = self.config.rollout.temperature or 1.0
        old, ref, values = [], [], []
        packed = self.run.padding_free
        self.model.eval()
        with self.autocast():
            for idx in self._micro_indices(exp):
                ids, att = exp.input_ids[idx], exp.attention_mask[idx]
                if not self._reuse_now:
                    old.append(response_logprobs(self.model, ids, att, exp.response_len, t,
                                                 packed=packed)[0])
                if self.reference is not None:
                    ref.append(response_logprobs(self.reference, ids, att, exp.response_len,
                                                 t, packed=packed)[0])
                if self.critic is not None:
                    values.append(response_values(self.critic, ids, att, exp.response_len))
        self.model.train()
        mask = exp.response_mask

        def cat(parts: list[Tensor], wanted: bool) -> Tensor | None:
            if not wanted:
                return None
            full = torch.cat(parts).float() if parts else torch.zeros(mask.shape,
                                                                     device=mask.device)
            return torch.where(mask, full, torch.zeros_like(full))

        old_logp = cat([exp.old_logp] if self._reuse_now and len(exp) else old, True)
        return exp.replace(old_logp=old_logp, ref_logp=cat(ref, self.reference is not None),
                           values=cat(values, self.critic is not None))

    def drop_nonfinite(self, exp: Experience, dropped: str) -> bool:
        """Whether the scored batch holds a NaN or inf (a reward, a log-prob of the sampler,
        the policy or the reference, a critic value, inside the response mask) on any rank;
        then `run.on_nonfinite` stops the run or drops `dropped` (counted). Rewards from
        reward functions are checked where they are scored (`reward.on_error`); this catches
        what a model computed: its logits, its values, a reward model's score."""
        mask = exp.response_mask
        named = {"reward": exp.scores, "sampling log-prob": exp.behavior_logp,
                 # on-policy, π_old's log-probs are the sampler's: named once
                 "policy log-prob": None if self._reuse_now else exp.old_logp,
                 "reference log-prob": exp.ref_logp,
                 "critic value": exp.values}
        counts = []
        for value in named.values():
            if value is None:
                counts.append(torch.zeros((), device=self.device))
                continue
            bad = ~torch.isfinite(value.float())
            bad = bad if bad.dim() == 1 else (bad & mask).any(-1)  # per sample
            counts.append(bad.sum().float().to(self.device))
        total = torch.stack([*counts, torch.tensor(float(len(exp)), device=self.device)])
        if self.dist.enabled:
            total = self.dist.all_reduce_sum(total)
        *bad_counts, samples = total.tolist()  # one host sync; ranks decide together
        found = [f"{name}s in {int(n)} of {int(samples)} samples"
                 for name, n in zip(named, bad_counts, strict=True) if n]
        if not found:
            return False
        on_nonfinite(self.run.on_nonfinite, self.step + 1, "NaN or inf " + ", ".join(found),
                     dropped, self._checkpoint_hint)
        self.skipped_rollouts += 1
        return True

    def _micro_indices(self, exp: Experience) -> list[list[int]]:
        """Consecutive rows, as many as fit the token budget (all rows have the same width)."""
        rows = max(1, self.run.micro_batch_tokens // exp.input_ids.shape[1])
        return [list(range(s, min(s + rows, len(exp)))) for s in range(0, len(exp), rows)]

    # -- shape
    def shape(self, exp: Experience) -> Experience:
        a = self.algo
        scores = exp.scores.clone()
        mask = exp.response_mask
        if a.overlong == "penalty":
            # DAPO soft overlong punishment in tokens: L_max = max_new_tokens (an episode's
            # token limit for multi-turn episodes, which count the policy's tokens)
            l_max, cache = self.config.rollout.response_tokens, a.overlong_cache
            lengths = exp.response_lengths.float()
            over = ((lengths - (l_max - cache)) / cache).clamp(min=0.0, max=1.0)
            scores = scores - a.overlong_penalty * over
        if a.overlong == "mask":
            mask = mask & ~exp.truncated[:, None]
        if a.reward_clip is not None:
            scores = scores.clamp(-a.reward_clip, a.reward_clip)
        if a.reward_whiten:  # statistics of the whole batch, over every rank
            scores = algos.masked_whiten(scores, torch.ones_like(scores), shift_mean=False,
                                         reduce=self._reduce)
        turns = torch.zeros_like(exp.old_logp)
        if exp.token_scores is not None:
            # an episode's turn rewards stay at their turns' last tokens; what shaping changed
            # of their sum (clip, whitening, the overlong penalty) goes to the last token
            turns = torch.where(mask, exp.token_scores.to(turns.dtype), 0.0)
            scores = scores - turns.sum(-1)
        if a.kl_placement == "reward":
            kl = kl_estimate(exp.old_logp, exp.ref_logp, "k1")
            token_rewards = turns + algos.kl_penalized_rewards(scores, kl, mask,
                                                               self.kl_ctl.value)
        else:
            token_rewards = algos.add_score_at_last_token(turns, scores, mask)
        return exp.replace(response_mask=mask, token_rewards=token_rewards)

    @property
    def _reduce(self):
        return self.dist.all_reduce_sum if self.dist.enabled else None

    # -- advantages
    def advantages(self, exp: Experience) -> Experience:
        a = self.algo
        returns = None
        if len(exp):
            lam = algos.policy_lambda(a.lambda_schedule, exp.response_mask, a.lam,
                                      a.length_alpha)
            adv, returns = compute_advantages(
                a.advantage, exp.token_rewards, exp.response_mask, values=exp.values,
                group_ids=exp.group_ids, gamma=a.gamma, lam=lam, critic_lam=a.critic_lam)
        else:  # dynamic sampling kept nothing here: this rank trains on no row
            adv = torch.zeros_like(exp.token_rewards)
            returns = torch.zeros_like(adv) if self.critic is not None else None
        # global whitening uses statistics of the whole batch, over every rank
        adv = whiten_advantages(adv, exp.response_mask, a.whiten, exp.group_ids,
                                reduce=self._reduce)
        return exp.replace(advantages=adv, returns=returns)

    # -- update
    def update(self, exp: Experience) -> Metrics:
        """`algo.epochs` passes over the batch in `algo.mini_batches` shuffled mini-batches,
        one optimiser step (policy, and critic) per mini-batch; metrics are averaged."""
        a = self.algo
        sums: Metrics = {}
        count = 0
        n = len(exp)
        mini = max(1, math.ceil(n / a.mini_batches))
        gen = torch.Generator().manual_seed(self.run.seed * 7 + self.step)
        for _ in range(a.epochs):
            order = torch.randperm(n, generator=gen) if a.epochs > 1 or a.mini_batches > 1 \
                else torch.arange(n)
            for s in range(0, max(n, 1), mini):  # an empty batch still joins the all-reduce
                for k, v in self.update_minibatch(exp.select(order[s : s + mini])).items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
        return {k: v / count for k, v in sums.items()}

    def update_minibatch(self, batch: Experience) -> Metrics:
        """One optimiser step of the policy (and of the critic) on this rank's share of a
        mini-batch, each through the accumulation primitive. Counts are global, so the
        ranks' gradients sum to the mini-batch's."""
        counts = self.step_counts(batch)
        micros = [batch.select(idx) for idx in self._micro_indices(batch)] if len(batch) else []
        jobs = [functools.partial(self.policy_loss, mb, counts) for mb in micros]
        jobs += self.ptx_jobs()
        out = self.accumulators["model"].step(jobs, self.step + 1)
        if self.critic is not None:
            out.update(self.accumulators["critic"].step(
                [functools.partial(self.value_loss, mb, counts) for mb in micros],
                self.step + 1))
        return out

    def step_counts(self, batch: Experience) -> StepCounts:
        """The mini-batch's counts over every rank, in one all-reduce."""
        mask = batch.response_mask
        local = [mask.sum(), (mask.sum(-1) > 0).sum(), torch.tensor(len(batch))]
        if self.algo.positive_lm_coef > 0:
            local.append(self.positive_mask(batch).sum())
        c = self.dist.all_reduce_sum(torch.stack([x.float().to(self.device) for x in local]))
        c = c.tolist()
        return StepCounts(tokens=max(c[0], 1.0), seqs=max(c[1], 1.0), rows=max(c[2], 1.0),
                          norm_len=self.config.rollout.response_tokens,
                          positive_tokens=max(c[3], 1.0) if len(c) > 3 else 1.0)

    def positive_mask(self, batch: Experience) -> Tensor:
        return algos.positive_example_mask(batch.response_mask, batch.scores,
                                           self.algo.positive_threshold)

    def policy_loss(self, mb: Experience, counts: StepCounts) -> tuple[Tensor, dict]:
        """One micro-batch's forward pass and its share of the step's policy loss."""
        a = self.algo
        t = self.config.rollout.temperature or 1.0
        logp, entropy = response_logprobs(self.fwd, mb.input_ids, mb.attention_mask,
                                          mb.response_len, t, with_entropy=True,
                                          packed=self.run.padding_free)
        # on-policy, π_old is this very forward pass (ratio 1, gradient A·∇log π)
        old = logp.detach() if self._reuse_now else mb.old_logp
        weight, mismatch = None, {}
        if mb.behavior_logp is not None:
            mismatch = self.mismatch_metrics(old, mb.behavior_logp, mb.response_mask, counts)
            if self._correction_now != "none":
                weight = algos.correction_weights(
                    self._correction_now, old, mb.behavior_logp, mb.response_mask, logp=logp,
                    advantages=mb.advantages, params=a.is_params)
                mismatch["mismatch/weight_mean"] = algos.masked_mean(
                    weight, mb.response_mask) * self._share_of(mb.response_mask, counts)
        loss, metrics = policy_objective(
            logp, old, mb.advantages, mb.response_mask, counts, policy_loss=a.policy_loss,
            loss_params=a.loss_params, aggregation=a.aggregation,
            ref_logp=mb.ref_logp if a.kl_placement == "loss" else None,
            kl_coef=self.kl_ctl.value if a.kl_placement == "loss" else 0.0,
            kl_estimator=a.kl_estimator, entropy=entropy, entropy_coef=a.entropy_coef,
            positive_mask=self.positive_mask(mb) if a.positive_lm_coef > 0 else None,
            positive_lm_coef=a.positive_lm_coef, token_weight=weight)
        return loss, {**metrics, **mismatch}

    def mismatch_metrics(self, old: Tensor, behavior: Tensor, mask: Tensor,
                         counts: StepCounts) -> dict[str, Tensor]:
        """The engine/trainer gap on this micro-batch as its share of the step's token means
        (they add up over micro-batches); the max is kept apart (`_mismatch_max`), as a max
        does not add."""
        m = algos.mismatch_metrics(old, behavior, mask, is_low=self.algo.is_low,
                                   is_high=self.algo.is_high)
        worst = m.pop("mismatch/abs_logp_max").detach()  # a tensor: no host sync here
        self._mismatch_max = torch.maximum(getattr(self, "_mismatch_max", worst), worst)
        share = self._share_of(mask, counts)
        return {k: v * share for k, v in m.items()}

    @staticmethod
    def _share_of(mask: Tensor, counts: StepCounts) -> Tensor:
        return mask.sum() / max(float(counts.tokens), 1.0)

    def value_loss(self, mb: Experience, counts: StepCounts) -> tuple[Tensor, dict]:
        """One micro-batch's critic forward pass and its share of the step's value loss."""
        values = response_values(self.critic_fwd, mb.input_ids, mb.attention_mask,
                                 mb.response_len)
        return value_objective(values, mb.values, mb.returns, mb.response_mask, counts,
                               clip_range=self.algo.value_clip,
                               aggregation=self.algo.value_loss_aggregation)

    def ptx_jobs(self) -> list:
        """γ_ptx · token-mean NLL on the step's pretraining/SFT text (PPO-ptx): this rank's
        micro-batch jobs, normalised by the global token count."""
        a = self.algo
        if a.ptx_coef <= 0:
            return []
        total = len(self.ptx_items)
        start = (self.step * a.ptx_batch_size) % total
        items = [self.ptx_items[(start + i) % total] for i in range(a.ptx_batch_size)]
        n_tokens = float(sum(sum(it.loss_mask[1:]) for it in items))
        local = self.dist.shard(items)
        micros = [[local[i] for i in idx] for idx in micro_batches_by_tokens(
            [len(it.input_ids) for it in local], self.run.micro_batch_tokens)]
        return [functools.partial(self._ptx_loss, micro, n_tokens) for micro in micros]

    def _ptx_loss(self, micro: list[TokenizedExample], n_tokens: float) -> tuple[Tensor, dict]:
        b = collate_sequences(micro, self.tokenizer.pad_token_id)
        b = {k: v.to(self.device) for k, v in b.items()}
        logp, mask = sequence_logprobs(self.fwd, b["input_ids"], b["attention_mask"],
                                       b["loss_mask"], packed=self.run.padding_free)
        return lm_objective(logp, mask, n_tokens, self.algo.ptx_coef)

    # -- value pretraining (VC-PPO / VAPO)
    def pretrain_values(self) -> None:
        """Fit the critic to Monte-Carlo returns (λ = 1) with the policy frozen, before RL;
        stop early when neither the explained variance nor the value loss improves
        (ALGORITHMS.md section 4). Each step is one step of the critic's LR schedule."""
        a = self.algo
        self._value_log: list[dict[str, float]] = []
        for i in range(a.value_pretrain_steps):
            self.phase(f"value pretraining {i + 1}/{a.value_pretrain_steps}")
            exp = self.collect()[0]
            if self.drop_nonfinite(exp, "this value-pretraining step"):
                self.critic_scheduler.step()
                continue
            exp = self.shape(exp)
            _, returns = compute_advantages("gae", exp.token_rewards, exp.response_mask,
                                            values=exp.values, gamma=a.gamma, lam=1.0,
                                            critic_lam=1.0)
            ev, loss = self._fit_values(exp.replace(returns=returns))
            self.critic_scheduler.step()
            self._value_log.append({"pretrain_step": i + 1, "explained_variance": ev,
                                    "value_loss": loss})
            if value_plateau([(r["explained_variance"], r["value_loss"])
                              for r in self._value_log], a.value_pretrain_patience):
                break
        self.value_pretrained = True
        if self.dist.is_main and self._value_log:  # empty: every step was skipped
            last = self._value_log[-1]
            print(f"value pretraining: {len(self._value_log)} steps, explained variance "
                  f"{last['explained_variance']:.3f}, value loss {last['value_loss']:.4f}",
                  flush=True)

    def _fit_values(self, exp: Experience) -> tuple[float, float]:
        """`algo.epochs` x `algo.mini_batches` critic steps on one batch. Returns the explained
        variance of the values the batch was collected with (fresh data: a held-out measure)
        and the mean value loss of the steps."""
        a = self.algo
        n = len(exp)
        mini = max(1, math.ceil(n / a.mini_batches))
        gen = torch.Generator().manual_seed(self.run.seed * 13 + len(self._value_log))
        losses = []
        for _ in range(a.epochs):
            order = torch.randperm(n, generator=gen)
            for s in range(0, n, mini):
                batch = exp.select(order[s : s + mini])
                counts = self.step_counts(batch)
                jobs = [functools.partial(self.value_loss, batch.select(idx), counts)
                        for idx in self._micro_indices(batch)]
                out = self.accumulators["critic"].step(jobs, self.step + 1)
                losses.append(out["value/loss"])
        ev = float(algos.explained_variance(exp.values, exp.returns, exp.response_mask))
        # ranks decide to stop together
        return self.dist.all_reduce_mean({"ev": ev})["ev"], sum(losses) / len(losses)

    # -- metrics and evaluation
    def rollout_metrics(self, exp: Experience) -> Metrics:
        if not len(exp):  # nothing kept on this rank: the other ranks' numbers stand
            return {}
        mask = exp.response_mask
        out = {
            "reward/mean": float(exp.scores.mean()),
            "reward/std": float(exp.scores.std()) if len(exp) > 1 else 0.0,
            "response/length": float(exp.response_lengths.float().mean()),
            "response/truncated": float(exp.truncated.float().mean()),
            "adv/mean": float(masked_mean(exp.advantages, mask)),
        }
        scores, lengths = exp.scores, exp.response_lengths.float()
        if bool(((scores == 0) | (scores == 1)).all()):
            # A 0/1 verifiable reward: the length of right and of wrong answers apart (Dr. GRPO's
            # claim is about the wrong ones, which GRPO's per-response length norm lets grow).
            for name, pick in (("correct", scores == 1), ("wrong", scores == 0)):
                if pick.any():
                    out[f"response/length_{name}"] = float(lengths[pick].mean())
        if exp.ref_logp is not None:
            # k1 (log π/π_ref summed over the response) is the unbiased estimate the KL
            # controller reads; a batch can make it negative. k3 is never negative: the one
            # to watch (both estimate KL(π ‖ π_ref) on the sampled tokens).
            for name in ("k1", "k3"):
                kl = kl_estimate(exp.old_logp, exp.ref_logp, name)
                tail = "" if name == "k1" else "_k3"
                out[f"kl/ref_seq{tail}"] = float(masked_sum(kl, mask) / len(exp))
                out[f"kl/ref_token{tail}"] = float(masked_mean(kl, mask))
        else:
            out["kl/ref_seq"] = out["kl/ref_seq_k3"] = 0.0
        if exp.values is not None:
            out["value/explained_variance"] = float(
                algos.explained_variance(exp.values, exp.returns, mask))
        out["adv/first_token"] = self._log_positions(exp)
        return out

    def _log_positions(self, exp: Experience) -> float:
        """Mean advantage by token position (the VC-PPO value-bias signature), logged; returns
        the first position's."""
        mask = exp.response_mask
        counts = mask.sum(0).clamp(min=1)
        by_pos = (torch.where(mask, exp.advantages, 0.0).sum(0) / counts).tolist()
        record = {"step": self.step + 1, "mean_advantage": by_pos,
                  "tokens": mask.sum(0).tolist(), "critic": exp.values is not None}
        if self.dist.is_main:  # rank 0's share stands for the batch in this diagnostic
            self.positions.append(record)
            with (self.run_dir / "advantage_by_position.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")
        return by_pos[0] if by_pos else 0.0

    def log_samples(self, exp: Experience) -> None:
        k = self.config.eval.samples_logged
        if k <= 0 or (self.step + 1) % self.run.log_every or not self.dist.is_main:
            return
        rows = []
        with (self.run_dir / "samples.jsonl").open("a") as f:
            for i in range(min(k, len(exp))):
                row = {"step": self.step + 1, "prompt": exp.prompts[i],
                       "response": exp.texts[i], "reward": float(exp.scores[i])}
                if "episode" in exp.meta:  # turn by turn, with each turn's reward
                    row["turns"] = exp.meta["episode"][i]
                    row["turn_rewards"] = exp.meta["episode_stats"][i]["turn_rewards"]
                f.write(json.dumps(row) + "\n")
                rows.append(row)
        self.report_samples(self.step + 1, rows)  # a table in W&B and MLflow

    @torch.no_grad()
    def evaluate(self) -> Metrics:
        """Held-out reward (and gold reward) of greedy answers and of sampled answers."""
        if not self.eval_items:
            return {}
        r, e = self.config.rollout, self.config.eval
        out = self._eval_with(SamplingConfig(max_new_tokens=r.max_new_tokens, temperature=0), "")
        if e.samples_per_prompt > 0 and r.temperature > 0:
            # A fixed seed: every evaluation sees the same random numbers, so differences
            # between evaluations come from the policy, not from sampling noise.
            sampling = SamplingConfig(samples_per_prompt=e.samples_per_prompt,
                                      max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                                      top_p=r.top_p, top_k=r.top_k, seed=self.run.seed + 7919)
            out.update(self._eval_with(sampling, "_sampled"))
        return out

    def sync_engine(self) -> None:
        """The rollout engine samples from the current policy weights."""
        if self.engine.model is self.model or self._engine_step == self.step:
            return  # the engine is the policy, or already has this step's weights
        if getattr(self.engine, "weight_names", "module") == "hf":
            from posttrain.rollout.vllm_engine import hf_named_weights

            self.engine.update_weights(hf_named_weights(self.model))
        else:
            self.engine.update_weights(self.model.named_parameters())
        self._engine_step = self.step

    def _eval_with(self, sampling: SamplingConfig, suffix: str) -> Metrics:
        self.sync_engine()
        exp = self._engine_generate([ids for ids, _ in self.eval_items], sampling,
                                    [ex.prompt for _, ex in self.eval_items],
                                    _columns([ex for _, ex in self.eval_items]))
        prompts, texts = list(exp.prompts), list(exp.texts)
        scores, _ = self.rewards(exp)
        out = {f"eval/reward{suffix}": float(scores.mean()),
               f"eval/response_length{suffix}": float(exp.response_lengths.float().mean())}
        if exp.token_scores is not None:
            out.update(episode_metrics(exp, "eval/episode_", suffix))
        meta = {k: v for k, v in exp.meta.items() if k not in EPISODE_COLUMNS}
        if self.gold_fn is not None:
            gold = self.gold_fn.score(prompts, texts, **meta).total
            out[f"eval/gold{suffix}"] = sum(gold) / len(gold)
        return out


def value_plateau(history: Sequence[tuple[float, float]], patience: int,
                  ev_gain: float = 0.01, loss_drop: float = 0.01) -> bool:
    """True when the last `patience` steps of (explained variance, value loss) improved on
    neither: the explained variance did not rise by `ev_gain` over its best, nor the loss fall
    by the fraction `loss_drop` below its best (ALGORITHMS.md 4: stop when both plateau)."""
    best_ev, best_loss, stale = -math.inf, math.inf, 0
    for ev, loss in history:
        improved = ev > best_ev + ev_gain or loss < best_loss * (1 - loss_drop)
        best_ev, best_loss = max(best_ev, ev), min(best_loss, loss)
        stale = 0 if improved else stale + 1
    return stale >= patience


class WorkerEngine:
    """The trainer's engine when the async worker samples with vLLM: evaluation (and value
    pretraining's sampling) run on the worker too, from the weights of the trainer's current
    step, so the trainer's device holds no second vLLM engine."""

    model = None  # nothing on the trainer's device
    weight_names = "hf"

    def __init__(self, trainer: RLTrainer) -> None:
        self.trainer = trainer
        self._calls = 0

    def update_weights(self, named_tensors: Any) -> None:
        """Nothing to do: the trainer publishes its weights to the worker after every step."""

    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingConfig,
                 prompts: Sequence[Any] = (), meta: dict[str, list[Any]] | None = None,
                 seeds: Sequence[int] | None = None) -> Experience:
        trainer = self.trainer
        worker = trainer._ensure_worker()
        self._calls += 1  # a round of its own, below 0, beside the training batches'
        request = Request(trainer.step, -self._calls, [list(p) for p in prompt_ids],
                          list(prompts), dict(meta or {}), sampling,
                          list(seeds) if seeds is not None else None, version=trainer.step,
                          indices=list(range(len(prompt_ids))))
        waited = worker.wait_seconds  # async/trainer_wait_seconds counts training batches
        worker.request(request)
        exp = worker.result(request.step, request.round).exp
        worker.wait_seconds = waited
        return exp.to(trainer.device)


EPISODE_COLUMNS = ("episode", "episode_stats")  # what run_episodes adds to a batch's columns


def episode_metrics(exp: Experience, prefix: str, suffix: str = "") -> Metrics:
    """Multi-turn episodes: mean policy turns, tool calls and errors, and how many ended by
    a limit rather than by the environment."""
    stats = exp.meta["episode_stats"]
    out = {f"{prefix}{k}{suffix}": sum(s[k] for s in stats) / len(stats)
           for k in ("turns", "tool_calls", "tool_errors")}
    out[f"{prefix}truncated{suffix}"] = float(exp.truncated.float().mean())
    return out


def _columns(examples: Sequence[Example]) -> dict[str, list[Any]]:
    keys = sorted({k for ex in examples for k in ex.extra})
    return {k: [ex.extra.get(k) for ex in examples] for k in keys}


def _add(sums: dict[str, Tensor], key: str, value: Tensor) -> None:
    sums[key] = sums.get(key, 0.0) + value


def _groups_with_variance(scores: Tensor, group_ids: Tensor) -> Tensor:
    """(B,) True for samples whose group's rewards are not all equal."""
    _, inverse = torch.unique(group_ids, return_inverse=True)
    n = int(inverse.max()) + 1
    hi = torch.full((n,), -math.inf, device=scores.device).scatter_reduce(0, inverse, scores,
                                                                          "amax")
    lo = torch.full((n,), math.inf, device=scores.device).scatter_reduce(0, inverse, scores,
                                                                         "amin")
    return (hi > lo)[inverse]


def _completion_ids(exp: Experience) -> list[list[int]]:
    """Each response's token ids, its EOS included (TRL's `completion_ids` of a reward)."""
    ids, mask = exp.response_ids.tolist(), exp.response_mask.tolist()
    return [[t for t, m in zip(row, keep, strict=True) if m] for row, keep in zip(ids, mask,
                                                                                   strict=True)]
