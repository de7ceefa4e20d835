"""Calling reward functions safely, summing them, and loading the ones users write.

- `call_reward(fn, prompts, responses, columns, on_error=...)` calls one reward function and
  checks that it returned one finite number per response. The error policy says what happens
  when it raises or returns something else: "raise" stops with a `RewardError` that names the
  function and the sample, "score" gives the failing samples `error_score` and counts them.
- `WeightedSum` adds weighted terms, Σ_k w_k · r_k per sample, and keeps every term's scores so
  the trainer can log each one.
- `load_reward_function("package.module:function")` or `("path/to/file.py:function")` imports
  a user's reward function by name (importlib; nothing is ever `eval`ed).

Two calling conventions are accepted, so a reward function written for TRL works unchanged:

- posttrain's: `fn(prompts, responses, **columns)`, prompts and response texts by position.
- TRL's: `fn(prompts=..., completions=..., **columns)` by keyword (plus `completion_ids=` when
  the caller has the token ids). A chat prompt's completion is then the message list
  `[{"role": "assistant", "content": text}]`, as TRL passes it; a string prompt's is the text.

The rule (`calling_convention`, read from the signature once per function): a function is
called TRL's way when it has a parameter named `completions`, or when it takes no positional
parameter but does take `**kwargs` (`def f(**kwargs)`); every other function, among them
anything with a positional `responses` or `*args`, is called posttrain's way. A TRL-style
function without `**kwargs` is given only the arguments and columns it names.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib
import importlib.util
import inspect
import math
import numbers
import re
import sys
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from posttrain.errors import ConfigError, RewardError
from posttrain.rewards.rules import Prompt

RewardFn = Callable[..., Sequence[float]]
"""(prompts, responses, **columns) -> one score per response."""

ON_ERROR = ("raise", "score")
"""The error policies of `call_reward` and `WeightedSum`."""

SNIPPET_CHARS = 200
"""How much of a prompt or response an error message shows."""

# The arguments of each convention; a column of the same name would clash.
_RESERVED_COLUMNS = ("prompts", "responses")
_TRL_ARGUMENTS = ("prompts", "completions", "completion_ids")


# --- messages ---------------------------------------------------------------------------------


def describe(fn: object) -> str:
    """A short name for a reward function in messages: its qualified name, or its repr for a
    callable object (a rule's repr shows its class and settings)."""
    if isinstance(fn, functools.partial):
        return f"partial({describe(fn.func)})"
    if inspect.isfunction(fn) or inspect.ismethod(fn) or inspect.isbuiltin(fn):
        return fn.__qualname__
    return _snippet(repr(fn))


def _snippet(value: object, limit: int = SNIPPET_CHARS) -> str:
    """The first `limit` characters of a prompt (string or chat messages) or response."""
    if isinstance(value, list) and all(isinstance(m, Mapping) for m in value):
        text = "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in value)
    else:
        text = str(value)
    if len(text) > limit:
        return f"{text[:limit]}… [{len(text)} chars]"
    return text


def _sample_message(
    name: str, index: int, n: int, reason: str, prompt: Prompt, response: str
) -> str:
    return (
        f"reward function {name} failed on sample {index} (of {n}): {reason}\n"
        f"  prompt:   {_snippet(prompt)!r}\n"
        f"  response: {_snippet(response)!r}\n"
        "Fix the reward function, or set on_error='score' to give failing samples error_score "
        "and count them."
    )


# --- calling conventions ---------------------------------------------------------------------


@dataclass(frozen=True)
class Convention:
    """How to call one reward function (see the module docstring for the rule)."""

    trl: bool
    """True: by keyword, `fn(prompts=, completions=, **columns)`; False: `fn(prompts, responses,
    **columns)`."""
    accepts: frozenset[str] | None = None
    """TRL style: the keyword arguments it takes; None when it takes `**kwargs`."""
    required: tuple[str, ...] = ()
    """TRL style: the parameters it needs (no default)."""


_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
               inspect.Parameter.VAR_POSITIONAL)
_CONVENTIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def calling_convention(fn: RewardFn) -> Convention:
    """How `fn` is called: TRL's way when its signature has a `completions` parameter, or no
    positional parameter but `**kwargs`; posttrain's way otherwise (and when the signature
    cannot be read). Cached per function."""
    try:
        return _CONVENTIONS[fn]
    except (KeyError, TypeError):  # not seen yet, or not hashable / weak-referenceable
        pass
    convention = _read_convention(fn)
    try:
        _CONVENTIONS[fn] = convention
    except TypeError:
        pass
    return convention


def _read_convention(fn: RewardFn) -> Convention:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: the positional contract
        return Convention(trl=False)
    names = {p.name for p in params}
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    positional = any(p.kind in _POSITIONAL for p in params)
    if "completions" not in names and (positional or not var_kw):
        return Convention(trl=False)
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return Convention(
        trl=True,
        accepts=None if var_kw else frozenset(p.name for p in params if p.kind in keyword),
        required=tuple(p.name for p in params
                       if p.kind in keyword and p.default is inspect.Parameter.empty),
    )


def _completions(prompts: Sequence[Prompt], responses: Sequence[Any]) -> list[Any]:
    """TRL's completions: a chat prompt's response as the assistant message it is."""
    return [[{"role": "assistant", "content": r}] if isinstance(p, list) and isinstance(r, str)
            else r for p, r in zip(prompts, responses, strict=True)]


def _invoke(fn: RewardFn, prompts: Sequence[Prompt], responses: Sequence[str],
            columns: Mapping[str, Sequence[Any]],
            completion_ids: Sequence[Sequence[int]] | None) -> Any:
    """`fn` called in its own convention."""
    convention = calling_convention(fn)
    if not convention.trl:
        return fn(prompts, responses, **columns)
    kwargs: dict[str, Any] = {"prompts": prompts, "completions": _completions(prompts, responses)}
    if completion_ids is not None:
        kwargs["completion_ids"] = completion_ids
    kwargs.update(columns)
    if convention.accepts is not None:
        kwargs = {k: v for k, v in kwargs.items() if k in convention.accepts}
    return fn(**kwargs)


# --- calling one reward function --------------------------------------------------------------


@dataclass(frozen=True)
class _Outcome:
    """What one call of a reward function gave."""

    scores: list[float | None] | None  # one entry per response (None = invalid), or None
    problem: str | None = None  # why the whole call failed (raised, wrong type or length)
    cause: Exception | None = None  # the exception it raised, if it raised
    bad: dict[int, str] = field(default_factory=dict)  # sample index -> what is wrong with it


def _as_score(value: object) -> float | None:
    """`value` as a finite float, or None. Accepts Python and NumPy numbers and 0-d tensors
    (anything `float()` takes, except strings)."""
    if value is None or isinstance(value, (str, bytes)):
        return None
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return None
    return x if math.isfinite(x) else None


def _attempt(
    fn: RewardFn,
    prompts: Sequence[Prompt],
    responses: Sequence[str],
    columns: Mapping[str, Sequence[Any]],
    completion_ids: Sequence[Sequence[int]] | None = None,
) -> _Outcome:
    n = len(responses)
    try:
        result = _invoke(fn, prompts, responses, columns, completion_ids)
    except Exception as err:  # any failure of user code is subject to the error policy
        return _Outcome(None, f"raised {type(err).__name__}: {err}", err)
    if hasattr(result, "tolist") and not isinstance(result, (list, tuple)):
        result = result.tolist()  # a NumPy array or a tensor, without importing either
    if not isinstance(result, (list, tuple)):
        return _Outcome(
            None, f"returned {type(result).__name__} {result!r:.80}, not a list of scores"
        )
    if len(result) != n:
        return _Outcome(
            None, f"returned {len(result)} scores for {n} responses; return one per response"
        )
    scores = [_as_score(v) for v in result]
    bad = {
        i: f"returned {v!r:.80} ({type(v).__name__}); scores must be finite numbers"
        for i, (v, x) in enumerate(zip(result, scores, strict=True))
        if x is None
    }
    return _Outcome(scores, bad=bad)


def _row(columns: Mapping[str, Sequence[Any]], i: int) -> dict[str, list[Any]]:
    return {k: [v[i]] for k, v in columns.items()}


