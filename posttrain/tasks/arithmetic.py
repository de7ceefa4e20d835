"""The arithmetic tasks: `a+b=` prompts with a verifiable answer.

`arithmetic` asks for the bare sum (`37+48=` -> `85`). `arithmetic_cot` asks for the sum worked
out column by column, so that responses vary several-fold in length (the setting where value
bias and length-adaptive GAE matter).

Files written (JSONL, one record a line, in the public formats of `posttrain.data.formats`):

| file             | kind         | columns                 | what                              |
|------------------|--------------|-------------------------|-----------------------------------|
| `sft_train.jsonl`| `completion` | prompt, completion      | demonstrations, `wrong_fraction`  |
|                  |              |                         | of them wrong                     |
| `sft_eval.jsonl` | `completion` | prompt, completion      | held-out demonstrations, all right|
| `rl_train.jsonl` | `prompt`     | prompt, answer          | training prompts, the true sum    |
| `rl_eval.jsonl`  | `prompt`     | prompt, answer          | held-out prompts, the true sum    |
| `ptx_train.jsonl`| `completion` | prompt, completion      | the right demonstrations without  |
|                  |              |                         | a carry                           |

Held-out operand pairs never appear in a training file (`a+b` and `b+a` count as different
prompts; only the exact pair is held out). The SFT and RL training files share their prompts:
RL starts where SFT stopped, on the same distribution. `answer` is the true sum as a decimal
string, so the rule reward is an exact string match (`task.json` names it).

Why the defaults: the tiny model (about 0.27 M parameters, one token per character) has to
learn addition in about a minute of CPU SFT. Operands 0..49 give 2,500 pairs and sums of at
most two digits; holding out 10% leaves 2,250 training pairs, so the model must learn carrying
to answer the held-out ones. The demonstrator is a weak one, the way human demonstrations
are: in 70% of the sums with a carry it forgets the carry (`37+48=` -> `75`), and a tenth of
the other demonstrations are wrong at random (off by 1..10). Random slips leave the most
likely answer right, so greedy decoding after SFT would hide them; a systematic slip does not.
SFT imitates the demonstrator: its greedy answer forgets the carry on held-out prompts too
(greedy accuracy 0.56-0.62 over task seeds 0-3: 0.91-0.96 without a carry, 0.15-0.23 with
one), while its samples still hold the right answer now and then on a carry prompt. That is
the room RL with the exact-answer reward is for: in 150 steps every preset lifts greedy
accuracy by about 20 points or more (docs/results.md, three seeds). With random slips only
(`carry_slip_fraction=0`) SFT reaches about 0.9 greedy, and RL can raise the sampled accuracy
but hardly the greedy one (issue 15).

`ptx_train` stands in for PPO-ptx's pretraining text: text that keeps a skill RL does not
reward, without the demonstrator's slip. It is the right demonstrations of sums without a
carry; ptx on `sft_train` instead would pull the policy back to forgetting the carry.

The chain-of-thought format (`arithmetic_cot`), one step per column, least significant first:

    347+85=  ->  7+5=12;4+8+1=13;3+0+1=4;#432
    7+5=     ->  7+5=12;#12

A step is `x+y=s;` or `x+y+1=s;` (the `+1` is the carry from the previous column, written
only when there is one); a missing digit of the shorter operand is written `0`; `s` is the
column sum (0..19) in decimal. After the last column, `#` and the sum. The final answer is
extracted with `ANSWER_PATTERN` (`#(-?\\d+)`); `check_cot` checks the whole working. Operands
have 1 to 3 digits (the digit count drawn uniformly), so a response has 1 to 3 steps: from
`0+0=0;#0` (8 characters) to `9+9+1=19;9+9+1=19;9+9=18;#1998` (32).

The CoT demonstrator is weak in the same way as the bare one: in 70% of the sums whose working
takes a carry it forgets every carry (`347+85=` -> `7+5=12;4+8=12;3+0=3;#322`), and a tenth of
the other demonstrations make one slip: one column sum off by one (never out of 0..19), with the
rest of the working carried on consistently from the slip, so the answer is off by ±1, ±10 or
±100. After SFT (1,500 steps) the greedy working forgets the carries on held-out prompts too
(greedy accuracy 0.50, seed 0: right on the carry-free half); RL fixes it, and the right
working is two characters longer a carry, so the response length can move, but only by that.

`arithmetic_cot_free` is `arithmetic_cot` where half the demonstrations skip the working and
give only the sum (`347+85=` -> `#432`, `shortcut_fraction`). The policy chooses at its first
token between a short answer (2 to 5 characters, which the tiny model can hardly compute) and
the working (8 to 32): the task where length is free, for the claims about length (value bias
shortening responses, λ on long responses, token-level aggregation, Dr. GRPO's wrong-answer
length; docs/results.md).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from posttrain.errors import ConfigError

ANSWER_PATTERN = r"#(-?\d+)"
"""The regex that extracts the final answer of a CoT response (group 1)."""

STEP_PATTERN = r"(\d)\+(\d)(\+1)?=(\d{1,2});"
"""One column of CoT working: digit, digit, optional carry, column sum."""

_COT_RE = re.compile(rf"((?:{STEP_PATTERN})+){ANSWER_PATTERN}")
_STEP_RE = re.compile(STEP_PATTERN)


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name}={value}: must be between 0 and 1")


@dataclass(frozen=True)
class ArithmeticConfig:
    """Options of the `arithmetic` task (`posttrain tasks make arithmetic --option KEY=VALUE`)."""

    max_operand: int = 49
    """Operands are drawn from 0..max_operand (both ends included)."""
    eval_fraction: float = 0.1
    """Share of the operand pairs held out for evaluation (never in a training file)."""
    carry_slip_fraction: float = 0.7
    """Share of the SFT training demonstrations with a carry in which the demonstrator
    forgets it, writing each column's digit sum mod 10 (`37+48=` -> `75`), exactly rounded.
    A systematic mistake: SFT learns it as the most likely answer, so the greedy policy
    makes it too, and only a reward for the true sum teaches it away."""
    wrong_fraction: float = 0.1
    """Share of the other SFT training demonstrations whose answer is wrong at random
    (exactly rounded)."""
    max_wrong_offset: int = 10
    """A wrong answer is the true sum moved by 1..max_wrong_offset, up or down (never < 0)."""

    def __post_init__(self) -> None:
        if self.max_operand < 1:
            raise ConfigError(f"max_operand={self.max_operand}: must be at least 1")
        _check_fraction("eval_fraction", self.eval_fraction)
        _check_fraction("carry_slip_fraction", self.carry_slip_fraction)
        _check_fraction("wrong_fraction", self.wrong_fraction)
        if self.max_wrong_offset < 1:
            raise ConfigError(f"max_wrong_offset={self.max_wrong_offset}: must be at least 1")
        n_pairs = (self.max_operand + 1) ** 2
        n_eval = round(self.eval_fraction * n_pairs)
        if n_eval < 1 or n_eval >= n_pairs:
            raise ConfigError(
                f"eval_fraction={self.eval_fraction} holds out {n_eval} of {n_pairs} operand "
                "pairs; choose a value that leaves at least one pair on each side"
            )


@dataclass(frozen=True)
class ArithmeticCotConfig:
    """Options of the `arithmetic_cot` task."""

    max_digits: int = 3
    """Each operand has 1..max_digits digits, the count drawn uniformly (then the value)."""
    n_train: int = 4000
    """Distinct training prompts (SFT and RL share them)."""
    n_eval: int = 200
    """Distinct held-out prompts."""
    carry_slip_fraction: float = 0.7
    """Share of the SFT training demonstrations with a carry in which the demonstrator
    forgets every carry: no `+1` is written and each column sum leaves it out
    (`7+5=12;4+8=12;3+0=3;#322` for 347+85), exactly rounded. A systematic mistake SFT learns
    as the most likely working, which only a reward for the true sum teaches away; the right
    working is longer by two characters a carry, so the response length can move."""
    wrong_fraction: float = 0.1
    """Share of the other SFT training demonstrations with one slip in the working (exactly
    rounded)."""
    shortcut_fraction: float = 0.0
    """Share of the SFT training demonstrations (exactly rounded, drawn after the slips) that
    skip the working and give only `#` and the true sum (`347+85=` -> `#432`). With some, the
    policy chooses at its first token between a short answer it can hardly compute and the
    working: the response length is free to move either way (`arithmetic_cot_free`)."""

    def __post_init__(self) -> None:
        if not 1 <= self.max_digits <= 6:
            raise ConfigError(f"max_digits={self.max_digits}: must be between 1 and 6")
        if self.n_train < 1 or self.n_eval < 1:
            raise ConfigError(f"n_train={self.n_train}, n_eval={self.n_eval}: must be >= 1")
        _check_fraction("carry_slip_fraction", self.carry_slip_fraction)
        _check_fraction("wrong_fraction", self.wrong_fraction)
        _check_fraction("shortcut_fraction", self.shortcut_fraction)
        n_pairs = (10**self.max_digits) ** 2
        if self.n_train + self.n_eval > n_pairs // 2:
            raise ConfigError(
                f"n_train + n_eval = {self.n_train + self.n_eval} is too many for "
                f"{n_pairs} operand pairs with max_digits={self.max_digits}; "
                "lower them or raise max_digits"
            )


@dataclass(frozen=True)
class ArithmeticCotFreeConfig(ArithmeticCotConfig):
    """Options of the `arithmetic_cot_free` task: `arithmetic_cot` where half the
    demonstrations answer without working."""

    shortcut_fraction: float = 0.5


def _prompt(a: int, b: int) -> str:
    return f"{a}+{b}="


def _wrong_sum(true: int, max_offset: int, rng: random.Random) -> int:
    offset = rng.randint(1, max_offset)
    # Moving down below zero would be an impossible answer, so move up instead.
    return true - offset if rng.random() < 0.5 and true - offset >= 0 else true + offset


def _wrong_indices(n: int, fraction: float, rng: random.Random) -> set[int]:
    # An exact count (not a coin per record) so that the share is what was asked for.
    return set(rng.sample(range(n), round(fraction * n)))


def has_carry(a: int, b: int) -> bool:
    """True when adding `a` and `b` column by column carries at least once."""
    return carry_free_sum(a, b) != a + b


def carry_free_sum(a: int, b: int) -> int:
    """`a + b` with every carry forgotten: each column's digit sum mod 10 (`37+48` -> 75)."""
    total, place = 0, 1
    while a or b:
        total += (a % 10 + b % 10) % 10 * place
        a, b, place = a // 10, b // 10, place * 10
    return total


