"""The preference task: a hidden gold scorer, and preference pairs labelled with it.

The point of the task is the InstructGPT pipeline in miniature: SFT on demonstrations that
were not optimised for the gold score, a reward model fitted to preference pairs, then PPO (or
DPO) that raises the gold score - and, without a KL penalty, raises the learned proxy while
the gold score falls (reward over-optimisation, Gao et al. 2022).

Prompts are two or three lowercase words and a colon (`owl fig cab:`). Responses are short
strings over a small alphabet (`abcdefgh` by default; `fabbe`).

The gold score of response y to prompt x (`GoldScorer.score`), with n_c the count of
character c in y:

    g(x, y) =   Σ_c min(n_c, cap) · (w_c + bonus · [c occurs in x])     per-character preferences
              - overuse · Σ_c max(0, n_c - cap)                       diminishing returns
              - length_penalty · (max(0, |y| - max_length)² + max(0, min_length - |y|)²)
              + unknown_weight · (number of characters outside the alphabet)

- The weights w_c are evenly spaced from -0.75 to 1.25 over a seeded permutation of the
  alphabet: some characters are good, some bad, and the average one slightly good (so longer
  responses tend to score higher, as with human raters). `bonus` rewards using the letters of
  the prompt, so the score depends on the prompt.
- Inside the range the base sampler covers (lengths 2..8, each character at most once), the
  score is a per-character sum - a tiny reward model learns it from a few thousand pairs.
- Outside that range the score turns: the fourth and later copies of a character cost
  `overuse` each, and lengths above `max_length` = 12 are penalised quadratically. A learned
  proxy that has only seen "more `e` is better" keeps rewarding `eeeeeeeeeeeeeee`, which the
  gold score punishes: this is what makes over-optimisation visible. No rule of
  `posttrain.rewards` computes this score, so a rule cannot stand in for the reward model.

The base sampler draws a response's characters without replacement (weighted by its own
probabilities, independent of the gold weights). A model that imitates it answers greedily with
distinct characters, the kind of response the reward model was fitted on, so RL can raise the
greedy policy's gold score as well as the sampled one. With characters drawn independently
(before issue 15) SFT's greedy answer was a run of its most likely character (`ffff`), outside
everything the reward model had seen, and PPO lengthened the run: greedy gold fell while the
sampled gold rose.

Preference pairs (`make_preference_pairs`): for each prompt two different responses are drawn
from a sampler, by default the base sampler the SFT data came from (standing in for the SFT
model; any callable `(prompt, n, rng) -> list[str]` fits, so the pipeline can plug in the SFT
model), and labelled by Bradley-Terry on the gold score: a is chosen with probability
σ((g(a) - g(b)) / temperature); then, with probability `label_noise`, the label is flipped.

Files written: `sft_train.jsonl`, `sft_eval.jsonl` (kind `completion`), `pref_train.jsonl`,
`pref_eval.jsonl` (kind `preference`), `rl_train.jsonl`, `rl_eval.jsonl` (kind `prompt`), and
`gold.json` (the scorer; load it as a reward function with `GoldReward.from_file`). Evaluation
prompts are drawn from a pool disjoint from the training prompts.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from posttrain.errors import ConfigError, DataError, RewardError

ALPHABET = "abcdefgh"
"""The characters responses are made of (each is one token of the tiny tokenizer)."""

WORDS = (
    "ace", "bad", "bee", "cab", "chef", "dog", "egg", "fig", "gold", "hug",
    "ice", "jam", "kite", "lamp", "moon", "nut", "owl", "pie", "rust", "sky",
    "tree", "wolf",
)  # fmt: skip
"""The words prompts are made of; their letters overlap the alphabet unevenly."""

Sampler = Callable[[str, int, random.Random], list[str]]
"""Draws `n` responses to a prompt: `sampler(prompt, n, rng) -> list[str]`."""

GOLD_FORMAT = "posttrain.gold_scorer/1"


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ConfigError(f"{name}={value}: must be positive")


@dataclass(frozen=True)
class GoldScorer:
    """The hidden gold score g(prompt, response); the formula is in the module docstring.

    Save it with `save`, load it with `from_file`; the loaded scorer gives identical scores.
    """

    weights: dict[str, float]
    """w_c for each character of the alphabet."""
    prompt_bonus: float = 0.5
    """Added to w_c when c occurs in the prompt."""
    cap: int = 3
    """Copies of one character that count; later copies cost `overuse` each."""
    overuse: float = 1.0
    min_length: int = 2
    max_length: int = 12
    length_penalty: float = 0.5
    """Times the squared distance of the length from [min_length, max_length]."""
    unknown_weight: float = -1.0
    """Score of each character outside the alphabet (digits, spaces, punctuation...)."""

    def __post_init__(self) -> None:
        if not self.weights:
            raise ConfigError("GoldScorer.weights is empty; give one weight per character")
        bad = [c for c in self.weights if not (isinstance(c, str) and len(c) == 1)]
        if bad:
            raise ConfigError(f"GoldScorer.weights: keys must be single characters, got {bad}")
        if self.cap < 1 or not 0 <= self.min_length <= self.max_length:
            raise ConfigError(
                f"GoldScorer: need cap >= 1 and 0 <= min_length <= max_length, got cap="
                f"{self.cap}, min_length={self.min_length}, max_length={self.max_length}"
            )

    @classmethod
    def from_seed(cls, seed: int, alphabet: str = ALPHABET, **params: Any) -> GoldScorer:
        """Weights evenly spaced over [-0.75, 1.25], assigned to a seeded permutation of
        `alphabet`; `params` override the other fields."""
        chars = list(dict.fromkeys(alphabet))
        if len(chars) < 2:
            raise ConfigError(f"alphabet={alphabet!r}: needs at least two distinct characters")
        random.Random(f"preference/gold/{seed}").shuffle(chars)
        n = len(chars)
        # Evenly spaced rather than random draws, so every seed has a clear best and worst
        # character and the same spread of scores (tests and demos do not depend on luck).
        weights = {c: -0.75 + 2.0 * i / (n - 1) for i, c in enumerate(chars)}
        return cls(weights=dict(sorted(weights.items())), **params)

    @property
    def alphabet(self) -> str:
        return "".join(self.weights)

    def terms(self, prompt: str, response: str) -> dict[str, float]:
        """The score split into its terms (their sum is `score`), to see why a response scores
        as it does."""
        counts = Counter(response)
        in_prompt = set(prompt)
        chars = overuse = 0.0
        for c, w in self.weights.items():  # a fixed order, so scores are bit-for-bit stable
            n = counts.get(c, 0)
            chars += min(n, self.cap) * (w + self.prompt_bonus * (c in in_prompt))
            overuse -= self.overuse * max(0, n - self.cap)
        length = len(response)
        excess = max(0, length - self.max_length) ** 2 + max(0, self.min_length - length) ** 2
        unknown = sum(n for c, n in counts.items() if c not in self.weights)
        return {
            "chars": chars,
            "overuse": overuse,
            "length": -self.length_penalty * excess,
            "unknown": self.unknown_weight * unknown,
        }

    def score(self, prompt: str, response: str) -> float:
        """g(prompt, response)."""
        t = self.terms(prompt, response)
        return t["chars"] + t["overuse"] + t["length"] + t["unknown"]

    def to_dict(self) -> dict[str, Any]:
        return {"format": GOLD_FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "gold scorer") -> GoldScorer:
        if not isinstance(data, dict) or data.get("format") != GOLD_FORMAT:
            raise DataError(
                f"{where}: not a gold scorer (expected an object with \"format\": "
                f"\"{GOLD_FORMAT}\"); make one with `posttrain tasks make preference`"
            )
        params = {k: v for k, v in data.items() if k != "format"}
        try:
            return cls(**params)
        except TypeError as err:
            raise DataError(f"{where}: {err}; it was written by another posttrain version?") \
                from None

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_file(cls, path: str | Path) -> GoldScorer:
        """Load a scorer saved with `save` (a path to `gold.json` or to the task directory)."""
        path = Path(path)
        if path.is_dir():
            path = path / "gold.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise DataError(
                f"{path}: no such file; `posttrain tasks make preference --out DIR` writes "
                "DIR/gold.json"
            ) from None
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {err.lineno}: not valid JSON ({err.msg})") from None
        return cls.from_dict(data, where=str(path))


def _text(value: Any) -> str:
    """A prompt or response as plain text; chat messages give their contents (TRL passes
    conversational completions as message lists)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(m["content"] for m in value if isinstance(m, dict) and "content" in m)
    raise RewardError(f"gold reward: expected a string or a list of messages, got {value!r:.60}")


