r"""Rule rewards: verifiable scores computed from the response text alone.

Every rule is a frozen dataclass called like any reward function,

    scores = rule(prompts, responses, **columns)   # list[float], one score per response

where `columns` are the dataset's other columns (e.g. `answer`) as lists aligned with
`responses`. A rule reads only the columns it names in `required_columns` and ignores the rest,
so one dataset can feed several rules. Rules are plain Python on strings: no torch, no models
(`MathVerify` uses the optional math-verify package, imported only when it is built).

Build them directly (`ExactMatch(extract=r"\\boxed{(.*?)}")`) or by name from a config
(`make_rule_reward("exact_match", extract=...)`); combine them with `WeightedSum` and call them
through `call_reward` for output validation and the error policy (`posttrain.rewards.combine`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, ClassVar

from posttrain.errors import ConfigError, RewardError

Prompt = str | list[dict[str, str]]
"""A prompt: a string, or a list of chat messages {"role", "content"}."""


# --- argument checks (configs come from YAML, so types are checked, not assumed) ---------------


def _check_real(owner: str, name: str, value: object, *, minimum: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"{owner}: {name} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{owner}: {name} must be ≥ {minimum}, got {value!r}")


def _check_bool(owner: str, name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{owner}: {name} must be true or false, got {value!r}")


def _check_column(owner: str, value: object) -> None:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{owner}: column must be a non-empty column name, got {value!r}")


def _compile(owner: str, name: str, pattern: object, *, need_group: bool) -> re.Pattern[str]:
    if not isinstance(pattern, str):
        raise ConfigError(f"{owner}: {name} must be a regular expression string, got {pattern!r}")
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise ConfigError(f"{owner}: {name} {pattern!r} is not a valid regex: {err}") from None
    if need_group and regex.groups < 1:
        raise ConfigError(
            f"{owner}: {name} {pattern!r} has no group; wrap the part to compare in parentheses, "
            r"e.g. r'\\boxed{(.*?)}'"
        )
    return regex


def _set(obj: object, name: str, value: object) -> None:
    # Frozen dataclasses cache derived values (compiled regexes) through object.__setattr__.
    object.__setattr__(obj, name, value)


# --- reading columns and responses -----------------------------------------------------------


def _column(
    owner: str, columns: Mapping[str, Sequence[Any]], name: str, n: int
) -> Sequence[Any]:
    """The column `name`, checked to be present and aligned with the `n` responses."""
    if name not in columns:
        present = ", ".join(sorted(columns)) or "none"
        raise RewardError(
            f"{owner} needs the column {name!r}, but the reward function got the columns: "
            f"{present}. Add {name!r} to the dataset records, or set column= to the column that "
            "holds the reference answer."
        )
    values = columns[name]
    if len(values) != n:
        raise RewardError(
            f"{owner}: column {name!r} has {len(values)} values for {n} responses; columns must "
            "be aligned with the responses (repeat each prompt's row once per sample)"
        )
    return values


def _last_capture(regex: re.Pattern[str], text: str) -> str | None:
    """Group 1 of the LAST match of `regex` in `text`, or None when nothing matches.

    The last match, because models restate the question or draft answers before the final one
    ("... so \\boxed{12} is wrong; the answer is \\boxed{14}").
    """
    last = None
    for match in regex.finditer(text):
        last = match
    return None if last is None else last.group(1)


# A number as models write it: an optional sign, an integer part with optional thousands
# separators, optional decimals and an optional exponent. A minus right after a word character
# or a closing bracket is subtraction or a hyphen ("12-4", "f(x)-2"), not a sign.
_NUMBER = re.compile(
    r"(?:(?<![\w)\]])-)?"
    r"(?:[0-9]{1,3}(?:,[0-9]{3})+(?![0-9]|,[0-9])|[0-9]+)"
    r"(?:\.[0-9]+)?"
    r"(?:[eE][-+]?[0-9]+)?"
)


def last_number(text: str) -> float | None:
    """The last number written in `text` as a float, or None when there is none.

    "so 3 + 4 = 7." -> 7.0; "a loss of -2.5" -> -2.5; "1,250 apples" -> 1250.0;
    "12-4" -> 4.0 (the minus follows a digit, so it is subtraction, not a sign).
    """
    last = None
    for match in _NUMBER.finditer(text):
        last = match
    if last is None:
        return None
    # A huge exponent ("1e999") gives inf, which then matches no finite answer.
    return float(last.group(0).replace(",", ""))


def _answer_number(owner: str, column: str, value: object) -> float:
    """The reference answer as a float; a bad reference is a data problem, so it raises."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"[-+]?[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]+)?", text):
            text = text.replace(",", "")
        try:
            return float(text)
        except ValueError:
            pass
    raise RewardError(
        f"{owner}: the {column!r} value {value!r} is not a number; NumericAnswer needs numeric "
        "reference answers (use ExactMatch to compare text)"
    )