def build_arithmetic(seed: int, config: ArithmeticConfig) -> dict[str, list[dict[str, str]]]:
    """The records of the `arithmetic` files, {file stem: records}; the same for the same seed."""
    rng = random.Random(f"arithmetic/{seed}")
    pairs = [(a, b) for a in range(config.max_operand + 1) for b in range(config.max_operand + 1)]
    rng.shuffle(pairs)
    n_eval = round(config.eval_fraction * len(pairs))
    eval_pairs, train_pairs = pairs[:n_eval], pairs[n_eval:]
    carries = [i for i, (a, b) in enumerate(train_pairs) if has_carry(a, b)]
    slips = {carries[j] for j in _wrong_indices(len(carries), config.carry_slip_fraction, rng)}
    others = [i for i in range(len(train_pairs)) if i not in slips]
    wrong = {others[j] for j in _wrong_indices(len(others), config.wrong_fraction, rng)}
    sft_train = []
    for i, (a, b) in enumerate(train_pairs):
        answer = (carry_free_sum(a, b) if i in slips
                  else _wrong_sum(a + b, config.max_wrong_offset, rng) if i in wrong else a + b)
        sft_train.append({"prompt": _prompt(a, b), "completion": str(answer)})
    ptx_train = [record for (a, b), record in zip(train_pairs, sft_train, strict=True)
                 if not has_carry(a, b) and record["completion"] == str(a + b)]
    return {
        "sft_train": sft_train,
        "ptx_train": ptx_train,
        "sft_eval": [{"prompt": _prompt(a, b), "completion": str(a + b)} for a, b in eval_pairs],
        "rl_train": [{"prompt": _prompt(a, b), "answer": str(a + b)} for a, b in train_pairs],
        "rl_eval": [{"prompt": _prompt(a, b), "answer": str(a + b)} for a, b in eval_pairs],
    }