@dataclass(frozen=True)
class GoldReward:
    """The gold score as a reward function: `reward(prompts, responses, **columns)` returns
    one float per response (the other columns are accepted and ignored)."""

    scorer: GoldScorer
    name: str = "gold"

    @classmethod
    def from_file(cls, path: str | Path) -> GoldReward:
        """Load `gold.json` (or the task directory holding it)."""
        return cls(GoldScorer.from_file(path))

    def __call__(
        self, prompts: Sequence[Any], responses: Sequence[Any], **columns: Any
    ) -> list[float]:
        if len(prompts) != len(responses):
            raise RewardError(
                f"gold reward: got {len(prompts)} prompts and {len(responses)} responses; "
                "pass one prompt per response (repeat a prompt for each of its samples)"
            )
        return [self.scorer.score(_text(p), _text(r)) for p, r in zip(prompts, responses,
                                                                      strict=True)]


@dataclass(frozen=True)
class BaseSampler:
    """The base distribution of responses, standing in for a model that was never optimised
    for the gold score: a uniform length, then that many distinct characters, drawn one after
    another from `probs` renormalised over the characters not yet used. It ignores the
    prompt."""

    probs: dict[str, float]
    min_length: int = 2
    max_length: int = 8

    def __post_init__(self) -> None:
        if not 1 <= self.min_length <= self.max_length:
            raise ConfigError(
                f"BaseSampler: need 1 <= min_length <= max_length, got {self.min_length}, "
                f"{self.max_length}"
            )
        if self.max_length > len(self.probs):
            raise ConfigError(
                f"BaseSampler: max_length={self.max_length} distinct characters need an "
                f"alphabet that long; it has {len(self.probs)}"
            )

    @classmethod
    def from_seed(cls, seed: int, alphabet: str = ALPHABET, **params: Any) -> BaseSampler:
        """Character probabilities drawn from a flat-ish Dirichlet (concentration 4), from a
        random stream independent of the gold scorer's."""
        rng = random.Random(f"preference/base/{seed}")
        raw = {c: rng.gammavariate(4.0, 1.0) for c in dict.fromkeys(alphabet)}
        total = sum(raw.values())
        # distinct characters: a short alphabet shortens the longest response
        params.setdefault("max_length", min(cls.max_length, len(raw)))
        return cls(probs={c: v / total for c, v in raw.items()}, **params)

    def __call__(self, prompt: str, n: int, rng: random.Random) -> list[str]:
        responses = []
        for _ in range(n):
            left, chars = dict(self.probs), []
            for _ in range(rng.randint(self.min_length, self.max_length)):
                c = rng.choices(list(left), list(left.values()))[0]
                chars.append(c)
                del left[c]
            responses.append("".join(chars))
        return responses