def _one(ids: Sequence[Sequence[int]] | None, i: int) -> list[Sequence[int]] | None:
    return None if ids is None else [ids[i]]


def _check_inputs(
    name: str,
    fn: RewardFn,
    prompts: Sequence[Prompt],
    responses: Sequence[str],
    columns: Mapping[str, Sequence[Any]],
    completion_ids: Sequence[Sequence[int]] | None = None,
) -> None:
    # Misaligned inputs are the caller's bug, not the reward function's: they always raise.
    n = len(responses)
    if len(prompts) != n:
        raise RewardError(
            f"reward function {name}: got {len(prompts)} prompts for {n} responses; repeat each "
            "prompt once per sampled response"
        )
    if completion_ids is not None and len(completion_ids) != n:
        raise RewardError(
            f"reward function {name}: got {len(completion_ids)} completion_ids for {n} responses"
        )
    convention = calling_convention(fn)
    reserved = _TRL_ARGUMENTS if convention.trl else _RESERVED_COLUMNS
    for key, values in columns.items():
        if key in reserved:
            raise RewardError(
                f"reward function {name}: a dataset column is named {key!r}, which clashes with "
                f"the argument of that name; rename the column"
            )
        if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
            raise RewardError(
                f"reward function {name}: column {key!r} must be a list with one value per "
                f"response, got {type(values).__name__}"
            )
        if len(values) != n:
            raise RewardError(
                f"reward function {name}: column {key!r} has {len(values)} values for {n} "
                "responses; columns must be aligned with the responses"
            )
    # A missing column fails every sample alike; scoring them all `error_score` would hide a
    # configuration mistake, so it raises whatever the error policy.
    missing = [c for c in getattr(fn, "required_columns", ()) if c not in columns]
    if missing:
        raise RewardError(
            f"reward function {name} needs the column(s) {', '.join(map(repr, missing))}, but "
            f"the dataset has: {', '.join(sorted(columns)) or 'no extra columns'}. Add them to "
            "the records, or point the reward at the right column (column=...)."
        )
    given = {"prompts", "completions", *columns} | ({"completion_ids"} if completion_ids
                                                     is not None else set())
    unknown = [p for p in convention.required if p not in given]
    if unknown:
        raise RewardError(
            f"reward function {name} (called TRL's way, by keyword) needs the argument(s) "
            f"{', '.join(map(repr, unknown))}, which are neither prompts, completions, "
            f"completion_ids{' (not available here)' if completion_ids is None else ''} nor a "
            f"column of the dataset (it has: {', '.join(sorted(columns)) or 'no extra columns'}); "
            "add the column, or give the argument a default"
        )