# ---------------------------------------------------------------------------------------------
# Chain of thought


def cot_steps(a: int, b: int, forget_carries: bool = False) -> list[tuple[int, int, int, int]]:
    """The columns of `a + b`, least significant first, as (digit of a, digit of b, carry in,
    column sum); with `forget_carries`, the working of a demonstrator who never carries
    (every carry in 0, each sum the two digits')."""
    if a < 0 or b < 0:
        raise ConfigError(f"cot_steps({a}, {b}): operands must be non-negative")
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        steps.append((x, y, carry, s))
        carry = 0 if forget_carries else s // 10
    return steps


def cot_has_carry(a: int, b: int) -> bool:
    """True when a column of the working of `a + b` takes a carry in (a `+1` step)."""
    return any(c for _, _, c, _ in cot_steps(a, b))


def cot_completion_forgetting_carries(a: int, b: int) -> str:
    """The working of a demonstrator who forgets every carry, e.g. `7+5=12;4+8=12;3+0=3;#322`
    for 347+85 (the last column's own overflow is kept: `9+9=18;#18`)."""
    steps = cot_steps(a, b, forget_carries=True)
    return f"{_render_steps(steps)}#{_value_of_steps(steps)}"


def _render_steps(steps: list[tuple[int, int, int, int]]) -> str:
    return "".join(f"{x}+{y}{'+1' if c else ''}={s};" for x, y, c, s in steps)


