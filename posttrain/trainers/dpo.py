"""Direct preference optimisation and its family (ALGORITHMS.md section 6)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from posttrain.algos import DPO_VARIANTS, dpo_loss, masked_sum
from posttrain.config import doc
from posttrain.data.collate import (
    TokenizedPair,
    apply_chat_template_option,
    collate_pairs,
    tokenize_preferences,
)
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
from posttrain.trainers.reward import pair_length


@dataclass(frozen=True)
class DPOLossConfig:
    variant: str = doc(
        "A DPO variant (posttrain.algos.DPO_VARIANTS): sigmoid (DPO; cDPO with "
        "label_smoothing), ipo, simpo (reference-free, length-normalised; set beta to 2.0-2.5) "
        "or orpo (reference-free, NLL + odds ratio). simpo and orpo load no reference model.",
        "sigmoid")
    beta: float = doc("β: strength of the implicit KL to the reference (SimPO: the reward "
                      "scale, paper 2.0–2.5; ORPO: unused).", 0.1)
    beta_chosen: float | None = doc("β⁺ for the chosen response (asymmetric β).", None)
    beta_rejected: float | None = doc("β⁻ for the rejected response (asymmetric β).", None)
    label_smoothing: float = doc("ε of conservative DPO (cDPO), in [0, 0.5).", 0.0)
    reference_free: bool = doc("Drop the reference model from the loss.", False)
    dpop_lambda: float = doc("λ_p of DPO-P: penalise lowering the chosen log-prob.", 0.0)
    sft_alpha: float = doc("α of DPO+SFT: add α·NLL(chosen), token mean (0.1–0.5).", 0.0)
    simpo_gamma: float = doc("γ of SimPO: the target reward margin (TRL's simpo_gamma; the "
                             "paper uses γ/β ≈ 0.5).", 0.5)
    orpo_lambda: float = doc("λ of ORPO: weight of the odds-ratio term next to the NLL of the "
                             "chosen response (paper: 0.1).", 0.1)
    reference: str | None = doc("Reference model path (default: model.path; with LoRA the "
                                "base model with adapters off).", None)
    precompute_reference: bool = doc("Compute reference log-probs once for the whole data set "
                                     "before training (the reference is frozen).", True)

    def __post_init__(self) -> None:
        # an unknown name is a ConfigError that lists the known ones
        needs_reference = DPO_VARIANTS.attr(self.variant, "needs_reference")
        if self.dpop_lambda and not needs_reference:
            raise ConfigError(f"dpop_lambda (DPO-P) needs a reference model; variant "
                              f"{self.variant!r} has none")
        if self.orpo_lambda < 0:
            raise ConfigError(f"orpo_lambda must be >= 0, got {self.orpo_lambda}")

    @property
    def uses_reference(self) -> bool:
        """Whether the loss compares with a reference model (so one is loaded)."""
        return DPO_VARIANTS.attr(self.variant, "needs_reference") and not self.reference_free


@dataclass(frozen=True)
class PolicyEvalConfig:
    reward: dict[str, Any] | None = doc(
        "A reward spec (as in `posttrain rl`'s reward.terms) to score sampled responses to the "
        "held-out prompts at each evaluation, logged as eval/reward (null: off).", None)
    reward_base_dir: str | None = doc("Directory relative reward paths are resolved against.",
                                      None)
    prompts: int = doc("Held-out prompts answered.", 64)
    samples_per_prompt: int = doc("Responses per prompt (sampled with a fixed seed).", 4)
    max_new_tokens: int = doc("Response length limit.", 16)
    temperature: float = doc("Sampling temperature (0: greedy).", 1.0)


@dataclass(frozen=True)
class DPOConfig:
    model: ModelConfig = doc("The policy to train, usually the SFT model.")
    data: DataConfig = doc("prompt+chosen+rejected records.")
    optim: OptimConfig = doc("Optimiser (the lr suits a full fine-tune of a real model, as TRL's; "
                             "LoRA wants "
                             "10-100x more).", default_factory=lambda: OptimConfig(lr=1e-6))
    run: RunConfig = doc("The loop.", default_factory=lambda: RunConfig(name="dpo"))
    dpo: DPOLossConfig = doc("The loss.", default_factory=DPOLossConfig)
    eval: PolicyEvalConfig = doc("Held-out evaluation of sampled responses.",
                                 default_factory=PolicyEvalConfig)


class DPOTrainer(Trainer):
    kind = "dpo"

    def __init__(self, config: DPOConfig) -> None:
        super().__init__(config, config.run, config.optim)
        m, d = config.model, config.dpo
        self.tokenizer = load_tokenizer(m.tokenizer_path, m.trust_remote_code)
        self.tokenizer = apply_chat_template_option(self.tokenizer, config.model.chat_template)
        self.model = load_causal_lm(m.path, m.dtype, self.device, m.trust_remote_code, m.lora)
        self.reference = None
        if d.uses_reference:
            self.reference = reference_model(m, self.model, d.reference, self.device)
        train, held = load_train_eval(config.data, "preference", config.run.seed)
        pairs, held_pairs = tokenize_train_eval(tokenize_preferences, train, held,
                                                self.tokenizer, config.data, self.model)
        # Items carry their index so precomputed reference log-probs can be looked up.
        self.train_items = list(enumerate(pairs))
        self.eval_items = list(enumerate(held_pairs))
        self.eval_prompts = held[: config.eval.prompts]
        self.eval_reward = None
        if config.eval.reward is not None:
            from posttrain.rewards.build import build_rewards

            self.eval_reward = build_rewards([config.eval.reward], config.eval.reward_base_dir)
        self.ref_cache: dict[str, Tensor] = {}
        if self.reference is not None and d.precompute_reference:
            self.ref_cache["train"] = self.reference_logps(self.train_items)
            self.ref_cache["eval"] = self.reference_logps(self.eval_items)

    def item_length(self, item: tuple[int, TokenizedPair]) -> int:
        return pair_length(item[1])

    def step_totals(self, items) -> dict[str, int]:
        return {"pairs": len(items)}

    def pair_logps(self, model, pairs: Sequence[TokenizedPair]) -> tuple[Tensor, Tensor, Tensor]:
        """Sequence log-probs (2B,) of chosen then rejected, in one forward pass, and the
        per-row token counts."""
        b = collate_pairs(pairs, self.tokenizer.pad_token_id)
        logp, mask = sequence_logprobs(model, b["input_ids"].to(self.device),
                                       b["attention_mask"].to(self.device),
                                       b["loss_mask"].to(self.device),
                                       packed=self.run.padding_free)
        return masked_sum(logp, mask, dim=1), mask.sum(1), logp

    @torch.no_grad()
    def reference_logps(self, items) -> Tensor:
        """(N, 2) reference log-probs of [chosen, rejected] for every item, by index."""
        out = torch.zeros(len(items), 2, dtype=torch.float32, device=self.device)
        for chunk in self.micro_batches(items):
            with self.autocast():
                seq, _, _ = self.pair_logps(self.reference, [p for _, p in chunk])
            ids = torch.tensor([i for i, _ in chunk], device=self.device)
            out[ids, 0], out[ids, 1] = seq[: len(chunk)].float(), seq[len(chunk):].float()
        return out

    def _losses(self, items, split: str):
        d = self.config.dpo
        pairs = [p for _, p in items]
        n = len(pairs)
        model = self.fwd if split == "train" and self.fwd is not None else self.model
        seq, counts, _ = self.pair_logps(model, pairs)
        chosen, rejected = seq[:n], seq[n:]
        ref_c = ref_r = None
        if self.reference is not None:
            if split in self.ref_cache:
                ids = torch.tensor([i for i, _ in items], device=self.device)
                ref = self.ref_cache[split][ids]
            else:
                with torch.no_grad():
                    r, _, _ = self.pair_logps(self.reference, pairs)
                ref = torch.stack([r[:n], r[n:]], dim=1)
            ref_c, ref_r = ref[:, 0], ref[:, 1]
        chosen_nll = -chosen / counts[:n].clamp(min=1) if d.sft_alpha else None
        return dpo_loss(chosen, rejected, ref_c, ref_r, variant=d.variant, beta=d.beta,
                        beta_chosen=d.beta_chosen, beta_rejected=d.beta_rejected,
                        label_smoothing=d.label_smoothing, reference_free=d.reference_free,
                        dpop_lambda=d.dpop_lambda, sft_alpha=d.sft_alpha, chosen_nll=chosen_nll,
                        chosen_tokens=counts[:n], rejected_tokens=counts[n:],
                        simpo_gamma=d.simpo_gamma, orpo_lambda=d.orpo_lambda)

    def micro_loss(self, items, totals):
        out = self._losses(items, "train")
        share = len(items) / totals["pairs"]
        return out.losses.sum() / totals["pairs"], {k: v * share for k, v in out.metrics.items()}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if not self.eval_items:
            return {}
        self.model.eval()
        sums: dict[str, float] = {}
        for chunk in self.micro_batches(self.eval_items):
            out = self._losses(chunk, "eval")
            sums["eval/loss"] = sums.get("eval/loss", 0.0) + float(out.losses.sum())
            for k, v in out.metrics.items():
                key = "eval/" + k.split("/")[-1]
                sums[key] = sums.get(key, 0.0) + float(v) * len(chunk)
        out = {k: v / len(self.eval_items) for k, v in sums.items()}
        if self.eval_reward is not None and self.eval_prompts:
            out.update(sampled_reward(self.model, self.tokenizer, self.eval_prompts,
                                      self.eval_reward, self.config.eval, self.run.seed))
        self.model.train()
        return out

    def parameters(self):
        params = super().parameters()
        if not params:
            raise ConfigError("the DPO policy has no trainable parameters")
        return params



@torch.no_grad()
def sampled_reward(model, tokenizer, examples, reward_fn, cfg: PolicyEvalConfig,
                   seed: int) -> dict[str, float]:
    """Mean reward of responses sampled (with a fixed seed) for held-out prompts."""
    from posttrain.evaluation import EvalSettings, generate

    exp = generate(model, tokenizer, examples, EvalSettings(
        cfg.samples_per_prompt, cfg.max_new_tokens, cfg.temperature, seed + 7919))
    scores = reward_fn.score(list(exp.prompts), list(exp.texts), **exp.meta).total
    return {"eval/reward": sum(scores) / len(scores),
            "eval/response_length": float(exp.response_lengths.float().mean())}