# --- the rules --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExactMatch:
    """`score` when the response equals the reference answer, else 0.

    The compared text is the whole response, or with `extract` the text captured by group 1 of
    the LAST match of `extract` in the response (no match scores 0). The answer is compared as
    `str(answer)`, so an answer 42 matches "42" but 42.0 does not match "42"; use
    `NumericAnswer` for numbers.
    """

    column: str = "answer"
    """The column that holds the reference answer."""
    extract: str | None = None
    r"""A regex with a group, e.g. r"\\boxed{(.*?)}" or r"####\s*(.+)"; None compares the
    whole response."""
    strip: bool = True
    """Strip surrounding whitespace from both sides before comparing."""
    score: float = 1.0
    """The score of a match (a miss scores 0)."""

    _regex: re.Pattern[str] | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        _check_column("ExactMatch", self.column)
        if self.extract is not None:
            _set(self, "_regex", _compile("ExactMatch", "extract", self.extract, need_group=True))
        _check_bool("ExactMatch", "strip", self.strip)
        _check_real("ExactMatch", "score", self.score)

    @property
    def required_columns(self) -> tuple[str, ...]:
        """The columns this rule reads (checked before it is called)."""
        return (self.column,)

    def __call__(
        self, prompts: Sequence[Prompt], responses: Sequence[str], **columns: Sequence[Any]
    ) -> list[float]:
        answers = _column("ExactMatch", columns, self.column, len(responses))
        scores = []
        for response, answer in zip(responses, answers, strict=True):
            if answer is None:
                raise RewardError(
                    f"ExactMatch: a {self.column!r} value is missing (None); give every record "
                    "a reference answer"
                )
            text = response if self._regex is None else _last_capture(self._regex, response)
            target = str(answer)
            if text is not None and self.strip:
                text, target = text.strip(), target.strip()
            scores.append(float(self.score) if text == target else 0.0)
        return scores


@dataclass(frozen=True)
class NumericAnswer:
    """1 when the last number in the response is within `tolerance` of the answer, else 0.

    The response's LAST number is read ("37 + 48 = 85" reads 85), with `extract` the last
    number inside group 1 of the LAST match of `extract`. Integers, decimals, negatives,
    thousands separators ("1,250") and exponents ("1e-3") are understood. A response without a
    number (or without a match of `extract`) scores 0. A reference answer that is not a number
    raises `RewardError`: that is a data problem, not a wrong response.
    """

    column: str = "answer"
    """The column that holds the reference answer (a number, or a string holding one)."""
    tolerance: float = 1e-6
    """Absolute tolerance: correct when |x − answer| ≤ tolerance."""
    extract: str | None = None
    """A regex with a group that locates the final answer, e.g. r"####(.*)"; None reads the
    whole response."""

    _regex: re.Pattern[str] | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        _check_column("NumericAnswer", self.column)
        _check_real("NumericAnswer", "tolerance", self.tolerance, minimum=0.0)
        if self.extract is not None:
            _set(self, "_regex", _compile("NumericAnswer", "extract", self.extract,
                                          need_group=True))

    @property
    def required_columns(self) -> tuple[str, ...]:
        """The columns this rule reads (checked before it is called)."""
        return (self.column,)

    def __call__(
        self, prompts: Sequence[Prompt], responses: Sequence[str], **columns: Sequence[Any]
    ) -> list[float]:
        answers = _column("NumericAnswer", columns, self.column, len(responses))
        scores = []
        for response, answer in zip(responses, answers, strict=True):
            target = _answer_number("NumericAnswer", self.column, answer)
            text = response if self._regex is None else _last_capture(self._regex, response)
            x = None if text is None else last_number(text)
            # `<=` is False for nan and for inf − inf, so those score 0 as they should.
            scores.append(1.0 if x is not None and abs(x - target) <= self.tolerance else 0.0)
        return scores


