"""Multi-turn episodes, token in, token out (ALGORITHMS.md 6d).

`run_episodes` plays one episode per sample: the engine samples a turn for every episode
still running (one batched call per turn), each environment answers its turn, and the answer
is appended as the chat template renders it. The ids trained on are the ids sampled:

- a policy turn's ids are kept verbatim, its end token included (never decoded and encoded
  again: a round trip through text may give other ids, and the model would be trained on ids
  it never produced);
- an observation's ids are the template's rendering of its messages after an assistant turn
  (the text between the end of that turn and the next turn's start, the generation prompt
  included), tokenized alone; they are context, masked out of the loss, advantages, KL,
  entropy and the critic's targets (`response_mask` is False there);
- a turn's reward sits at its last token (`Experience.token_scores`); the episode's score is
  the sum (what group baselines compare).

An episode ends when the environment says done, when a turn hits the per-turn token limit
without its end token, after `max_turns` turns, or when the next turn would not fit
`max_episode_tokens`; the last three are `truncated`, so the overlong options apply to
episodes as to single responses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from posttrain.data.collate import pad
from posttrain.errors import ConfigError
from posttrain.rollout.engine import RolloutEngine, SamplingConfig
from posttrain.rollout.environment import Step, as_messages
from posttrain.rollout.experience import Experience

# the conversation an observation's rendering is cut from (its text after this one's)
_BEFORE = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]


@dataclass
class Episode:
    prompt_ids: list[int]
    env: Any
    seed: int | None
    ids: list[int] = field(default_factory=list)  # everything after the prompt
    policy: list[bool] = field(default_factory=list)  # per id: sampled by the policy
    logp: list[float] = field(default_factory=list)  # per id: μ's log-prob (0 elsewhere)
    rewards: list[float] = field(default_factory=list)  # per id: the turn rewards
    turns: list[dict[str, str]] = field(default_factory=list)  # the transcript, for logs
    turn_rewards: list[float] = field(default_factory=list)  # per policy turn
    policy_turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    done: bool = False
    truncated: bool = False


class ObservationRenderer:
    """Token ids of observation messages as the chat template renders them after an
    assistant turn, up to and including the next assistant turn's opening."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        if getattr(tokenizer, "chat_template", None) is None:
            raise ConfigError("rollout.environment: multi-turn episodes render observations "
                              "with the tokenizer's chat template, and it has none; set "
                              "model.chat_template")
        self._before = self._text(_BEFORE, False)

    def _text(self, messages, add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def __call__(self, messages: list[dict[str, str]]) -> list[int]:
        text = self._text(_BEFORE + messages, True)
        if not text.startswith(self._before):
            raise ConfigError("the chat template renders a conversation's start differently "
                              "once a message follows; observations cannot be appended token "
                              "for token")
        return list(self.tokenizer(text[len(self._before):], add_special_tokens=False)
                    ["input_ids"])


@dataclass(frozen=True)
class EpisodeLimits:
    max_turns: int = 4  # policy turns
    max_episode_tokens: int = 256  # after the prompt: policy and observation tokens


def episode_seed(base: int | None, sample: int, turn: int) -> int | None:
    if base is None:
        return None
    return ((base * 1_000_033 + sample) * 7_919 + turn) % (2**31)


def run_episodes(engine: RolloutEngine, tokenizer, env_factory, prompt_ids: Sequence[Sequence[int]],
                 sampling: SamplingConfig, limits: EpisodeLimits, prompts: Sequence[Any] = (),
                 meta: dict[str, list[Any]] | None = None,
                 seeds: Sequence[int] | None = None) -> Experience:
    """`sampling.samples_per_prompt` episodes per prompt (rows i*n .. i*n+n-1 answer prompt
    i), each turn at most `sampling.max_new_tokens` tokens."""
    n, meta = sampling.samples_per_prompt, meta or {}
    render = ObservationRenderer(tokenizer)
    eos = tokenizer.eos_token_id
    if seeds is None and sampling.seed is not None:
        seeds = [(sampling.seed * 1_000_003 + i) % (2**31) for i in range(len(prompt_ids))]
    episodes: list[Episode] = []
    for i, ids in enumerate(prompt_ids):
        columns = {k: v[i] for k, v in meta.items()}
        prompt = prompts[i] if prompts else None
        for j in range(n):
            env = env_factory()
            ep = Episode(list(ids), env, None if seeds is None else seeds[i] * n + j)
            first = env.reset(prompt, **columns)
            if first is not None:
                _observe(ep, as_messages(first), render)
            episodes.append(ep)
    for turn in range(limits.max_turns):
        active = [ep for ep in episodes if not ep.done]
        room = {id(ep): limits.max_episode_tokens - len(ep.ids) for ep in active}
        for ep in active:
            if room[id(ep)] < 1:
                ep.done = ep.truncated = True
        active = [ep for ep in active if not ep.done]
        if not active:
            break
        # one call per turn; an episode's turn is then cut to what it has left (the first k
        # tokens of a sample do not depend on the limit, so this is the episode's own limit)
        budget = min(sampling.max_new_tokens, max(room[id(ep)] for ep in active))
        turn_seeds = [episode_seed(ep.seed, 0, turn) for ep in active]
        exp = engine.generate([ep.prompt_ids + ep.ids for ep in active],
                              replace(sampling, samples_per_prompt=1, max_new_tokens=budget),
                              seeds=None if turn_seeds[0] is None else turn_seeds)
        for row, ep in enumerate(active):
            mask = exp.response_mask[row]
            tokens = exp.response_ids[row][mask].tolist()[: room[id(ep)]]
            logp = (exp.old_logp[row][mask].tolist()[: len(tokens)]
                    if exp.old_logp is not None else [0.0] * len(tokens))
            ended = bool(tokens) and tokens[-1] == eos
            text = tokenizer.decode(tokens[:-1] if ended else tokens, skip_special_tokens=True)
            ep.ids += tokens
            ep.policy += [True] * len(tokens)
            ep.logp += logp
            ep.rewards += [0.0] * len(tokens)
            ep.turns.append({"role": "assistant", "content": text})
            ep.turn_rewards.append(0.0)
            ep.policy_turns += 1
            if not ended:  # cut off by the token limit: no environment step on half a turn
                ep.done = ep.truncated = True
                continue
            step = ep.env.step(text)
            if not isinstance(step, Step):
                raise ConfigError(f"{type(ep.env).__name__}.step must return a "
                                  f"posttrain.rollout.environment.Step, got {type(step).__name__}")
            ep.rewards[-1] += float(step.reward)
            ep.turn_rewards[-1] = float(step.reward)
            ep.tool_calls += int(step.info.get("tool_calls", 0))
            ep.tool_errors += int(step.info.get("tool_errors", 0))
            if step.done:
                ep.done = True
            elif step.observation is not None:
                _observe(ep, as_messages(step.observation), render)
    for ep in episodes:
        if not ep.done:  # out of turns
            ep.truncated = True
    return _to_experience(episodes, n, tokenizer, prompts, meta,
                          sampling.return_logprobs)


def _observe(ep: Episode, messages: list[dict[str, str]], render: ObservationRenderer) -> None:
    ids = render(messages)
    ep.ids += ids
    ep.policy += [False] * len(ids)
    ep.logp += [0.0] * len(ids)
    ep.rewards += [0.0] * len(ids)
    ep.turns += [dict(m) for m in messages]


def _to_experience(episodes: list[Episode], n: int, tokenizer, prompts: Sequence[Any],
                   meta: dict[str, list[Any]], with_logprobs: bool) -> Experience:
    pad_id = tokenizer.pad_token_id
    prompt = pad([ep.prompt_ids for ep in episodes], pad_id, side="left")
    prompt_att = pad([[1] * len(ep.prompt_ids) for ep in episodes], 0, side="left").bool()
    body = pad([ep.ids or [pad_id] for ep in episodes], pad_id)
    width = body.shape[1]
    real = torch.tensor([[k < len(ep.ids) for k in range(width)] for ep in episodes])
    policy = pad([ep.policy for ep in episodes], False, dtype=torch.bool)
    policy = torch.nn.functional.pad(policy, (0, width - policy.shape[1]))
    rewards = pad([ep.rewards for ep in episodes], 0.0, dtype=torch.float32)
    rewards = torch.nn.functional.pad(rewards, (0, width - rewards.shape[1]))
    logp = pad([ep.logp for ep in episodes], 0.0, dtype=torch.float32)
    logp = torch.nn.functional.pad(logp, (0, width - logp.shape[1]))
    n_prompts = len(episodes) // n
    repeated = tuple(p for p in prompts for _ in range(n)) if prompts else ()
    columns = {k: [v[i] for i in range(n_prompts) for _ in range(n)] for k, v in meta.items()}
    columns["episode"] = [ep.turns for ep in episodes]
    columns["episode_stats"] = [{"turns": ep.policy_turns, "tool_calls": ep.tool_calls,
                                 "tool_errors": ep.tool_errors,
                                 "turn_rewards": ep.turn_rewards} for ep in episodes]
    return Experience(
        input_ids=torch.cat([prompt, body], dim=1),
        attention_mask=torch.cat([prompt_att, real], dim=1),
        response_mask=policy,
        group_ids=torch.arange(n_prompts).repeat_interleave(n),
        truncated=torch.tensor([ep.truncated for ep in episodes]),
        prompts=repeated,
        texts=tuple(tokenizer.decode(ep.ids, skip_special_tokens=False) for ep in episodes),
        meta=columns,
        old_logp=logp.masked_fill(~policy, 0.0) if with_logprobs else None,
        token_scores=rewards.masked_fill(~policy, 0.0),
    )
