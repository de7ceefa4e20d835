"""Rollout engines: the protocol, and the `transformers` generate engine.

An engine turns token prompts into an `Experience` with responses; the trainer adds
everything else. Another engine (vLLM, say) only has to implement the same two methods.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

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


@runtime_checkable
class RolloutEngine(Protocol):
    """Everything the trainers use of an engine.

    `model` is the module the engine samples from (the policy itself, or a copy that
    `update_weights` keeps in sync; the memory check counts it). `generate` returns an
    Experience with `input_ids`, `attention_mask`, `response_mask`, `truncated`, `group_ids`
    (prompt index per sample, samples of a prompt adjacent), `texts`, `prompts` and `meta`
    repeated per sample, and `old_logp` when `sampling.return_logprobs`. `seeds` (one per
    prompt) makes each prompt's group independent of the batch it is in.
    """

    model: nn.Module

    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingConfig,
                 prompts: Sequence[Any] = (), meta: dict[str, list[Any]] | None = None,
                 seeds: Sequence[int] | None = None) -> Experience: ...

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


def annotate(exp: Experience, n_prompts: int, n: int, prompts: Sequence[Any],
             meta: dict[str, list[Any]] | None, decode=None) -> Experience:
    """Group ids, decoded texts, and the prompts and columns repeated per sample: what every
    engine adds to the token tensors it sampled (rows i*n .. i*n+n-1 answer prompt i)."""
    group_ids = torch.arange(n_prompts, device=exp.input_ids.device).repeat_interleave(n)
    texts: tuple[str, ...] = ()
    if decode is not None:
        texts = tuple(decode(row[mask].tolist(), skip_special_tokens=True)
                      for row, mask in zip(exp.response_ids, exp.response_mask, strict=True))
    meta = {k: [v[i] for i in range(n_prompts) for _ in range(n)]
            for k, v in (meta or {}).items()}
    repeated = tuple(p for p in prompts for _ in range(n)) if prompts else ()
    return exp.replace(group_ids=group_ids, texts=texts, meta=meta, prompts=repeated)


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
            return annotate(exp, len(prompt_ids), sampling.samples_per_prompt, prompts, meta,
                            self.decode)
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
        return annotate(exp, len(prompt_ids), n, prompts, meta, self.decode)

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
            # a NaN or inf logit would stop multinomial; with it set to a finite value the
            # draw goes on, and the log-prob, from the raw logits, stays NaN for the trainer
            "remove_invalid_values": True,
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
        _copy_weights(self.model, named_tensors)


def _copy_weights(model: nn.Module, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in named_tensors:
                target = params.get(name)
                if target is None:
                    raise ConfigError(f"update_weights: the engine's model has no {name!r}")
                if target.data_ptr() != tensor.data_ptr():
                    target.copy_(tensor)



def filter_logits(scores: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Top-k then nucleus (top-p) filtering of (B, V) scores: removed entries become −inf.
    Top-p keeps the smallest set of most likely tokens whose probability reaches `top_p`
    (ties broken as `transformers` does, so both engines sample the same tokens)."""
    if top_k > 0:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        remove = sorted_scores.softmax(-1).cumsum(-1) <= 1 - top_p
        remove[:, -1] = False  # the most likely token always stays
        scores = scores.masked_fill(remove.scatter(1, order, remove), -math.inf)
    return scores


def _first_token(probs: Tensor) -> Tensor:
    """A one-hot distribution on token 0 per row of `probs`."""
    out = torch.zeros_like(probs[:1])
    out[:, 0] = 1.0
    return out


