"""Built-in multi-turn tasks (ALGORITHMS.md 6d), for the tiny character-level model.

- `calculator`: two-digit products (`37*48`), which the tiny model cannot compute in its
  head, with a `calc` tool. An episode, as the chat template renders it:

      <|user|>37*48<|assistant|>calc(37*48)<eos><|user|>=1776<|assistant|>#1776<eos>

  The tool's result comes back as a `tool` message (rendered `<|user|>=...`). The SFT
  demonstrator uses the tool only part of the time (otherwise it guesses, wrongly) and copies
  its result wrong now and then, so the SFT policy's greedy answer is a (wrong) guess and its
  samples succeed about a third of the time; RL teaches it to call the tool and copy the
  result.
- `guess`: find a hidden number in 1..N from "higher"/"lower" feedback. The SFT demonstrator
  guesses at random inside the interval the feedback left (always consistent, never
  bisecting), so RL, rewarded more for fewer turns, can lower the number of turns.

Both write the RL prompts in TRL's conversational form (`prompt` a list of messages) with the
columns the environments read (`answer`, `target`, `high`, `max_turns`).
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass

from posttrain.errors import ConfigError
from posttrain.rollout.environment import Environment, Step, ToolEnvironment
from posttrain.tasks.arithmetic import _check_fraction

# ------------------------------------------------------------------------------ calculator
_EXPRESSION = re.compile(r"\s*\d+(\s*[-+*]\s*\d+)*\s*")


def calc(expression: str) -> str:
    """Evaluate integer arithmetic with +, - and * (no parentheses).

    Args:
        expression: integers joined by + - *, like 37*48 or 12+3*4
    """
    if len(expression) > 64 or not _EXPRESSION.fullmatch(expression):
        raise ValueError(f"not integers joined by + - *: {expression!r:.40}")
    # * binds tighter: a sum of products, computed without eval
    total, sign = 0, 1
    for term in re.split(r"\s*([-+])\s*", expression.strip()):
        if term in "+-":
            sign = 1 if term == "+" else -1
            continue
        product = 1
        for factor in term.split("*"):
            product *= int(factor)
        total += sign * product
    return str(total)


class CalculatorEnv(ToolEnvironment):
    """The final answer `#N` scores 1 when N is the product (column `answer`), else 0."""

    tools = (calc,)
    parser = "call"
    max_calls = 2

    def answer_reward(self, text: str) -> float:
        return 1.0 if text.strip() == "#" + str(self.columns["answer"]) else 0.0


@dataclass(frozen=True)
class CalculatorConfig:
    """Options of `calculator`."""

    min_operand: int = 10
    max_operand: int = 99
    n_sft: int = 4000
    n_sft_eval: int = 200
    n_rl: int = 2000
    n_rl_eval: int = 200
    guess_fraction: float = 0.6
    """Demonstrations that answer at once with a wrong guess, never calling the tool (above
    one half, the SFT policy's greedy answer is a guess: RL has to change its first choice)."""
    miscopy_fraction: float = 0.15
    """Demonstrations with the tool whose answer has one digit of the result changed."""

    def __post_init__(self) -> None:
        if not 0 <= self.min_operand <= self.max_operand:
            raise ConfigError("calculator: need 0 <= min_operand <= max_operand")
        _check_fraction("guess_fraction", self.guess_fraction)
        _check_fraction("miscopy_fraction", self.miscopy_fraction)


def _changed_digit(number: int, rng: random.Random) -> str:
    """`number` with one digit changed (never to a leading zero): always another number."""
    digits = list(str(number))
    k = rng.randrange(len(digits))
    allowed = "123456789" if k == 0 and len(digits) > 1 else "0123456789"
    digits[k] = rng.choice([d for d in allowed if d != digits[k]])
    return "".join(digits)


def calculator_demo(a: int, b: int, kind: str, rng: random.Random) -> list[dict[str, str]]:
    """One SFT conversation: `kind` "tool" (right), "miscopy" (tool, answer off by a digit)
    or "guess" (no tool, a wrong answer)."""
    product = a * b
    user = {"role": "user", "content": f"{a}*{b}"}
    if kind == "guess":
        wrong = _changed_digit(product, rng)
        return [user, {"role": "assistant", "content": f"#{wrong}"}]
    answer = str(product) if kind == "tool" else _changed_digit(product, rng)
    return [user, {"role": "assistant", "content": f"calc({a}*{b})"},
            {"role": "tool", "content": str(product)},
            {"role": "assistant", "content": f"#{answer}"}]


def build_calculator(seed: int, config: CalculatorConfig) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    lo, hi = config.min_operand, config.max_operand
    pairs = [(a, b) for a in range(lo, hi + 1) for b in range(lo, hi + 1)]
    rng.shuffle(pairs)
    held = set(pairs[: config.n_rl_eval])  # held-out RL prompts never seen in training
    train_pairs = pairs[config.n_rl_eval:]

    def pick(n: int) -> list[tuple[int, int]]:
        return [train_pairs[rng.randrange(len(train_pairs))] for _ in range(n)]

    def demos(n: int) -> list[dict]:
        out = []
        for a, b in pick(n):
            u = rng.random()
            kind = ("guess" if u < config.guess_fraction else
                    "miscopy" if rng.random() < config.miscopy_fraction else "tool")
            out.append({"messages": calculator_demo(a, b, kind, rng)})
        return out

    def prompts(chosen) -> list[dict]:
        return [{"prompt": [{"role": "user", "content": f"{a}*{b}"}], "answer": str(a * b)}
                for a, b in chosen]

    return {"sft_train": demos(config.n_sft), "sft_eval": demos(config.n_sft_eval),
            "rl_train": prompts(pick(config.n_rl)), "rl_eval": prompts(sorted(held))}


# ----------------------------------------------------------------------------------- guess
@dataclass(frozen=True)
class GuessConfig:
    """Options of `guess`."""

    max_number: int = 16
    max_turns: int = 6
    n_sft: int = 4000
    n_sft_eval: int = 200
    n_rl: int = 2000
    n_rl_eval: int = 200

    def __post_init__(self) -> None:
        if not 2 <= self.max_number <= 999:
            raise ConfigError("guess: max_number must be in 2..999")
        if self.max_turns < 1:
            raise ConfigError("guess: max_turns must be >= 1")


class GuessEnv(Environment):
    """A hidden number (column `target`) in 1..`high` (column): "higher" or "lower" after a
    wrong guess; solved at turn t scores 1 − (t − 1)/max_turns (fewer turns, more reward);
    a turn that is no number is told so; unsolved after `max_turns` turns (column, else 6)
    scores 0."""

    def reset(self, prompt, target, high, max_turns=GuessConfig.max_turns, **columns):
        self.target, self.high, self.turn = int(target), int(high), 0
        self.max_turns = int(max_turns)

    def step(self, text: str) -> Step:
        self.turn += 1
        said = text.strip()
        if said.isdigit() and int(said) == self.target:
            return Step(done=True, reward=1.0 - (self.turn - 1) / self.max_turns,
                        info={"turns": self.turn})
        if self.turn >= self.max_turns:
            return Step(done=True, reward=0.0, info={"turns": self.turn})
        if not said.isdigit():
            return Step(observation=f"a number 1-{self.high}", info={"turns": self.turn})
        return Step(observation="higher" if int(said) < self.target else "lower",
                    info={"turns": self.turn})


def guess_demo(target: int, high: int, max_turns: int, rng: random.Random
               ) -> list[dict[str, str]]:
    """The demonstrator: a random number inside what the feedback left, until found."""
    messages = [{"role": "user", "content": f"guess 1-{high}"}]
    lo, hi = 1, high
    for _ in range(max_turns):
        g = rng.randint(lo, hi)
        messages.append({"role": "assistant", "content": str(g)})
        if g == target:
            break
        if g < target:
            lo = g + 1
            messages.append({"role": "user", "content": "higher"})
        else:
            hi = g - 1
            messages.append({"role": "user", "content": "lower"})
    if messages[-1]["role"] == "user":
        messages.pop()  # a conversation ends on the assistant's turn
    return messages


def opening_scores(high: int, max_turns: int) -> list[float]:
    """The game's expected score after opening with 1..`high`, the target uniform and every
    later guess at random inside what the feedback left (the demonstrator's play): exact, by
    recursion over the interval's size. The middle opens best, the ends worst; a policy's
    opening is judged by the mean of these under its probabilities (`opening_probabilities`)."""

    def score(t: int) -> float:  # found at turn t
        return 1.0 - (t - 1) / max_turns

    @functools.cache
    def value(m: int, t: int) -> float:  # m numbers left, guess number t to come
        if m == 0 or t > max_turns:
            return 0.0
        rest = sum((j - 1) * value(j - 1, t + 1) + (m - j) * value(m - j, t + 1)
                   for j in range(1, m + 1))
        return score(t) / m + rest / m**2

    return [(score(1) + (g - 1) * value(g - 1, 2) + (high - g) * value(high - g, 2)) / high
            for g in range(1, high + 1)]


def opening_probabilities(model, tokenizer, high: int) -> list[float]:
    """The policy's probability of each opening guess 1..`high` (up to 9: one token each),
    from one forward pass over the prompt as RL renders it."""
    import torch

    from posttrain.data.collate import encode_prompt

    if high > 9:
        raise ValueError("opening_probabilities: numbers above 9 take two tokens")
    ids = encode_prompt([{"role": "user", "content": f"guess 1-{high}"}], tokenizer)
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, -1].float()
    probs = torch.softmax(logits, -1)
    return [float(probs[tokenizer(str(g), add_special_tokens=False).input_ids[-1]])
            for g in range(1, high + 1)]


def build_guess(seed: int, config: GuessConfig) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    n = config.max_number

    def demos(k: int) -> list[dict]:
        return [{"messages": guess_demo(rng.randint(1, n), n, config.max_turns, rng)}
                for _ in range(k)]

    def prompts(k: int) -> list[dict]:
        return [{"prompt": [{"role": "user", "content": f"guess 1-{n}"}],
                 "target": str(rng.randint(1, n)), "high": str(n),
                 "max_turns": str(config.max_turns)} for _ in range(k)]

    return {"sft_train": demos(config.n_sft), "sft_eval": demos(config.n_sft_eval),
            "rl_train": prompts(config.n_rl), "rl_eval": prompts(config.n_rl_eval)}