@dataclass(frozen=True)
class FormatRegex:
    r"""`score` when the response has the expected format, else 0.

    With `full_match` the whole response must match `pattern` (`re.fullmatch`), otherwise a
    match anywhere counts (`re.search`). `.` does not match a newline unless the pattern turns
    on DOTALL inline, e.g. r"(?s)<think>.*</think>\s*<answer>.*</answer>".
    """

    pattern: str
    """The regular expression the response must match."""
    score: float = 1.0
    """The score of a match (a miss scores 0)."""
    full_match: bool = True
    """Match the whole response (True) or anywhere in it (False)."""

    _regex: re.Pattern[str] | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        _set(self, "_regex", _compile("FormatRegex", "pattern", self.pattern, need_group=False))
        _check_real("FormatRegex", "score", self.score)
        _check_bool("FormatRegex", "full_match", self.full_match)

    required_columns: ClassVar[tuple[str, ...]] = ()

    def __call__(
        self, prompts: Sequence[Prompt], responses: Sequence[str], **columns: Sequence[Any]
    ) -> list[float]:
        match = self._regex.fullmatch if self.full_match else self._regex.search
        return [float(self.score) if match(response) else 0.0 for response in responses]


@dataclass(frozen=True)
class LengthPenalty:
    """DAPO's soft overlong punishment (Yu et al. 2025, "DAPO", Eq. 13).

    With L the response length, L_max = `max_length` and L_cache = `cache_length`:

        R(y) = 0                                    if L ≤ L_max − L_cache
             = ((L_max − L_cache) − L) / L_cache · penalty
                                                    if L_max − L_cache < L ≤ L_max
             = −penalty                             if L > L_max

    so the penalty grows linearly from 0 to −penalty over the last L_cache units before L_max.
    DAPO adds it to the correctness reward (a `WeightedSum` term of weight 1).

    Lengths are counted in characters (`unit="chars"`, Python `len`, i.e. code points). Token
    lengths need the tokenizer and are applied by the trainer, which knows the response tokens.
    """

    max_length: int
    """L_max: responses longer than this get −penalty."""
    cache_length: int
    """L_cache: the width of the linear ramp before L_max (0 < cache_length ≤ max_length)."""
    penalty: float = 1.0
    """The size of the full punishment (≥ 0)."""
    unit: str = "chars"
    """How length is counted; only "chars" here (tokens: see the class docstring)."""

    required_columns: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        for name in ("max_length", "cache_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(
                    f"LengthPenalty: {name} must be a positive integer, got {value!r}"
                )
        if self.cache_length > self.max_length:
            raise ConfigError(
                f"LengthPenalty: cache_length ({self.cache_length}) must be ≤ max_length "
                f"({self.max_length}); the ramp lies inside the allowed length"
            )
        _check_real("LengthPenalty", "penalty", self.penalty, minimum=0.0)
        if self.unit != "chars":
            raise ConfigError(
                f"LengthPenalty: unit {self.unit!r} is not supported; only 'chars' is. "
                "Token-length penalties are applied by the trainer (it has the tokenizer)"
            )

    def __call__(
        self, prompts: Sequence[Prompt], responses: Sequence[str], **columns: Sequence[Any]
    ) -> list[float]:
        safe = self.max_length - self.cache_length
        scores = []
        for response in responses:
            length = len(response)
            if length <= safe:
                scores.append(0.0)
            elif length <= self.max_length:
                scores.append((safe - length) / self.cache_length * self.penalty)
            else:
                scores.append(-float(self.penalty))
        return scores


