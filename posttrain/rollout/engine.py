"""Rollout engines: the protocol, and the `transformers` generate engine.

An engine turns token prompts into an `Experience` with responses; the trainer adds
everything else. Another engine (vLLM, say) only has to implement the same two methods.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from posttrain.algos import token_logprobs
from posttrain.data.collate import pad
from posttrain.errors import ConfigError
from posttrain.rollout.experience import Experience


@dataclass(frozen=True)
class SamplingConfig:
    """How responses are sampled.

    `temperature=0` is greedy decoding. `top_k=0` and `top_p=1` switch those filters off.
    `seed` makes a call reproducible: the same seed, model and prompts give the same responses.
    `return_logprobs` records log π(a_t|s_t) of softmax(logits / temperature) from the
    generation pass itself (equal to a fresh forward pass, up to float rounding).
    """

    samples_per_prompt: int = 1
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    return_logprobs: bool = False

    def __post_init__(self) -> None:
        if self.samples_per_prompt < 1:
            raise ConfigError(f"samples_per_prompt must be >= 1, got {self.samples_per_prompt}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")


class RolloutEngine(Protocol):
    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingConfig,
                 prompts: Sequence[Any] = (), meta: dict[str, list[Any]] | None = None,
                 ) -> Experience: ...

    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None: ...


def response_mask_from_eos(response_ids: Tensor, eos_id: int | Sequence[int]) -> tuple[Tensor,
                                                                                         Tensor]:
    """`(mask, truncated)`: mask (B, T) True up to and including the first EOS; `truncated` (B,)
    True for rows with no EOS (they ran out of tokens)."""
    eos_ids = torch.as_tensor([eos_id] if isinstance(eos_id, int) else list(eos_id),
                              device=response_ids.device)
    is_eos = torch.isin(response_ids, eos_ids)
    # eos strictly before position t -> not part of the response
    seen_before = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    return ~seen_before, ~is_eos.any(-1)


class HFGenerateEngine:
    """Sampling with `model.generate`: batched, KV cache, n samples per prompt, stop at EOS.

    Args:
        model: the policy (or a copy of it that `update_weights` keeps in sync).
        pad_id: the tokenizer's pad id; prompts are left-padded with it.
        eos_id: the id (or ids) that end a response.
        max_batch_prompts: prompts per `generate` call (memory bound).
    """

    def __init__(self, model: nn.Module, pad_id: int, eos_id: int | Sequence[int],
                 max_batch_prompts: int = 64, decode=None) -> None:
        self.model = model
        self.pad_id = pad_id
        self.eos_id = eos_id
        self.max_batch_prompts = max_batch_prompts
        self.decode = decode  # tokenizer.decode-like callable for Experience.texts, optional

    @torch.no_grad()
    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingConfig,
                 prompts: Sequence[Any] = (), meta: dict[str, list[Any]] | None = None,
                 seeds: Sequence[int] | None = None) -> Experience:
        """Responses to every prompt. `seeds` (one per prompt) samples each prompt's group on
        its own with its own seed, so a prompt's responses do not depend on which other
        prompts share the batch (e.g. how prompts are split over ranks), at the cost of
        batching."""
        if seeds is not None:
            if len(seeds) != len(prompt_ids):
                raise ConfigError(f"{len(seeds)} seeds for {len(prompt_ids)} prompts")
            parts = [self.generate([ids], replace(sampling, seed=seed))
                     for ids, seed in zip(prompt_ids, seeds, strict=True)]
            exp = Experience.concat(parts, self.pad_id)
            return self._annotate(exp, len(prompt_ids), sampling.samples_per_prompt, prompts,
                                  meta)
        if not prompt_ids:
            raise ConfigError("generate needs at least one prompt")
        if any(len(p) == 0 for p in prompt_ids):
            raise ConfigError("every prompt needs at least one token")
        n = sampling.samples_per_prompt
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.random.fork_rng(devices=self._rng_devices()):
                if sampling.seed is not None:
                    torch.manual_seed(sampling.seed)
                parts = [self._generate_chunk(prompt_ids[s : s + self.max_batch_prompts], sampling)
                         for s in range(0, len(prompt_ids), self.max_batch_prompts)]
        finally:
            self.model.train(was_training)
        exp = parts[0] if len(parts) == 1 else Experience.concat(parts, self.pad_id)
        return self._annotate(exp, len(prompt_ids), n, prompts, meta)

    def _annotate(self, exp: Experience, n_prompts: int, n: int, prompts: Sequence[Any],
                  meta: dict[str, list[Any]] | None) -> Experience:
        """Group ids, decoded texts, and the prompts and columns repeated per sample."""
        group_ids = torch.arange(n_prompts, device=exp.input_ids.device)
        group_ids = group_ids.repeat_interleave(n)
        texts: tuple[str, ...] = ()
        if self.decode is not None:
            texts = tuple(
                self.decode(row[mask].tolist(), skip_special_tokens=True)
                for row, mask in zip(exp.response_ids, exp.response_mask, strict=True)
            )
        meta = {k: [v[i] for i in range(n_prompts) for _ in range(n)]
                for k, v in (meta or {}).items()}
        repeated = tuple(p for p in prompts for _ in range(n)) if prompts else ()
        return exp.replace(group_ids=group_ids, texts=texts, meta=meta, prompts=repeated)

    def _rng_devices(self) -> list:
        device = next(self.model.parameters()).device
        return [device] if device.type == "cuda" else []

    def _generate_chunk(self, prompt_ids: Sequence[Sequence[int]],
                        sampling: SamplingConfig) -> Experience:
        device = next(self.model.parameters()).device
        n = sampling.samples_per_prompt
        # Each prompt repeated n times, as rows i*n .. i*n+n-1 (generate's own
        # num_return_sequences refuses greedy decoding with n > 1).
        ids = pad(prompt_ids, self.pad_id, side="left").to(device).repeat_interleave(n, dim=0)
        attention = pad([[1] * len(p) for p in prompt_ids], 0, side="left").bool().to(device)
        attention = attention.repeat_interleave(n, dim=0)
        greedy = sampling.temperature == 0
        kwargs: dict[str, Any] = {
            "do_sample": not greedy,
            "max_new_tokens": sampling.max_new_tokens,
            "pad_token_id": self.pad_id,
            "eos_token_id": self.eos_id,
            "return_dict_in_generate": True,
            "output_logits": sampling.return_logprobs,
        }
        if not greedy:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p,
                          top_k=sampling.top_k)
        out = self.model.generate(input_ids=ids, attention_mask=attention, **kwargs)
        p = ids.shape[1]
        response = out.sequences[:, p:]
        mask, truncated = response_mask_from_eos(response, self.eos_id)
        # Past the first EOS, generate writes pad; make sure of it whatever pad/eos are.
        response = torch.where(mask, response, torch.full_like(response, self.pad_id))
        old_logp = None
        if sampling.return_logprobs:
            logits = torch.stack(out.logits, dim=1)  # (B, T, V) raw, before any warper
            temp = 1.0 if greedy else sampling.temperature
            old_logp = token_logprobs(logits, response, temperature=temp) * mask
        return Experience(
            input_ids=torch.cat([ids, response], dim=1),
            attention_mask=torch.cat([attention, mask], dim=1),
            response_mask=mask,
            group_ids=torch.zeros(response.shape[0], dtype=torch.long, device=device),
            truncated=truncated,
            old_logp=old_logp,
        )

    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        """Copy trained weights into the engine's model (a no-op when it is the policy)."""
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in named_tensors:
                target = params.get(name)
                if target is None:
                    raise ConfigError(f"update_weights: the engine's model has no {name!r}")
                if target.data_ptr() != tensor.data_ptr():
                    target.copy_(tensor)

