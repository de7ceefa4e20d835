"""`posttrain eval`: measure a policy on held-out prompts and text.

- mean reward under each given reward function (a reward model, a rule, a gold scorer);
- win rate against a baseline policy, judged by one of those rewards (ties count half);
- perplexity on held-out text, for the policy and the baseline (the alignment tax is the
  policy's perplexity minus the baseline's);
- distinct-n diversity of the responses (unique n-grams of tokens / all n-grams);
- mean response length in tokens.
Responses are sampled with a fixed seed, so two models are compared on the same random numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from posttrain.data.collate import (
    TruncationPolicy,
    micro_batches_by_tokens,
    tokenize_prompts,
    tokenize_sft,
)
from posttrain.data.formats import Example
from posttrain.rollout.engine import LeanGenerateEngine, SamplingConfig
from posttrain.rollout.experience import Experience


@dataclass(frozen=True)
class EvalSettings:
    samples_per_prompt: int = 1
    max_new_tokens: int = 32
    temperature: float = 1.0
    seed: int = 0
    batch_tokens: int = 8192


def model_limits(model, tokenizer) -> TruncationPolicy:
    """Truncation to what `model` takes (its maximum positions), cutting a prompt's start."""
    from posttrain.models.load import max_positions

    return TruncationPolicy(max_sequence_tokens=max_positions(model, tokenizer))


def generate(model, tokenizer, prompts: Sequence[Example], settings: EvalSettings) -> Experience:
    """Responses to `prompts`; a prompt too long for the model and `max_new_tokens` keeps its
    end (a measurement should not stop on one long prompt)."""
    engine = LeanGenerateEngine(model, tokenizer.pad_token_id, tokenizer.eos_token_id,
                                decode=tokenizer.decode)
    pairs = tokenize_prompts(prompts, tokenizer, model_limits(model, tokenizer),
                             response_tokens=settings.max_new_tokens)
    columns = sorted({k for _, ex in pairs for k in ex.extra})
    sampling = SamplingConfig(samples_per_prompt=settings.samples_per_prompt,
                              max_new_tokens=settings.max_new_tokens,
                              temperature=settings.temperature, seed=settings.seed)
    return engine.generate([ids for ids, _ in pairs], sampling,
                           prompts=[ex.prompt for _, ex in pairs],
                           meta={k: [ex.extra.get(k) for _, ex in pairs] for k in columns})


def distinct_n(exp: Experience, n: int) -> float:
    """Unique n-grams of response tokens over all n-grams, across every response."""
    grams: list[tuple[int, ...]] = []
    for row, mask in zip(exp.response_ids, exp.response_mask, strict=True):
        tokens = row[mask].tolist()
        grams += [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


@torch.no_grad()
def perplexity(model, tokenizer, texts: Sequence[Example], batch_tokens: int = 8192) -> float:
    """exp(token-mean NLL) of the texts' target tokens (completions, or whole texts)."""
    from posttrain.data.collate import collate_sequences
    from posttrain.models.forward import sequence_logprobs

    items = tokenize_sft(texts, tokenizer, model_limits(model, tokenizer))
    device = next(model.parameters()).device
    total, count = 0.0, 0
    model.eval()
    for idx in micro_batches_by_tokens([len(it.input_ids) for it in items], batch_tokens):
        b = collate_sequences([items[i] for i in idx], tokenizer.pad_token_id)
        b = {k: v.to(device) for k, v in b.items()}
        logp, mask = sequence_logprobs(model, b["input_ids"], b["attention_mask"],
                                       b["loss_mask"])
        total += float(-(logp * mask).sum())
        count += int(mask.sum())
    return math.exp(total / max(count, 1))


def evaluate(model, tokenizer, prompts: Sequence[Example], rewards: Mapping[str, Any],
             settings: EvalSettings, baseline=None, judge: str | None = None,
             texts: Sequence[Example] = ()) -> dict[str, float]:
    """All the measures of the module docstring, as a flat dict."""
    out: dict[str, float] = {}
    exp = generate(model, tokenizer, prompts, settings)
    scores = {name: fn(list(exp.prompts), list(exp.texts), **exp.meta)
              for name, fn in rewards.items()}
    for name, values in scores.items():
        out[f"reward/{name}"] = sum(values) / len(values)
    out["response/length"] = float(exp.response_lengths.float().mean())
    out["diversity/distinct_1"] = distinct_n(exp, 1)
    out["diversity/distinct_2"] = distinct_n(exp, 2)
    if texts:
        out["text/perplexity"] = perplexity(model, tokenizer, texts, settings.batch_tokens)
    if baseline is not None:
        base = generate(baseline, tokenizer, prompts, settings)
        for name, fn in rewards.items():
            values = fn(list(base.prompts), list(base.texts), **base.meta)
            out[f"baseline/reward/{name}"] = sum(values) / len(values)
        judge = judge or next(iter(rewards), None)
        if judge is not None:
            mine = scores[judge]
            theirs = rewards[judge](list(base.prompts), list(base.texts), **base.meta)
            wins = [1.0 if a > b else 0.5 if a == b else 0.0
                    for a, b in zip(mine, theirs, strict=True)]
            out[f"win_rate/{judge}"] = sum(wins) / len(wins)
        if texts:
            out["baseline/text/perplexity"] = perplexity(baseline, tokenizer, texts,
                                                         settings.batch_tokens)
            out["text/alignment_tax"] = out["text/perplexity"] - out["baseline/text/perplexity"]
    return out