# --- math answers through math-verify (optional) -----------------------------------------------

MATH_EXTRACT = ("boxed", "latex", "expr")
"""The ways `MathVerify` can read an answer from a response (see `MathVerify.extract`)."""

_MATH_EXTRA = "pip install 'posttrain[math]'"
# A delimiter that marks a reference answer as LaTeX text already: an unescaped $, \( or \[,
# or a \boxed{}. Anything else is the bare answer and is read as if it were boxed.
_MATH_DELIMITED = re.compile(r"(?<!\\)\$|\\\(|\\\[|\\boxed")
# A plain number with an exponent: math-verify reads "1e-3" as the expression 1·e − 3.
_EXPONENT_NUMBER = re.compile(r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+")


def _math_verify() -> Any:
    """The math_verify module, or a one-line ConfigError naming the extra to install."""
    try:
        import math_verify
    except ImportError:
        raise ConfigError(
            f"MathVerify needs the math-verify package, which is not installed: {_MATH_EXTRA}"
        ) from None
    return math_verify


def _decimal_text(text: str) -> str:
    """A number in positional notation: "1e-3" -> "0.001", "2.5E2" -> "250"."""
    return format(Decimal(text), "f")


@dataclass(frozen=True)
class MathVerify:
    r"""`score` when the response's final answer equals the reference answer mathematically.

    Uses Hugging Face's math-verify (`pip install 'posttrain[math]'`): the answer is read from
    the response (`\boxed{}`, LaTeX, plain numbers, as `extract` says), both sides are parsed
    into SymPy and compared as numbers, expressions, sets, intervals, equations or matrices, so
    `\boxed{\frac{1}{2}}` matches 0.5, `2\sqrt{2}` matches `\sqrt{8}`, `1/2` matches `\frac12`.
    Numbers are compared after rounding to 6 decimals: 1/3 matches 0.333333 but not 0.33.

    The reference answer (`column`) is the bare answer ("0.5", r"\frac12", "(1, 2]", 42),
    read as if it were written `\boxed{...}`, or LaTeX text with its delimiters (`$...$`,
    `\(...\)`, `\boxed{}`), from which the final answer is read as from a response (a MATH
    solution, for instance).

    A response in which no answer can be read and parsed, or whose parse or comparison runs
    out of `timeout`, raises `RewardError`, as does a reference answer that is missing or
    cannot be parsed: `reward.on_error` then decides (stop the run, or score the sample
    `error_score` and count it). math-verify's reading, worth knowing:
    - several bare `\boxed{}` in one response are read together as a set: "\boxed{12} ... no,
      \boxed{14}" is {12, 14}, which matches neither 12 nor 14;
    - an answer after "answer" or "final answer is" comes before the last number: "The answer
      is 12. Actually 14." reads 12;
    - a percentage matches both its value and its number: `50\%` matches 0.5 and 50;
    - words become products of symbols: `\boxed{Evelyn}` matches "Evelyn" but not "evelyn";
      `\text{Evelyn}` is read in lowercase.
    """

    column: str = "answer"
    """The column that holds the reference answer."""
    extract: tuple[str, ...] | str = ("latex", "expr")
    r"""How the answer is read from a response, one or more of:
    - "latex": LaTeX math: $...$, \(...\), \[...\], \boxed{...}, \frac{a}{b};
    - "boxed": LaTeX in \boxed{} or after "answer" / "final answer is" only (not with "latex");
    - "expr": plain numbers and arithmetic ("42", "1,250", "1/2", "15%").
    Whatever the ways, math-verify looks first for an answer after "final answer is" or in
    \boxed{} ("boxed" puts \boxed{} alone first), then for one after "answer", then for any
    ("boxed" reads no other LaTeX); among equals the last in the response wins, and the first
    that parses is the answer."""
    timeout: int | None = 5
    r"""Seconds allowed for parsing a response, and again for the comparison (math-verify's
    own limit, set with SIGALRM, so it works in the main thread only); None: no limit, in any
    thread, but an answer like \boxed{9^{9^{9^{9}}}} then never finishes."""
    score: float = 1.0
    """The score of a match (a wrong answer scores 0)."""

    def __post_init__(self) -> None:
        _check_column("MathVerify", self.column)
        extract = (self.extract,) if isinstance(self.extract, str) else self.extract
        if not isinstance(extract, (tuple, list)) or not extract:
            raise ConfigError(
                f"MathVerify: extract must be one or more of {', '.join(MATH_EXTRACT)}, "
                f"got {self.extract!r}"
            )
        for way in extract:
            if way not in MATH_EXTRACT:
                close = difflib.get_close_matches(str(way), MATH_EXTRACT, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(
                    f"MathVerify: extract {way!r} is unknown{hint}; use one or more of "
                    f"{', '.join(MATH_EXTRACT)}"
                )
        if len(set(extract)) != len(extract):
            raise ConfigError(f"MathVerify: extract {list(extract)!r} names a way twice")
        if "boxed" in extract and "latex" in extract:
            raise ConfigError(
                "MathVerify: extract has both 'boxed' and 'latex'; 'latex' already reads "
                r"\boxed{} answers, 'boxed' reads only those: choose one"
            )
        _set(self, "extract", tuple(extract))
        if self.timeout is not None and (
            isinstance(self.timeout, bool) or not isinstance(self.timeout, int)
            or self.timeout <= 0
        ):
            raise ConfigError(
                f"MathVerify: timeout must be a positive whole number of seconds or null (no "
                f"limit), got {self.timeout!r}"
            )
        _check_real("MathVerify", "score", self.score)
        _math_verify()  # fail at build time, not at the first batch

    @property
    def required_columns(self) -> tuple[str, ...]:
        """The columns this rule reads (checked before it is called)."""
        return (self.column,)

    def __call__(
        self, prompts: Sequence[Prompt], responses: Sequence[str], **columns: Sequence[Any]
    ) -> list[float]:
        answers = _column("MathVerify", columns, self.column, len(responses))
        if self.timeout is not None and threading.current_thread() is not threading.main_thread():
            raise RewardError(
                f"MathVerify: timeout={self.timeout} works in the main thread only (math-verify "
                "times out with SIGALRM), and this call runs in another thread; call the reward "
                "from the main thread, or set timeout: null to run without a time limit"
            )
        mv = _math_verify()
        configs = {
            "latex": mv.LatexExtractionConfig(),
            "boxed": mv.LatexExtractionConfig(boxed_match_priority=0,
                                              try_extract_without_anchor=False),
            "expr": mv.ExprExtractionConfig(),
        }
        read_response = [configs[way] for way in self.extract]
        read_gold = [configs["latex"], configs["expr"]]
        golds: dict[str, Any] = {}  # each prompt's answer repeats once per sample: parse it once
        scores = []
        for response, answer in zip(responses, answers, strict=True):
            text = self._gold_text(answer)
            if text not in golds:
                gold = self._parse(mv, text, read_gold)
                if gold is None:
                    raise RewardError(
                        f"MathVerify: math-verify cannot parse the {self.column!r} value "
                        f"{answer!r:.80}; give the reference answer as a number or LaTeX "
                        r"(e.g. 0.5, \frac{1}{2}, (1, 2])"
                    )
                golds[text] = gold
            found = self._parse(mv, response, read_response)
            if found is None:
                raise RewardError(
                    f"MathVerify: no answer it can parse in the response (extract: "
                    f"{', '.join(self.extract)})"
                )
            scores.append(float(self.score) if self._equal(mv, golds[text], found) else 0.0)
        return scores

    def _gold_text(self, answer: object) -> str:
        """The reference answer as text that math-verify parses as the answer itself."""
        if answer is None:
            raise RewardError(
                f"MathVerify: a {self.column!r} value is missing (None); give every record a "
                "reference answer"
            )
        if isinstance(answer, numbers.Real) and not isinstance(answer, bool):
            if not math.isfinite(answer):
                raise RewardError(
                    f"MathVerify: the {self.column!r} value {answer!r} is not a finite number"
                )
            text = str(answer) if isinstance(answer, numbers.Integral) else repr(float(answer))
        elif isinstance(answer, str):
            text = answer.strip()
        else:
            raise RewardError(
                f"MathVerify: the {self.column!r} value {answer!r:.80} is a "
                f"{type(answer).__name__}; give the reference answer as a string or a number"
            )
        if _EXPONENT_NUMBER.fullmatch(text):
            if abs(Decimal(text).adjusted()) > 400:  # written out, "1e999999999" fills memory
                raise RewardError(
                    f"MathVerify: the {self.column!r} value {answer!r} is too large or too small "
                    "a number to compare"
                )
            text = _decimal_text(text)
        if not text:
            raise RewardError(f"MathVerify: a {self.column!r} value is empty")
        return text if _MATH_DELIMITED.search(text) else f"\\boxed{{{text}}}"

    def _parse(self, mv: Any, text: str, configs: list[Any]) -> Any:
        """The one answer math-verify reads from `text`, or None when it reads none."""
        from math_verify.errors import TimeoutException

        try:
            # no_fallback: an answer that does not parse is no answer, not a string to compare
            found = mv.parse(text, extraction_config=configs, fallback_mode="no_fallback",
                             parsing_timeout=self.timeout, raise_on_error=True)
        except TimeoutException:  # a BaseException: it would escape reward.on_error
            raise RewardError(
                f"MathVerify: parsing took longer than timeout={self.timeout}s"
            ) from None
        except Exception as err:
            raise RewardError(
                f"MathVerify: math-verify failed to parse: {type(err).__name__}: {err}"
            ) from err
        return found[0] if found else None

    def _equal(self, mv: Any, gold: Any, found: Any) -> bool:
        from math_verify.errors import TimeoutException

        try:
            return bool(mv.verify(gold, found, timeout_seconds=self.timeout,
                                  raise_on_error=True))
        except TimeoutException:
            raise RewardError(
                f"MathVerify: comparing the answers took longer than timeout={self.timeout}s"
            ) from None
        except Exception as err:
            raise RewardError(
                f"MathVerify: math-verify failed to compare the answers: "
                f"{type(err).__name__}: {err}"
            ) from err


# --- by name, for configs ---------------------------------------------------------------------

RULE_REWARDS: dict[str, type] = {
    "exact_match": ExactMatch,
    "numeric_answer": NumericAnswer,
    "format_regex": FormatRegex,
    "length_penalty": LengthPenalty,
    "math_verify": MathVerify,
}
"""Rule rewards by the name a config uses."""


def make_rule_reward(name: str, **kwargs: Any) -> Any:
    """Build the rule reward `name` (a key of `RULE_REWARDS`) with its arguments.

    Raises `ConfigError` for an unknown name (with the closest known one), an unknown or
    missing argument (with the valid ones) and a bad argument value.
    """
    if name not in RULE_REWARDS:
        known = sorted(RULE_REWARDS)
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown rule reward {name!r}; known: {', '.join(known)}.{hint}")
    cls = RULE_REWARDS[name]
    params = [f for f in dataclasses.fields(cls) if f.init]
    valid = [f.name for f in params]
    for key in kwargs:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"rule reward {name!r} has no argument {key!r}{hint}; valid arguments: "
                f"{', '.join(valid)}"
            )
    missing = [
        f.name for f in params
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        and f.name not in kwargs
    ]
    if missing:
        raise ConfigError(
            f"rule reward {name!r} needs the argument(s) {', '.join(map(repr, missing))}; "
            f"valid arguments: {', '.join(valid)}"
        )
    return cls(**kwargs)
