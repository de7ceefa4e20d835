"""Reward-model training: Bradley-Terry on preference pairs (InstructGPT eq. 1)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from posttrain import distributed
from posttrain.algos import bradley_terry_loss
from posttrain.config import doc
from posttrain.data.collate import TokenizedPair, TokenStats, collate_pairs, tokenize_preferences
from posttrain.models.forward import TokenValues, sequence_scores
from posttrain.models.load import load_reward_model, load_tokenizer
from posttrain.trainers.base import OptimConfig, RunConfig, Trainer
from posttrain.trainers.common import DataConfig, ModelConfig, load_train_eval, report_truncation


@dataclass(frozen=True)
class RMLossConfig:
    margin: float | None = doc("Margin m in −log σ(R⁺ − R⁻ − m) (null: none).", None)
    normalize: bool = doc("After training, shift scores so the mean score over the training "
                          "responses (chosen and rejected) is 0, as InstructGPT does; the "
                          "offset is stored in the saved model's config (`reward_offset`).",
                          True)


@dataclass(frozen=True)
class RMConfig:
    model: ModelConfig = doc("The starting model: usually the SFT model (a fresh scalar head "
                             "is added) or an existing reward model.")
    data: DataConfig = doc("prompt+chosen+rejected records.")
    optim: OptimConfig = doc("Optimiser.", default_factory=lambda: OptimConfig(lr=1e-4))
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
        self.model = load_reward_model(config.model.path, config.model.dtype, self.device,
                                       config.model.trust_remote_code, config.model.lora)
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        train, held = load_train_eval(config.data, "preference", config.run.seed)
        stats = TokenStats()
        self.train_items = tokenize_preferences(train, self.tokenizer, config.data.truncation,
                                                stats)
        report_truncation(stats, config.data)
        self.eval_items = tokenize_preferences(held, self.tokenizer, config.data.truncation)

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

    def micro_loss(self, items, totals):
        chosen, rejected = self.scores(items, train=True)
        losses, metrics = bradley_terry_loss(chosen, rejected, self.config.rm.margin)
        n = totals["pairs"]
        return losses.sum() / n, {"accuracy": metrics["rm/accuracy"] * len(items) / n,
                                  "margin": metrics["rm/margin"] * len(items) / n}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if not self.eval_items:
            return {}
        self.model.eval()
        chosen, rejected = [], []
        for micro in self.micro_batches(self.eval_items):
            c, r = self.scores(micro)
            chosen.append(c)
            rejected.append(r)
        losses, metrics = bradley_terry_loss(torch.cat(chosen), torch.cat(rejected),
                                             self.config.rm.margin)
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

    def before_final(self) -> None:
        if self.config.rm.normalize:
            self.model.config.reward_offset = self.reward_offset()
