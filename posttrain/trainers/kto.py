"""KTO: Kahneman-Tversky optimisation on unpaired desirable / undesirable examples
(Ethayarajh et al. 2024; ALGORITHMS.md section 6).

One optimiser step:
  1. the reference point: z = max(0, KL estimate), the mean log π(y_j|x_i) − log π_ref(y_j|x_i)
     over the step's mismatched pairs (each prompt with the previous example's completion),
     without gradient (`step_totals`);
  2. the loss of each example against z (`kto_loss`), averaged over the step (`micro_loss`).

z is computed once per optimiser step, over the whole (global) batch of the step, before its
micro-batches: the loss and its gradient therefore do not depend on the micro-batch size or
the number of ranks (each rank sees the whole step's batch in `step_totals` and computes the
same z). TRL instead estimates the KL per (per-device) batch and all-reduces its mean across
processes; with one batch per step on one device the two are the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from posttrain.algos import masked_sum
from posttrain.algos.preference import kto_loss
from posttrain.config import doc
from posttrain.data.collate import (
    TokenizedUnpaired,
    apply_chat_template_option,
    collate_unpaired,
    kl_pairs,
    tokenize_unpaired,
)
from posttrain.data.formats import distinct_prompts, unpair_preferences
from posttrain.data.loading import shuffled
from posttrain.errors import ConfigError
from posttrain.models.forward import sequence_logprobs
from posttrain.models.load import (
    load_causal_lm,
    load_tokenizer,
)
from posttrain.trainers.base import OptimConfig, RunConfig, Trainer
from posttrain.trainers.common import (
    DataConfig,
    ModelConfig,
    load_train_eval,
    reference_model,
    tokenize_train_eval,
)
from posttrain.trainers.dpo import PolicyEvalConfig, sampled_reward

Item = tuple[int, TokenizedUnpaired]
"""A training example and its index (for the precomputed reference log-probs)."""


@dataclass(frozen=True)
class KTOLossConfig:
    beta: float = doc("β: the scale of the implicit reward β·(log π − log π_ref).", 0.1)
    desirable_weight: float = doc("λ_D, the weight of desirable examples (the paper keeps "
                                  "λ_D·n_D / (λ_U·n_U) in [1, 4/3]).", 1.0)
    undesirable_weight: float = doc("λ_U, the weight of undesirable examples.", 1.0)
    reference: str | None = doc("Reference model path (default: model.path; with LoRA the "
                                "base model with adapters off).", None)
    precompute_reference: bool = doc("Compute the reference log-probs of the training "
                                     "examples once before training (the mismatched pairs of "
                                     "the KL estimate change every step and are computed "
                                     "then).", True)

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ConfigError(f"kto.beta must be > 0, got {self.beta}")
        if self.desirable_weight < 0 or self.undesirable_weight < 0:
            raise ConfigError("kto.desirable_weight and kto.undesirable_weight must be >= 0")


@dataclass(frozen=True)
class KTOConfig:
    model: ModelConfig = doc("The policy to train, usually the SFT model.")
    data: DataConfig = doc("prompt+completion+label records (label true = desirable), or "
                           "prompt+chosen+rejected pairs, which are unpaired (chosen -> true, "
                           "rejected -> false).")
    optim: OptimConfig = doc("Optimiser (the lr suits a full fine-tune of a real model, as TRL's; "
                             "LoRA wants "
                             "10-100x more).", default_factory=lambda: OptimConfig(lr=1e-6))
    run: RunConfig = doc("The loop.", default_factory=lambda: RunConfig(name="kto"))
    kto: KTOLossConfig = doc("The loss.", default_factory=KTOLossConfig)
    eval: PolicyEvalConfig = doc("Held-out evaluation of sampled responses.",
                                 default_factory=PolicyEvalConfig)


class KTOTrainer(Trainer):
    kind = "kto"

    def __init__(self, config: KTOConfig) -> None:
        super().__init__(config, config.run, config.optim)
        m, k = config.model, config.kto
        self.tokenizer = load_tokenizer(m.tokenizer_path, m.trust_remote_code)
        self.tokenizer = apply_chat_template_option(self.tokenizer, config.model.chat_template)
        self.model = load_causal_lm(m.path, m.dtype, self.device, m.trust_remote_code, m.lora)
        self.reference = reference_model(m, self.model, k.reference, self.device)
        train, held = load_train_eval(config.data, ("unpaired", "preference"), config.run.seed)
        examples, held_examples = tokenize_train_eval(
            tokenize_unpaired, unpair_preferences(train), unpair_preferences(held),
            self.tokenizer, config.data, self.model)
        # a mismatched pair (kl_pairs) must fit in the model as the examples do
        self.max_sequence_tokens = config.data.sequence_limit(self.model, self.tokenizer)
        self.train_items: list[Item] = list(enumerate(examples))
        self.eval_items: list[Item] = list(enumerate(held_examples))
        self.eval_prompts = distinct_prompts(held)[: config.eval.prompts]
        self.eval_reward = None
        if config.eval.reward is not None:
            from posttrain.rewards.build import build_rewards

            self.eval_reward = build_rewards([config.eval.reward], config.eval.reward_base_dir)
        self.ref_cache: dict[str, Tensor] = {}
        if k.precompute_reference:
            self.ref_cache["train"] = self.reference_logps(self.train_items)
            self.ref_cache["eval"] = self.reference_logps(self.eval_items)

    # ------------------------------------------------------------------ forward passes
    def item_length(self, item: Item) -> int:
        return len(item[1].prompt_ids) + len(item[1].completion_ids)

    def logps(self, model, examples: Sequence[TokenizedUnpaired]) -> Tensor:
        """(B,) sequence log-probs Σ_t log π(a_t|s_t) of the completions."""
        b = collate_unpaired(examples, self.tokenizer.pad_token_id)
        logp, mask = sequence_logprobs(model, b["input_ids"].to(self.device),
                                       b["attention_mask"].to(self.device),
                                       b["loss_mask"].to(self.device),
                                       packed=self.run.padding_free)
        return masked_sum(logp, mask, dim=1)

    @torch.no_grad()
    def reference_logps(self, items: Sequence[Item]) -> Tensor:
        """(N,) reference log-probs of every item, by index."""
        out = torch.zeros(len(items), dtype=torch.float32, device=self.device)
        for chunk in self.micro_batches(items):
            with self.autocast():
                seq = self.logps(self.reference, [ex for _, ex in chunk])
            out[torch.tensor([i for i, _ in chunk], device=self.device)] = seq.float()
        return out

    @torch.no_grad()
    def kl_estimate(self, items: Sequence[Item]) -> Tensor:
        """KTO's KL estimate over all the mismatched pairs of `items` (a 0-dim tensor):
        mean of log π(y_j|x_i) − log π_ref(y_j|x_i)."""
        mismatched = [(-1, ex) for ex in kl_pairs([ex for _, ex in items],
                                                   self.max_sequence_tokens)]
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for chunk in self.micro_batches(mismatched):
            examples = [ex for _, ex in chunk]
            with self.autocast():
                total += (self.logps(self.model, examples).float()
                          - self.logps(self.reference, examples).float()).sum()
        return total / max(len(items), 1)

    def _ref(self, items: Sequence[Item], split: str) -> Tensor:
        if split in self.ref_cache:
            return self.ref_cache[split][torch.tensor([i for i, _ in items], device=self.device)]
        with torch.no_grad():
            return self.logps(self.reference, [ex for _, ex in items]).float()

    # ------------------------------------------------------------------ the Trainer contract
    def step_totals(self, items: Sequence[Item]) -> dict:
        """The step's counts and its KL estimate (the reference point z = max(0, kl) is shared
        by every micro-batch of the step)."""
        desirable = sum(ex.desirable for _, ex in items)
        with self.autocast():
            kl = self.kl_estimate(items)
        return {"examples": len(items), "desirable": desirable,
                "undesirable": len(items) - desirable, "kl": kl}

    def _losses(self, items: Sequence[Item], split: str, kl: Tensor):
        model = self.fwd if split == "train" and self.fwd is not None else self.model
        policy = self.logps(model, [ex for _, ex in items])
        desirable = torch.tensor([ex.desirable for _, ex in items], device=self.device)
        k = self.config.kto
        return kto_loss(policy, self._ref(items, split).to(policy.dtype), desirable, kl,
                        beta=k.beta, desirable_weight=k.desirable_weight,
                        undesirable_weight=k.undesirable_weight), desirable

    def micro_loss(self, items, totals):
        out, desirable = self._losses(items, "train", totals["kl"])
        zero = torch.zeros_like(out.rewards)
        # sums over this micro-batch divided by the step's counts: they add up to step means
        metrics = {"kto/kl": totals["kl"] * len(items) / totals["examples"]}
        if totals["desirable"]:
            metrics["kto/rewards_desirable"] = (torch.where(desirable, out.rewards, zero).sum()
                                                / totals["desirable"])
        if totals["undesirable"]:
            metrics["kto/rewards_undesirable"] = (torch.where(desirable, zero, out.rewards).sum()
                                                  / totals["undesirable"])
        return out.losses.sum() / totals["examples"], metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if not self.eval_items:
            return {}
        self.model.eval()
        # in a seeded order: unpaired pairs sit side by side in the file, and the shift by one
        # would pair half of the completions with their own prompt
        kl = self.kl_estimate(shuffled(self.eval_items, self.run.seed))
        loss = good = bad = 0.0
        n_good = sum(ex.desirable for _, ex in self.eval_items)
        for chunk in self.micro_batches(self.eval_items):
            out, desirable = self._losses(chunk, "eval", kl)
            loss += float(out.losses.sum())
            good += float(out.rewards[desirable].sum())
            bad += float(out.rewards[~desirable].sum())
        n_bad = len(self.eval_items) - n_good
        result = {"eval/loss": loss / len(self.eval_items), "eval/kl": float(kl)}
        if n_good:
            result["eval/rewards_desirable"] = good / n_good
        if n_bad:
            result["eval/rewards_undesirable"] = bad / n_bad
        if n_good and n_bad:
            result["eval/margin"] = good / n_good - bad / n_bad
        if self.eval_reward is not None and self.eval_prompts:
            result.update(sampled_reward(self.model, self.tokenizer, self.eval_prompts,
                                         self.eval_reward, self.config.eval, self.run.seed))
        self.model.train()
        return result

    def parameters(self):
        params = super().parameters()
        if not params:
            raise ConfigError("the KTO policy has no trainable parameters")
        return params
