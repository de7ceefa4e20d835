"""Rewards from a reward model: R(x, y) read, as `transformers` reads it, at the last real
token of prompt + response that is not the pad token, minus the model's `reward_offset`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from posttrain.data.collate import encode_within, pad
from posttrain.models.forward import sequence_scores
from posttrain.models.load import max_positions


class RewardModelReward:
    """A reward function (the library's contract) that scores with a reward model.

    Prompt and response are tokenised exactly as the reward-model trainer tokenised them
    (`encode_prompt_completion`: the response ends with EOS; a conversational prompt gets the
    chat template and the response becomes the assistant's turn), and truncated, prompt start
    first, to the reward model's maximum positions.

    Args:
        model: an `AutoModelForSequenceClassification` with one label (`load_reward_model`).
        tokenizer: its tokenizer.
        batch_size: sequences per forward pass.
        offset: subtracted from every score (reward normalisation: the mean score over a
            reference set, so that its mean reward is 0, as in InstructGPT). Default: the
            `reward_offset` in the model's config, else 0. The reward-model trainer folds the
            offset into the weights where a bias can carry it (GPT-2, OPT: stored 0, so plain
            `transformers` gives these scores); RMSNorm models (Llama, Qwen2, Mistral) keep
            it there, and plain `transformers` scores them `reward_offset` higher.
    """

    def __init__(self, model: nn.Module, tokenizer, batch_size: int = 32,
                 offset: float | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        if offset is None:
            offset = float(getattr(model.config, "reward_offset", 0.0) or 0.0)
        self.offset = offset
        self.max_tokens = max_positions(model, tokenizer)
        self.__name__ = "reward_model"

    def encode(self, prompts: Sequence[Any], responses: Sequence[str]) -> list[list[int]]:
        out = []
        for prompt, response in zip(prompts, responses, strict=True):
            completion = ([{"role": "assistant", "content": response}]
                          if isinstance(prompt, list) else response)
            p, c = encode_within(prompt, completion, self.tokenizer, self.max_tokens)
            out.append(p + c)
        return out

    @torch.no_grad()
    def score_ids(self, seqs: Sequence[Sequence[int]]) -> torch.Tensor:
        """(B,) scores of token sequences (each the full prompt + response)."""
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        try:
            scores = []
            for s in range(0, len(seqs), self.batch_size):
                chunk = seqs[s : s + self.batch_size]
                ids = pad(chunk, self.tokenizer.pad_token_id).to(device)
                mask = pad([[1] * len(c) for c in chunk], 0).bool().to(device)
                scores.append(sequence_scores(self.model, ids, mask).float().cpu())
        finally:
            self.model.train(was_training)
        return torch.cat(scores) - self.offset

    def __call__(self, prompts: Sequence[Any], responses: Sequence[str],
                 **columns: Any) -> list[float]:
        return self.score_ids(self.encode(prompts, responses)).tolist()