def bradley_terry_label(
    gold_a: float, gold_b: float, temperature: float, label_noise: float, rng: random.Random
) -> bool:
    """True when a is preferred: with probability σ((g(a) - g(b)) / temperature), then flipped
    with probability `label_noise`."""
    z = (gold_a - gold_b) / temperature
    p_a = 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))
    a_wins = rng.random() < p_a
    return a_wins != (rng.random() < label_noise)


def make_preference_pairs(
    prompts: Sequence[str],
    sampler: Sampler,
    scorer: GoldScorer,
    rng: random.Random,
    temperature: float = 1.0,
    label_noise: float = 0.0,
    max_tries: int = 8,
) -> list[dict[str, str]]:
    """One `preference` record {prompt, chosen, rejected} per prompt, labelled by
    `bradley_terry_label` on the gold score.

    Two responses are drawn with `sampler(prompt, 2, rng)`; identical responses carry no
    preference, so the draw is repeated up to `max_tries` times and the prompt is skipped when
    every draw was a tie (a collapsed sampler gives fewer pairs, not useless ones).
    """
    _check_positive(temperature=temperature)
    if not 0.0 <= label_noise <= 1.0:
        raise ConfigError(f"label_noise={label_noise}: must be between 0 and 1")
    pairs = []
    for prompt in prompts:
        for _ in range(max_tries):
            drawn = sampler(prompt, 2, rng)
            if len(drawn) != 2:
                raise ConfigError(
                    f"the sampler returned {len(drawn)} responses when asked for 2; a sampler "
                    "must return a list of exactly n strings"
                )
            a, b = drawn
            if a != b:
                break
        else:
            continue
        a_wins = bradley_terry_label(
            scorer.score(prompt, a), scorer.score(prompt, b), temperature, label_noise, rng
        )
        chosen, rejected = (a, b) if a_wins else (b, a)
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