def _cache_argument(model: nn.Module) -> str:
    """The name the model's forward takes (and its output returns) the KV cache by: `cache`
    in recent `transformers` (where `past_key_values` is deprecated), `past_key_values`
    before."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    return "cache" if "cache" in inspect.signature(inner.forward).parameters \
        else "past_key_values"


class LeanGenerateEngine(HFGenerateEngine):
    """Sampling with a hand-run decode loop over the model's KV cache.

    Against `model.generate` with the prompt repeated n times (`HFGenerateEngine`):
    - each prompt is prefilled once and its cache copied to its n samples;
    - only the last position's logits are computed in the prefill;
    - rows that have finished (EOS) are dropped from the batch and its cache, so later
      decode steps compute only the unfinished rows, and the loop stops when none is left;
    - the log-probs of the sampled tokens come from the sampling logits at no extra cost.
    Greedy decoding gives exactly `generate`'s tokens; sampling draws from the same
    distribution (same temperature/top-k/top-p semantics). Same arguments as
    `HFGenerateEngine`.
    """

    def __init__(self, model: nn.Module, pad_id: int, eos_id: int | Sequence[int],
                 max_batch_prompts: int = 64, decode=None, compile: bool = False) -> None:
        super().__init__(model, pad_id, eos_id, max_batch_prompts, decode)
        self.compile = compile
        self._compiled = None
        self._cache_kw = _cache_argument(model)

    def _decode_fn(self):
        if not self.compile:
            return self.model
        if self._compiled is None:
            self._compiled = torch.compile(self.model, dynamic=False)
        return self._compiled

    def _generate_chunk(self, prompt_ids: Sequence[Sequence[int]],
                        sampling: SamplingConfig) -> Experience:
        device = next(self.model.parameters()).device
        n = sampling.samples_per_prompt
        greedy = sampling.temperature == 0
        temp = 1.0 if greedy else sampling.temperature
        eos = torch.as_tensor([self.eos_id] if isinstance(self.eos_id, int) else
                              list(self.eos_id), device=device)
        prompt = pad(prompt_ids, self.pad_id, side="left").to(device)
        prompt_att = pad([[1] * len(p) for p in prompt_ids], 0, side="left").bool().to(device)
        pos = (prompt_att.long().cumsum(-1) - 1).clamp(min=0)
        rows = prompt.shape[0] * n
        static = self.compile
        if static:
            # Static shapes for the compiled decode step: a cache of a bucketed length, the
            # prompt repeated before the prefill (a StaticCache cannot be expanded), a full
            # length attention mask, and every row kept to the end.
            from transformers import StaticCache

            p_len = prompt.shape[1]
            length = -(-(p_len + sampling.max_new_tokens) // 64) * 64
            cache = StaticCache(config=self.model.config, max_cache_len=length)
            prompt, prompt_att, pos = (x.repeat_interleave(n, dim=0)
                                       for x in (prompt, prompt_att, pos))
            full_att = torch.ones(rows, length, dtype=torch.long, device=device)
            full_att[:, :p_len] = prompt_att.long()
            out = self.model(input_ids=prompt, attention_mask=full_att[:, :p_len],
                             position_ids=pos, **{self._cache_kw: cache}, use_cache=True,
                             cache_position=torch.arange(p_len, device=device),
                             logits_to_keep=1)
            logits = out.logits[:, -1]
            n_prefilled = 1
        else:
            out = self.model(input_ids=prompt, attention_mask=prompt_att, position_ids=pos,
                             use_cache=True, logits_to_keep=1)
            cache = out[self._cache_kw]
            if n > 1:
                cache.batch_repeat_interleave(n)
            logits = out.logits[:, -1].repeat_interleave(n, dim=0)
            n_prefilled = n
        att = prompt_att.repeat_interleave(n_prefilled, dim=0)
        next_pos = pos[:, -1].repeat_interleave(n_prefilled) + 1
        decode = self._decode_fn()
        active = torch.arange(rows, device=device)  # rows still generating, in cache order
        finished = torch.zeros(rows, dtype=torch.bool, device=device)  # static path only
        tokens = torch.full((rows, sampling.max_new_tokens), self.pad_id, dtype=torch.long,
                            device=device)
        logps = torch.zeros(rows, sampling.max_new_tokens, device=device) \
            if sampling.return_logprobs else None
        for t in range(sampling.max_new_tokens):
            scores = logits.float() / temp
            if greedy:
                tok = scores.argmax(-1)
            else:
                probs = filter_logits(scores, sampling.top_k, sampling.top_p).softmax(-1)
                # A NaN or inf logit makes its row NaN, which multinomial refuses (or, on
                # CUDA, asserts on): such a row draws token 0 instead, with no host sync. Its
                # log-prob below stays NaN, so the trainer sees it and skips or stops.
                probs = torch.where(torch.isfinite(probs).all(-1, keepdim=True), probs,
                                    _first_token(probs))
                if len(active) < rows:
                    # one draw per row of the full batch, finished rows included (a dummy
                    # one-hot), so the random stream, and hence every sample, is the one
                    # `generate` draws: the seed fixes the responses whichever engine runs
                    full = torch.zeros(rows, probs.shape[1], dtype=probs.dtype,
                                       device=device)
                    full[:, 0] = 1.0
                    full[active] = probs
                    probs = full
                tok = torch.multinomial(probs, 1)[:, 0]
                if len(active) < rows:
                    tok = tok[active]
            tokens[active, t] = tok
            if logps is not None:
                logps[active, t] = scores.log_softmax(-1).gather(1, tok[:, None])[:, 0]
            done = torch.isin(tok, eos)
            if t == sampling.max_new_tokens - 1:
                break
            if static:
                finished |= done
                if finished.all():  # one host sync per token, as `generate`'s check
                    break
                logits = decode(input_ids=tok[:, None], attention_mask=full_att,
                                position_ids=next_pos[:, None], **{self._cache_kw: cache},
                                use_cache=True, cache_position=torch.tensor(
                                    [prompt.shape[1] + t], device=device)).logits[:, -1]
                next_pos = next_pos + 1
                continue
            if done.any():  # one host sync per token, as `generate`'s stopping check
                keep = torch.nonzero(~done)[:, 0]
                if keep.numel() == 0:
                    break
                cache.batch_select_indices(keep)
                active, tok, att, next_pos = active[keep], tok[keep], att[keep], next_pos[keep]
            att = torch.cat([att, torch.ones_like(att[:, :1])], dim=1)
            logits = decode(input_ids=tok[:, None], attention_mask=att,
                            position_ids=next_pos[:, None], **{self._cache_kw: cache},
                            use_cache=True).logits[:, -1]
            next_pos = next_pos + 1
        mask, truncated = response_mask_from_eos(tokens, self.eos_id)
        tokens = torch.where(mask, tokens, torch.full_like(tokens, self.pad_id))
        width = int(mask.sum(-1).max())  # trailing columns nobody used
        tokens, mask = tokens[:, :width], mask[:, :width]
        ids = prompt.repeat_interleave(n_prefilled, dim=0)
        attention = prompt_att.repeat_interleave(n_prefilled, dim=0)
        return Experience(
            input_ids=torch.cat([ids, tokens], dim=1),
            attention_mask=torch.cat([attention, mask], dim=1),
            response_mask=mask,
            group_ids=torch.zeros(rows, dtype=torch.long, device=device),
            truncated=truncated,
            old_logp=logps[:, :width] * mask if logps is not None else None,
        )


ENGINES = {"lean": LeanGenerateEngine, "hf": HFGenerateEngine}


def build_engine(model: nn.Module, tokenizer, engine: str, dtype: str = "auto",
                 compile: bool = False, precision: str = "fp32") -> RolloutEngine:
    """A `lean` or `hf` engine sampling from `model`: the model itself, or a copy of its own
    in `dtype` (auto: a bfloat16 copy for the lean engine under run.precision bf16, rather
    than autocast re-casting every fp32 weight at every decode step), kept in sync by
    `update_weights`. The trainer and the asynchronous worker build theirs here alike."""
    import copy

    from posttrain.models.load import resolve_dtype

    rollout_model = model
    if dtype == "auto" and precision == "bf16" and engine == "lean":
        dtype = "bfloat16"
    if dtype != "auto":
        rollout_model = copy.deepcopy(model).to(resolve_dtype(dtype)).requires_grad_(False)
    return ENGINES[engine](rollout_model, tokenizer.pad_token_id, tokenizer.eos_token_id,
                           decode=tokenizer.decode, **({"compile": True} if compile else {}))