def _value_of_steps(steps: list[tuple[int, int, int, int]]) -> int:
    # The answer the working implies: each column's last digit, plus the last column's carry.
    value = sum((s % 10) * 10**i for i, (_, _, _, s) in enumerate(steps))
    return value + (steps[-1][3] // 10) * 10 ** len(steps)


def cot_completion(a: int, b: int) -> str:
    """The correct working and answer for `a+b=`, e.g. `7+5=12;4+8+1=13;3+0+1=4;#432`."""
    steps = cot_steps(a, b)
    return f"{_render_steps(steps)}#{_value_of_steps(steps)}"


def cot_completion_with_slip(a: int, b: int, rng: random.Random) -> str:
    """A working with one column sum off by one and everything after it consistent with the
    slip, so the answer is wrong by ±10^column."""
    correct = cot_steps(a, b)
    at = rng.randrange(len(correct))
    steps, carry = [], 0
    for i, (x, y, _, _) in enumerate(correct):
        s = x + y + carry
        if i == at:
            # Stay within the sums a column can have (0..19).
            delta = 1 if s == 0 else -1 if s == 19 else rng.choice((-1, 1))
            s += delta
        steps.append((x, y, carry, s))
        carry = s // 10
    return f"{_render_steps(steps)}#{_value_of_steps(steps)}"


def extract_answer(response: str) -> str | None:
    """The final answer of a CoT response (the first match of `ANSWER_PATTERN`), or None."""
    match = re.search(ANSWER_PATTERN, response)
    return match.group(1) if match else None


def check_cot(prompt: str, response: str) -> bool:
    """True when `response` is exactly the correct working and answer for `prompt` (`a+b=`).

    Stricter than the answer reward: every step, carry and the final sum must be right."""
    match = re.fullmatch(r"(\d+)\+(\d+)=", prompt)
    return bool(match) and response == cot_completion(int(match[1]), int(match[2]))


def parse_cot(response: str) -> tuple[list[tuple[int, int, int, int]], int] | None:
    """The steps (digit, digit, carry, sum) and the answer of a well-formed CoT response, or None
    when it does not follow the format (the arithmetic in it is not checked)."""
    match = _COT_RE.fullmatch(response)
    if not match:
        return None
    steps = [(int(x), int(y), int(bool(c)), int(s)) for x, y, c, s in _STEP_RE.findall(match[1])]
    return steps, int(match[len(match.groups())])


def _operand(digits: int, rng: random.Random) -> int:
    return rng.randint(0, 9) if digits == 1 else rng.randint(10 ** (digits - 1), 10**digits - 1)


def build_arithmetic_cot(
    seed: int, config: ArithmeticCotConfig
) -> dict[str, list[dict[str, str]]]:
    """The records of the `arithmetic_cot` files, {file stem: records}; the same for the same
    seed."""
    rng = random.Random(f"arithmetic_cot/{seed}")
    seen: set[tuple[int, int]] = set()
    pairs: list[tuple[int, int]] = []
    while len(pairs) < config.n_train + config.n_eval:
        pair = tuple(_operand(rng.randint(1, config.max_digits), rng) for _ in range(2))
        if pair not in seen:  # distinct pairs, so no held-out prompt is also a training one
            seen.add(pair)
            pairs.append(pair)
    eval_pairs, train_pairs = pairs[: config.n_eval], pairs[config.n_eval :]
    carries = [i for i, (a, b) in enumerate(train_pairs) if cot_has_carry(a, b)]
    slips = {carries[j] for j in _wrong_indices(len(carries), config.carry_slip_fraction, rng)}
    others = [i for i in range(len(train_pairs)) if i not in slips]
    wrong = {others[j] for j in _wrong_indices(len(others), config.wrong_fraction, rng)}
    sft_train = []
    for i, (a, b) in enumerate(train_pairs):
        completion = (cot_completion_forgetting_carries(a, b) if i in slips
                      else cot_completion_with_slip(a, b, rng) if i in wrong
                      else cot_completion(a, b))
        sft_train.append({"prompt": _prompt(a, b), "completion": completion})
    if config.shortcut_fraction:  # a generator of its own: the other files stay as they were
        short_rng = random.Random(f"arithmetic_cot/{seed}/shortcut")
        for i in _wrong_indices(len(train_pairs), config.shortcut_fraction, short_rng):
            a, b = train_pairs[i]
            sft_train[i] = {"prompt": _prompt(a, b), "completion": f"#{a + b}"}
    # PPO-ptx's stand-in for pretraining text, as in `arithmetic`: the right workings without a
    # carry (ptx on sft_train would pull the policy back to forgetting the carries)
    ptx_train = [record for (a, b), record in zip(train_pairs, sft_train, strict=True)
                 if not cot_has_carry(a, b) and record["completion"] == cot_completion(a, b)]
    return {
        "sft_train": sft_train,
        "ptx_train": ptx_train,
        "sft_eval": [
            {"prompt": _prompt(a, b), "completion": cot_completion(a, b)} for a, b in eval_pairs
        ],
        "rl_train": [{"prompt": _prompt(a, b), "answer": str(a + b)} for a, b in train_pairs],
        "rl_eval": [{"prompt": _prompt(a, b), "answer": str(a + b)} for a, b in eval_pairs],
        # Correct working preferred to working with one slip: data for a reward model, whose
        # weights can initialise a critic (the setting of VC-PPO's value-bias analysis).
        "pref_train": [{"prompt": _prompt(a, b), "chosen": cot_completion(a, b),
                        "rejected": cot_completion_with_slip(a, b, rng)} for a, b in train_pairs],
        "pref_eval": [{"prompt": _prompt(a, b), "chosen": cot_completion(a, b),
                       "rejected": cot_completion_with_slip(a, b, rng)} for a, b in eval_pairs],
    }