@dataclass(frozen=True)
class PreferenceConfig:
    """Options of the `preference` task (`posttrain tasks make preference --option KEY=VALUE`)."""

    n_sft_train: int = 2000
    n_sft_eval: int = 200
    n_pref_train: int = 3000
    n_pref_eval: int = 300
    n_rl_train: int = 1000
    n_rl_eval: int = 200
    temperature: float = 1.0
    """Bradley-Terry temperature: lower makes labels follow the gold score more closely."""
    label_noise: float = 0.0
    """Probability that a label is flipped after the Bradley-Terry draw."""
    alphabet: str = ALPHABET
    """Characters of responses; each must be in the tiny tokenizer's charset."""
    eval_prompt_fraction: float = 0.2
    """Share of all possible prompts reserved for the evaluation files."""

    def __post_init__(self) -> None:
        counts = {k: getattr(self, k) for k in (
            "n_sft_train", "n_sft_eval", "n_pref_train", "n_pref_eval", "n_rl_train", "n_rl_eval"
        )}
        for name, value in counts.items():
            if value < 1:
                raise ConfigError(f"{name}={value}: must be at least 1")
        _check_positive(temperature=self.temperature)
        if not 0.0 <= self.label_noise <= 1.0:
            raise ConfigError(f"label_noise={self.label_noise}: must be between 0 and 1")
        if not 0.0 < self.eval_prompt_fraction < 1.0:
            raise ConfigError(
                f"eval_prompt_fraction={self.eval_prompt_fraction}: must be strictly between 0 "
                "and 1 (both the training and the evaluation prompts need some)"
            )
        if len(set(self.alphabet)) < 2:
            raise ConfigError(f"alphabet={self.alphabet!r}: needs two or more characters")


def all_prompts() -> list[str]:
    """Every prompt the task can ask: two or three distinct words from `WORDS`, then `:`."""
    prompts = []
    for a in WORDS:
        for b in WORDS:
            if b == a:
                continue
            prompts.append(f"{a} {b}:")
            prompts.extend(f"{a} {b} {c}:" for c in WORDS if c not in (a, b))
    return prompts


def build_preference(
    seed: int, config: PreferenceConfig
) -> tuple[GoldScorer, dict[str, list[dict[str, str]]]]:
    """The gold scorer and the records of the `preference` files, {file stem: records}."""
    scorer = GoldScorer.from_seed(seed, config.alphabet)
    sampler = BaseSampler.from_seed(seed, config.alphabet)
    rng = random.Random(f"preference/data/{seed}")
    prompts = all_prompts()
    rng.shuffle(prompts)
    n_eval = round(config.eval_prompt_fraction * len(prompts))
    pools = {"eval": prompts[:n_eval], "train": prompts[n_eval:]}

    def draw(split: str, n: int) -> list[str]:
        return rng.choices(pools[split], k=n)

    def demos(split: str, n: int) -> list[dict[str, str]]:
        return [{"prompt": p, "completion": sampler(p, 1, rng)[0]} for p in draw(split, n)]

    def pairs(split: str, n: int) -> list[dict[str, str]]:
        return make_preference_pairs(
            draw(split, n), sampler, scorer, rng, config.temperature, config.label_noise
        )

    records = {
        "sft_train": demos("train", config.n_sft_train),
        "sft_eval": demos("eval", config.n_sft_eval),
        "pref_train": pairs("train", config.n_pref_train),
        "pref_eval": pairs("eval", config.n_pref_eval),
        "rl_train": [{"prompt": p} for p in draw("train", config.n_rl_train)],
        "rl_eval": [{"prompt": p} for p in draw("eval", config.n_rl_eval)],
    }
    return scorer, records
