"""Supervised fine-tuning: next-token NLL on the completion tokens only."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from posttrain.algos import aggregate_loss, masked_sum
from posttrain.config import doc
from posttrain.data.collate import (
    TokenizedExample,
    apply_chat_template_option,
    collate_sequences,
    tokenize_sft,
)
from posttrain.models.forward import sequence_logprobs
from posttrain.models.load import load_causal_lm, load_tokenizer
from posttrain.trainers.base import OptimConfig, RunConfig, Trainer
from posttrain.trainers.common import (
    DataConfig,
    ModelConfig,
    completion_text,
    greedy_completions,
    load_train_eval,
    tokenize_train_eval,
)


@dataclass(frozen=True)
class SFTEvalConfig:
    batch_tokens: int = doc("Padded tokens per held-out forward pass.", 8192)
    generate_samples: int = doc("Held-out prompts answered greedily to measure exact match "
                                "with the reference completion (0: skip).", 64)
    max_new_tokens: int = doc("Token limit of those answers.", 32)


@dataclass(frozen=True)
class SFTConfig:
    model: ModelConfig = doc("The model to fine-tune.")
    data: DataConfig = doc("prompt+completion, messages or text records.")
    optim: OptimConfig = doc("Optimiser (the lr suits a full fine-tune of a real model, as TRL's; "
                             "LoRA wants "
                             "about 10x more).", default_factory=lambda: OptimConfig(lr=2e-5))
    run: RunConfig = doc("The loop.", default_factory=lambda: RunConfig(name="sft"))
    eval: SFTEvalConfig = doc("Held-out evaluation.", default_factory=SFTEvalConfig)


class SFTTrainer(Trainer):
    kind = "sft"
    keeps_dropout = True  # SFT trains the model as it comes, as TRL's SFTTrainer

    def __init__(self, config: SFTConfig) -> None:
        super().__init__(config, config.run, config.optim)
        self.tokenizer = load_tokenizer(config.model.tokenizer_path,
                                        config.model.trust_remote_code)
        self.tokenizer = apply_chat_template_option(self.tokenizer, config.model.chat_template)
        self.model = load_causal_lm(config.model.path, config.model.dtype, self.device,
                                    config.model.trust_remote_code, config.model.lora)
        train, held = load_train_eval(config.data, ("completion", "messages", "text"),
                                      config.run.seed)
        self.train_items, self.eval_items = tokenize_train_eval(
            tokenize_sft, train, held, self.tokenizer, config.data, self.model)
        self.eval_examples = held

    def item_length(self, item: TokenizedExample) -> int:
        return len(item.input_ids)

    def step_totals(self, items: Sequence[TokenizedExample]) -> dict[str, int]:
        # Targets are tokens 1.. of each sequence (token 0 has no prediction).
        return {"tokens": sum(sum(it.loss_mask[1:]) for it in items)}

    def _batch(self, items: Sequence[TokenizedExample]) -> dict[str, Tensor]:
        batch = collate_sequences(items, self.tokenizer.pad_token_id)
        return {k: v.to(self.device) for k, v in batch.items()}

    def micro_loss(self, items, totals):
        b = self._batch(items)
        logp, mask = sequence_logprobs(self.fwd or self.model, b["input_ids"], b["attention_mask"],
                                       b["loss_mask"], packed=self.run.padding_free)
        loss = aggregate_loss(-logp, mask, "token-mean", num_tokens=max(totals["tokens"], 1))
        return loss, {"tokens": mask.sum().float()}

    @torch.no_grad()
    def held_out_nll(self) -> float:
        """Token-mean NLL of the held-out completions."""
        self.model.eval()
        total, count = 0.0, 0
        for micro in self.micro_batches(self.eval_items, self.config.eval.batch_tokens):
            b = self._batch(micro)
            logp, mask = sequence_logprobs(self.model, b["input_ids"], b["attention_mask"],
                                           b["loss_mask"])
            total += float(masked_sum(-logp, mask))
            count += int(mask.sum())
        return total / max(count, 1)

    def evaluate(self) -> dict[str, float]:
        if not self.eval_items:
            return {}
        nll = self.held_out_nll()
        out = {"eval/nll": nll, "eval/perplexity": float(torch.exp(torch.tensor(nll)))}
        n = self.config.eval.generate_samples
        gen = [e for e in self.eval_examples if e.kind == "completion"][:n]
        if gen:
            texts = greedy_completions(self.model, self.tokenizer, gen,
                                       self.config.eval.max_new_tokens)
            hits = [t.strip() == completion_text(e.completion).strip()
                    for t, e in zip(texts, gen, strict=True)]
            out["eval/exact_match"] = sum(hits) / len(hits)
        self.model.train()
        return out