def call_reward(
    fn: RewardFn,
    prompts: Sequence[Prompt],
    responses: Sequence[str],
    columns: Mapping[str, Sequence[Any]] | None = None,
    *,
    on_error: str = "raise",
    error_score: float = 0.0,
    name: str | None = None,
    completion_ids: Sequence[Sequence[int]] | None = None,
) -> tuple[list[float], int]:
    """Score `responses` with `fn` and check the result.

    A valid result is one finite number per response (a list, tuple, NumPy array or tensor).
    Raising, returning the wrong number of scores, a non-number, NaN or ±inf are errors:

    - `on_error="raise"`: raise `RewardError` naming the function, the failing sample's index,
      the start of its prompt and response, and the reason, chained (`from`) to the exception
      the function raised. When the batch call raised, the function is called again on one
      sample at a time to find the first sample that fails.
    - `on_error="score"`: failing samples get `error_score` and are counted. Invalid values in a
      result of the right length are replaced directly; when the call raised or returned the
      wrong length, each sample is scored alone to find the ones that fail.

    Misaligned inputs (prompts, responses and columns of different lengths) and columns named in
    `fn.required_columns` but absent always raise `RewardError`: no sample can be scored.

    Args:
        fn: the reward function, called as `fn(prompts, responses, **columns)`, or TRL's way
            `fn(prompts=, completions=, **columns)` (see `calling_convention`).
        prompts: (B,) prompts, strings or chat-message lists, one per response.
        responses: (B,) response texts.
        columns: the dataset's other columns by name, each (B,) aligned with `responses`.
        on_error: "raise" or "score".
        error_score: the score of a failing sample with `on_error="score"`.
        name: how messages name `fn` (default: `describe(fn)`).
        completion_ids: (B,) the responses' token ids, passed to TRL-style functions only.

    Returns:
        (scores, n_errors): B floats, and how many samples got `error_score`.
    """
    if on_error not in ON_ERROR:
        raise ConfigError(f"on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
    if (
        isinstance(error_score, bool)
        or not isinstance(error_score, numbers.Real)
        or not math.isfinite(error_score)
    ):
        raise ConfigError(f"error_score must be a finite number, got {error_score!r}")
    name = describe(fn) if name is None else name
    columns = dict(columns or {})
    _check_inputs(name, fn, prompts, responses, columns, completion_ids)
    n = len(responses)
    if n == 0:
        return [], 0

    outcome = _attempt(fn, prompts, responses, columns, completion_ids)
    if outcome.scores is not None and not outcome.bad:
        return [float(x) for x in outcome.scores], 0  # type: ignore[arg-type] (none invalid)
    if on_error == "raise":
        _raise(name, fn, prompts, responses, columns, outcome, completion_ids)

    if outcome.scores is not None:  # the right length with a few bad values: keep the rest
        filled = [float(error_score) if x is None else x for x in outcome.scores]
        return filled, len(outcome.bad)
    scores, n_errors = [], 0
    for i in range(n):
        one = _attempt(fn, [prompts[i]], [responses[i]], _row(columns, i),
                       _one(completion_ids, i))
        if one.scores is not None and not one.bad:
            scores.append(float(one.scores[0]))  # type: ignore[arg-type] (not invalid)
        else:
            scores.append(float(error_score))
            n_errors += 1
    return scores, n_errors


def _raise(
    name: str,
    fn: RewardFn,
    prompts: Sequence[Prompt],
    responses: Sequence[str],
    columns: Mapping[str, Sequence[Any]],
    outcome: _Outcome,
    completion_ids: Sequence[Sequence[int]] | None = None,
) -> None:
    n = len(responses)
    if outcome.bad:  # invalid values: the result itself says which samples
        i = min(outcome.bad)
        raise RewardError(
            _sample_message(name, i, n, outcome.bad[i], prompts[i], responses[i])
        )
    if outcome.cause is None:  # wrong type or length: no single sample is to blame
        raise RewardError(
            f"reward function {name} {outcome.problem} (scoring {n} responses). A reward "
            "function returns a list with one finite number per response."
        )
    # It raised: call it on one sample at a time to point at the first sample that fails.
    for i in range(n):
        one = outcome if n == 1 else _attempt(fn, [prompts[i]], [responses[i]],
                                              _row(columns, i), _one(completion_ids, i))
        if one.problem is not None or one.bad:
            reason = one.problem if one.problem is not None else one.bad[0]
            cause = one.cause if one.cause is not None else outcome.cause
            raise RewardError(
                _sample_message(name, i, n, reason, prompts[i], responses[i])
            ) from cause
    raise RewardError(
        f"reward function {name} {outcome.problem} when scoring {n} responses together, though "
        "each response alone scores fine; check how it handles a batch"
    ) from outcome.cause


# --- weighted sums ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TermScores:
    """The scores of one `WeightedSum` call, per term, for logging."""

    total: list[float]
    """(B,) Σ_k w_k · r_k, the reward the trainer uses."""
    terms: dict[str, list[float]]
    """term name -> (B,) that term's unweighted scores r_k (failing samples: error_score)."""
    errors: dict[str, int]
    """term name -> how many samples got error_score (always 0 with on_error="raise")."""


@dataclass
class WeightedSum:
    """A reward function that adds weighted terms: R = Σ_k w_k · r_k(prompt, response) per sample.

    Each term is `(name, fn, weight)`; names are unique, as they become log keys. Every term is
    called through `call_reward`, so its output is validated and the error policy applies per
    term: with `on_error="score"` a failing term gives `error_score` to the failing samples
    only, and the other terms still count.

    Two ways to call it:
    - `ws(prompts, responses, **columns)` is the reward-function contract and returns the
      totals; it also stores the full result in `ws.last` (a `TermScores`) so a trainer can log
      each term after calling it like any other reward function.
    - `ws.score(prompts, responses, **columns)` returns the `TermScores` and stores nothing.

    Give the error policy here rather than wrapping the sum in `call_reward(on_error="score")`:
    that would re-call the whole sum one sample at a time and leave only the last sample in
    `last`.
    """

    terms: Sequence[tuple[str, RewardFn, float]]
    """(name, reward function, weight) triples, scored in this order."""
    on_error: str = "raise"
    """What a failing term does: "raise" or "score" (see `call_reward`)."""
    error_score: float = 0.0
    """A failing sample's score for its term, with on_error="score"."""
    last: TermScores | None = field(default=None, init=False, repr=False, compare=False)
    """The result of the latest `__call__`, or None before the first call."""

    def __post_init__(self) -> None:
        if isinstance(self.terms, (str, bytes)) or not isinstance(self.terms, Sequence):
            raise ConfigError(
                f"WeightedSum: terms must be a list of (name, fn, weight), got {self.terms!r:.80}"
            )
        if not self.terms:
            raise ConfigError("WeightedSum: terms is empty; give at least one (name, fn, weight)")
        seen: set[str] = set()
        for k, term in enumerate(self.terms):
            if not isinstance(term, (tuple, list)) or len(term) != 3:
                raise ConfigError(
                    f"WeightedSum: terms[{k}] must be a (name, fn, weight) triple, got {term!r:.80}"
                )
            name, fn, weight = term
            if not isinstance(name, str) or not name:
                raise ConfigError(f"WeightedSum: terms[{k}]: the name must be a non-empty string")
            if name in seen:
                raise ConfigError(
                    f"WeightedSum: the term name {name!r} is used twice; names are log keys and "
                    "must be unique"
                )
            seen.add(name)
            if not callable(fn):
                raise ConfigError(
                    f"WeightedSum: term {name!r}: {fn!r:.80} is not callable; give a reward "
                    "function (prompts, responses, **columns) -> list[float]"
                )
            if (
                isinstance(weight, bool)
                or not isinstance(weight, numbers.Real)
                or not math.isfinite(weight)
            ):
                raise ConfigError(
                    f"WeightedSum: term {name!r}: the weight must be a finite number, "
                    f"got {weight!r}"
                )
        self.terms = tuple((name, fn, float(weight)) for name, fn, weight in self.terms)
        if self.on_error not in ON_ERROR:
            raise ConfigError(
                f"WeightedSum: on_error must be one of {', '.join(ON_ERROR)}, "
                f"got {self.on_error!r}"
            )
        if (
            isinstance(self.error_score, bool)
            or not isinstance(self.error_score, numbers.Real)
            or not math.isfinite(self.error_score)
        ):
            raise ConfigError(
                f"WeightedSum: error_score must be a finite number, got {self.error_score!r}"
            )

    @property
    def required_columns(self) -> tuple[str, ...]:
        """Every column some term reads, in order of first use."""
        needed: dict[str, None] = {}
        for _, fn, _ in self.terms:
            needed.update(dict.fromkeys(getattr(fn, "required_columns", ())))
        return tuple(needed)

    def score(
        self, prompts: Sequence[Prompt], responses: Sequence[str], *,
        completion_ids: Sequence[Sequence[int]] | None = None, **columns: Sequence[Any]
    ) -> TermScores:
        """Every term's scores and their weighted sum (stores nothing). `completion_ids`, the
        responses' token ids, reach the TRL-style terms only."""
        total = [0.0] * len(responses)
        terms: dict[str, list[float]] = {}
        errors: dict[str, int] = {}
        for name, fn, weight in self.terms:
            scores, n_errors = call_reward(
                fn, prompts, responses, columns, on_error=self.on_error,
                error_score=self.error_score, name=f"{describe(fn)} (WeightedSum term {name!r})",
                completion_ids=completion_ids,
            )
            terms[name], errors[name] = scores, n_errors
            total = [t + weight * r for t, r in zip(total, scores, strict=True)]
        return TermScores(total, terms, errors)

    def __call__(
        self, prompts: Sequence[Prompt], responses: Sequence[str], *,
        completion_ids: Sequence[Sequence[int]] | None = None, **columns: Sequence[Any]
    ) -> list[float]:
        self.last = self.score(prompts, responses, completion_ids=completion_ids, **columns)
        return list(self.last.total)


# --- loading a user's reward function ---------------------------------------------------------

_DOTTED = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")


def load_reward_function(spec: str) -> RewardFn:
    """Import the reward function named by `spec`.

    `spec` is "package.module:function" (imported with importlib, so the module must be
    importable: installed or on `sys.path`), or "path/to/file.py:function" (the file is run as
    a module of its own; its directory is not added to `sys.path`). The attribute may be
    dotted ("module:Class.method"). Nothing is evaluated as code.

    Raises `ConfigError` when the spec is malformed, the module or file is missing or fails to
    import, the attribute is missing, or the object is not a reward function (not callable, or
    a class, which must be instantiated first).
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise ConfigError(
            f"reward function {spec!r}: expected 'package.module:function' or "
            "'path/to/file.py:function'"
        )
    target, _, attr = spec.rpartition(":")
    if not target or not _DOTTED.fullmatch(attr):
        raise ConfigError(
            f"reward function {spec!r}: expected 'package.module:function' or "
            f"'path/to/file.py:function'; {attr!r} is not a Python name"
        )
    is_file = target.endswith(".py") or "/" in target or "\\" in target
    module = _import_file(spec, target) if is_file else _import_module(spec, target, attr)

    obj: Any = module
    for depth, part in enumerate(attr.split(".")):
        if not hasattr(obj, part):
            owner = target if depth == 0 else ".".join(attr.split(".")[:depth])
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"reward function {spec!r}: {owner} has no attribute {part!r}.{hint}")
        obj = getattr(obj, part)
    if isinstance(obj, type):
        raise ConfigError(
            f"reward function {spec!r}: {attr} is a class; create the reward object in the "
            f"module (e.g. `reward = {attr}(...)`) and name that instead"
        )
    if not callable(obj):
        raise ConfigError(
            f"reward function {spec!r}: {attr} (of type {type(obj).__name__}) is not callable; "
            "name a function (prompts, responses, **columns) -> list[float], or TRL's "
            "(prompts, completions, **kwargs)"
        )
    return obj


def _import_module(spec: str, target: str, attr: str) -> ModuleType:
    if not _DOTTED.fullmatch(target):
        raise ConfigError(
            f"reward function {spec!r}: {target!r} is neither a module path (package.module) nor "
            "a .py file"
        )
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as err:
        if err.name and (target == err.name or target.startswith(err.name + ".")):
            raise ConfigError(
                f"reward function {spec!r}: no module named {err.name!r}. Check the spelling and "
                f"that it is installed or on PYTHONPATH, or give a file: 'path/to/file.py:{attr}'"
            ) from None
        raise ConfigError(
            f"reward function {spec!r}: module {target!r} imports {err.name!r}, which is not "
            "installed"
        ) from err
    except Exception as err:
        raise ConfigError(
            f"reward function {spec!r}: importing {target!r} raised {type(err).__name__}: {err}"
        ) from err


def _import_file(spec: str, target: str) -> ModuleType:
    path = Path(target).expanduser()
    if path.suffix != ".py":
        raise ConfigError(f"reward function {spec!r}: {target!r} is not a .py file")
    if not path.is_file():
        raise ConfigError(
            f"reward function {spec!r}: file {str(path)!r} not found (relative paths are from "
            f"{str(Path.cwd())!r})"
        )
    path = path.resolve()
    # A private module name unique to the file; registered in sys.modules while it runs, since
    # dataclasses and pickle look classes up by module name.
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
    stem = re.sub(r"\W", "_", path.stem)
    module_name = f"_posttrain_reward_{stem}_{digest}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:  # pragma: no cover - .py always loads
        raise ConfigError(f"reward function {spec!r}: cannot load {str(path)!r} as a module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[module_name]
        raise ConfigError(
            f"reward function {spec!r}: running {str(path)!r} raised {type(err).__name__}: {err}"
        ) from err
    return module
