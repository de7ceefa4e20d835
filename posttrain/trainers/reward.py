"""Reward-model training: Bradley-Terry on preference pairs (InstructGPT eq. 1), with
per-pair margins and InstructGPT's reward normalisation."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from posttrain import distributed
from posttrain.algos import bradley_terry_loss
from posttrain.config import doc
from posttrain.data.collate import (
    TokenizedPair,
    apply_chat_template_option,
    collate_pairs,
    tokenize_preferences,
)
from posttrain.data.formats import distinct_prompts
from posttrain.errors import ConfigError
from posttrain.models.forward import TokenValues, sequence_scores
from posttrain.models.load import load_reward_model, load_tokenizer
from posttrain.trainers.base import OptimConfig, RunConfig, Trainer
from posttrain.trainers.common import (
    DataConfig,
    ModelConfig,
    load_train_eval,
    tokenize_train_eval,
)

NORMALIZE_MODES = ("none", "train_responses", "policy_samples")


@dataclass(frozen=True)
class RMLossConfig:
    margin: float | None = doc("Margin m in −log σ(R⁺ − R⁻ − m) for pairs without their own: "
                               "a record's `margin` column (TRL's name) takes precedence "
                               "(null: none).", None)
    normalize: str | bool = doc(
        "After training, shift scores by an offset stored in the saved model's config "
        "(`reward_offset`), which reward-model rewards subtract: none; train_responses, the "
        "mean score over the training responses (chosen and rejected); policy_samples, the "
        "mean score of responses sampled from the SFT policy (normalize_policy) for the "
        "prompts (normalize_prompts), so the SFT policy scores 0 on average, as InstructGPT "
        "does. The offset is folded into the weights where a bias can carry it (the head's, "
        "or the final LayerNorm's: GPT-2, OPT) and stored as 0, so plain transformers gives "
        "posttrain's scores; RMSNorm models (Llama, Qwen2, Mistral) keep it in "
        "reward_offset, which plain transformers does not subtract (the run says which). "
        "true/false (older configs) mean train_responses/none.", "train_responses")
    normalize_policy: str | None = doc("policy_samples: the policy to sample (default: "
                                       "model.path, the SFT model the reward model starts "
                                       "from).", None)
    normalize_prompts: str | None = doc("policy_samples: records with a `prompt` to sample "
                                        "responses for (default: the training prompts).", None)
    normalize_samples: int = doc("policy_samples: responses sampled (the prompts are cycled "
                                 "through, in a seeded order).", 256)
    normalize_max_new_tokens: int = doc("policy_samples: response length limit.", 64)
    normalize_temperature: float = doc("policy_samples: sampling temperature (1: the policy "
                                       "as RL starts from it).", 1.0)

    def __post_init__(self) -> None:
        if isinstance(self.normalize, bool):  # older configs: true / false
            object.__setattr__(self, "normalize",
                               "train_responses" if self.normalize else "none")
        if self.normalize not in NORMALIZE_MODES:
            close = difflib.get_close_matches(str(self.normalize), NORMALIZE_MODES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"rm.normalize {self.normalize!r} is not one of "
                              f"{', '.join(NORMALIZE_MODES)}{hint}")
        if self.normalize_samples < 1 or self.normalize_max_new_tokens < 1:
            raise ConfigError("rm.normalize_samples and rm.normalize_max_new_tokens must be "
                              ">= 1")
        if self.normalize_temperature < 0:
            raise ConfigError(f"rm.normalize_temperature must be >= 0, got "
                              f"{self.normalize_temperature}")


@dataclass(frozen=True)
class RMConfig:
    model: ModelConfig = doc("The starting model: usually the SFT model (a fresh scalar head "
                             "is added) or an existing reward model.")
    data: DataConfig = doc("prompt+chosen+rejected records.")
    optim: OptimConfig = doc("Optimiser (the lr suits a full fine-tune of a real model; LoRA "
                             "wants about "
                             "10x more).", default_factory=lambda: OptimConfig(lr=1e-5))
    run: RunConfig = doc("The loop.", default_factory=lambda: RunConfig(name="rm"))
    rm: RMLossConfig = doc("The loss.", default_factory=RMLossConfig)


def pair_length(pair: TokenizedPair) -> int:
    # chosen and rejected rows are padded to the longer one
    return 2 * (len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids)))


class RewardModelTrainer(Trainer):
    kind = "rm"

    def __init__(self, config: RMConfig) -> None:
        super().__init__(config, config.run, config.optim)
        self.tokenizer = load_tokenizer(config.model.tokenizer_path,
                                        config.model.trust_remote_code)
        self.tokenizer = apply_chat_template_option(self.tokenizer, config.model.chat_template)
        self.model = load_reward_model(config.model.path, config.model.dtype, self.device,
                                       config.model.trust_remote_code, config.model.lora)
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        train, held = load_train_eval(config.data, "preference", config.run.seed)
        self.train_examples = train
        self.train_items, self.eval_items = tokenize_train_eval(
            tokenize_preferences, train, held, self.tokenizer, config.data, self.model)

    def item_length(self, item: TokenizedPair) -> int:
        return pair_length(item)

    def step_totals(self, items: Sequence[TokenizedPair]) -> dict[str, int]:
        return {"pairs": len(items)}

    def prepare_parallel(self) -> None:
        if self.fwd is None:  # backbone and head as one module, so DDP syncs both
            self.fwd = distributed.wrap(TokenValues(self.model), self.dist, self.run.parallel)

    def scores(self, items: Sequence[TokenizedPair], train: bool = False
               ) -> tuple[Tensor, Tensor]:
        b = collate_pairs(items, self.tokenizer.pad_token_id)
        model = self.fwd if train and self.fwd is not None else self.model
        s = sequence_scores(model, b["input_ids"].to(self.device),
                            b["attention_mask"].to(self.device))
        return s[: len(items)], s[len(items):]

    def margins(self, items: Sequence[TokenizedPair]) -> Tensor | None:
        """(B,) margin m_i of each pair: its own (`margin` column), else rm.margin; None when
        no pair has one."""
        default = self.config.rm.margin
        if default is None and all(it.margin is None for it in items):
            return None
        return torch.tensor([it.margin if it.margin is not None else (default or 0.0)
                             for it in items], dtype=torch.float32, device=self.device)

    def micro_loss(self, items, totals):
        chosen, rejected = self.scores(items, train=True)
        margin = self.margins(items)
        if margin is not None:
            margin = margin.to(chosen.dtype)
        losses, metrics = bradley_terry_loss(chosen, rejected, margin)
        n = totals["pairs"]
        return losses.sum() / n, {"accuracy": metrics["rm/accuracy"] * len(items) / n,
                                  "margin": metrics["rm/margin"] * len(items) / n}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if not self.eval_items:
            return {}
        self.model.eval()
        chosen, rejected, items = [], [], []
        for micro in self.micro_batches(self.eval_items):
            c, r = self.scores(micro)
            chosen.append(c)
            rejected.append(r)
            items += micro
        chosen_t, rejected_t = torch.cat(chosen), torch.cat(rejected)
        margin = self.margins(items)
        losses, metrics = bradley_terry_loss(
            chosen_t, rejected_t, None if margin is None else margin.to(chosen_t.dtype))
        self.model.train()
        return {"eval/loss": float(losses.mean()), "eval/accuracy": float(metrics["rm/accuracy"]),
                "eval/margin": float(metrics["rm/margin"])}

    @torch.no_grad()
    def reward_offset(self) -> float:
        """Mean score over the training responses (chosen and rejected)."""
        self.model.eval()
        total, count = 0.0, 0
        for micro in self.micro_batches(self.train_items):
            with self.autocast():
                c, r = self.scores(micro)
            total += float(c.sum() + r.sum())
            count += 2 * len(micro)
        self.model.train()
        return total / max(count, 1)

    @torch.no_grad()
    def policy_sample_offset(self) -> float:
        """Mean score of `rm.normalize_samples` responses sampled from the SFT policy, scored
        as reward-model rewards score them (decoded text, re-encoded with the prompt)."""
        from posttrain.data.loading import load_examples, shuffled
        from posttrain.evaluation import EvalSettings, generate
        from posttrain.models.load import freeze, load_causal_lm
        from posttrain.rewards.model import RewardModelReward

        rm, m = self.config.rm, self.config.model
        path = rm.normalize_policy or m.path
        policy = freeze(load_causal_lm(path, m.dtype, self.device, m.trust_remote_code))
        tokenizer = (load_tokenizer(path, m.trust_remote_code) if rm.normalize_policy
                     else self.tokenizer)
        source = (load_examples(rm.normalize_prompts) if rm.normalize_prompts
                  else self.train_examples)
        prompts = shuffled(distinct_prompts(source), self.run.seed)
        if not prompts:
            raise ConfigError("rm.normalize policy_samples: no prompts to sample for")
        # each prompt in turn; repeated prompts get independent samples
        queue = [prompts[i % len(prompts)] for i in range(rm.normalize_samples)]
        exp = generate(policy, tokenizer, queue, EvalSettings(
            1, rm.normalize_max_new_tokens, rm.normalize_temperature, self.run.seed + 104729))
        scorer = RewardModelReward(self.model, self.tokenizer, offset=0.0)
        with self.autocast():
            scores = scorer(list(exp.prompts), list(exp.texts))
        del policy
        return sum(scores) / len(scores)

    def before_final(self) -> None:
        mode = self.config.rm.normalize
        if mode == "train_responses":
            self.model.config.reward_offset = self.reward_offset()
        elif mode == "policy_samples":
            self.model.config.reward_offset = self.policy_sample_offset()
        if mode == "none":
            return
        offset = float(self.model.config.reward_offset)
        where = self.fold_offset(offset)
        if where is not None:  # plain transformers now scores as posttrain does
            self.model.config.reward_offset = 0.0
        if self.dist.is_main:
            print(f"reward offset ({mode}): {offset:.4f}, " + (
                f"folded into {where}, so transformers gives the same scores" if where else
                "kept as config.json's reward_offset (this architecture has no bias to carry "
                "it): posttrain subtracts it, plain transformers does not"), flush=True)

    @torch.no_grad()
    def fold_offset(self, offset: float) -> str | None:
        """Subtract `offset` from every score in the weights (`fold_score_offset`), checked on
        a few training pairs; None when the architecture cannot carry it."""
        from posttrain.models.load import fold_score_offset

        probe_items = self.train_items[:4]
        if not probe_items:
            return None
        self.model.eval()
        try:
            return fold_score_offset(self.model, offset,
                                     lambda: torch.cat(self.scores(probe_items)).float())
        finally:
            self.model.train()
