"""Environments and tools for multi-turn episodes (ALGORITHMS.md 6d): plain Python, named in
the config like reward functions (`rollout.environment: package.module:Class` or
`path/file.py:Class`).

An episode is `prompt, a¹, o¹, a², o², …, aᴺ`: the policy writes a turn, the environment
answers it (a tool's result, a game's feedback) until it says the episode is done.

    class Guess(Environment):
        def reset(self, prompt, target):      # the prompt and its record's columns
            self.target = target
        def step(self, text):                 # the turn the policy just wrote
            if text.strip() == str(self.target):
                return Step(done=True, reward=1.0)
            return Step(observation="higher" if int(text) < self.target else "lower")

A `ToolEnvironment` offers plain Python functions as tools: their schemas (from type hints and
docstrings, `transformers.utils.get_json_schema`) go to the chat template
(`apply_chat_template(tools=...)`), a turn that is a tool call runs the tool and the result
becomes a `tool` message; a malformed call, an unknown tool or a tool that raises becomes the
error's text as the tool's message (counted in `info`), never a crash. A turn that is not a
tool call is the final answer, scored by `answer_reward`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from posttrain.errors import ConfigError

Messages = list[dict[str, str]]


@dataclass
class Step:
    """What the environment answers a turn with.

    observation: the next message(s) the policy sees (a str is one `user` message); None
        when the episode is done.
    reward: this turn's reward, placed at the turn's last token (the episode's return is the
        sum over its turns).
    done: the episode ends after this turn.
    info: anything to log; the counts `tool_calls` and `tool_errors` are summed into the
        run's metrics.
    """

    observation: str | Messages | None = None
    reward: float = 0.0
    done: bool = False
    info: dict[str, Any] = field(default_factory=dict)


class Environment:
    """One episode's environment; a new object per episode (built with no arguments)."""

    tools: Sequence[Callable[..., Any]] = ()

    def reset(self, prompt: Any, **columns: Any) -> str | Messages | None:
        """Start an episode on `prompt` (a string or messages) with its record's other
        columns; may return an observation to append before the first turn."""
        return None

    def step(self, text: str) -> Step:  # pragma: no cover - the protocol
        """Answer the policy's turn `text` (decoded, without its end token)."""
        raise NotImplementedError


def as_messages(observation: str | Messages) -> Messages:
    if isinstance(observation, str):
        return [{"role": "user", "content": observation}]
    if not isinstance(observation, list) or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in observation):
        raise ConfigError(f"an environment's observation must be a string or a list of "
                          f"{{'role', 'content'}} messages, got {observation!r:.80}")
    return observation


# ----------------------------------------------------------------------------- tool calls
@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any] | str  # keyword arguments, or one string for a 1-argument tool


_CALL = re.compile(r"\s*([A-Za-z_]\w*)\((.*)\)\s*", re.DOTALL)
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def parse_call(text: str) -> ToolCall | None:
    """`name(argument text)`, the whole turn: the raw text between the parentheses is the
    tool's one argument (a format a character-level model writes in a few tokens)."""
    found = _CALL.fullmatch(text)
    return ToolCall(found.group(1), found.group(2)) if found else None


def parse_hermes(text: str) -> ToolCall | None:
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (the Hermes format of Qwen's
    and many other chat templates). Malformed JSON inside the tags raises ValueError."""
    found = _HERMES.search(text)
    if not found:
        return None
    call = json.loads(found.group(1))
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        raise ValueError("a tool call needs a JSON object with a string 'name'")
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):
        arguments = json.loads(arguments)
    if not isinstance(arguments, dict):
        raise ValueError("a tool call's 'arguments' must be a JSON object")
    return ToolCall(call["name"], arguments)


PARSERS: dict[str, Callable[[str], ToolCall | None]] = {"call": parse_call,
                                                         "hermes": parse_hermes}


def tool_schemas(tools: Sequence[Callable[..., Any]]) -> list[dict[str, Any]]:
    """The JSON schemas chat templates take (`apply_chat_template(tools=...)`), from each
    function's type hints and Google-style docstring."""
    from transformers.utils import get_json_schema

    out = []
    for tool in tools:
        try:
            out.append(get_json_schema(tool))
        except Exception as err:  # transformers raises its own types for a bad docstring
            raise ConfigError(f"tool {getattr(tool, '__name__', tool)!r}: no schema from its "
                              f"type hints and docstring ({err})") from None
    return out


class ToolEnvironment(Environment):
    """An environment that offers `tools`; subclasses score the final answer.

    Class attributes: `tools` (plain functions), `parser` ("call" or "hermes"), `max_calls`
    (after that many calls the next turn is the final answer whatever it is)."""

    parser: str = "call"
    max_calls: int = 4

    def reset(self, prompt: Any, **columns: Any) -> str | Messages | None:
        self.prompt, self.columns, self.calls = prompt, columns, 0
        return None

    def answer_reward(self, text: str) -> float:  # pragma: no cover - the protocol
        """The reward of the final answer `text`."""
        raise NotImplementedError

    def step(self, text: str) -> Step:
        if self.parser not in PARSERS:
            raise ConfigError(f"{type(self).__name__}.parser {self.parser!r}: one of "
                              f"{', '.join(PARSERS)}")
        if self.calls >= self.max_calls:
            return Step(done=True, reward=float(self.answer_reward(text)))
        try:
            call = PARSERS[self.parser](text)
        except ValueError as err:
            return self._tool_message(f"error: malformed tool call ({err})", error=True)
        if call is None:
            return Step(done=True, reward=float(self.answer_reward(text)))
        tools = {tool.__name__: tool for tool in self.tools}
        if call.name not in tools:
            return self._tool_message(f"error: no tool {call.name!r}; tools: "
                                      f"{', '.join(tools)}", error=True)
        try:
            args = call.arguments
            result = tools[call.name](**args) if isinstance(args, dict) else \
                tools[call.name](args)
        except Exception as err:  # the tool's failure is the model's to see, not a crash
            return self._tool_message(f"error: {type(err).__name__}: {err}", error=True)
        return self._tool_message(str(result), error=False)

    def _tool_message(self, content: str, error: bool) -> Step:
        self.calls += 1
        return Step(observation=[{"role": "tool", "content": content}],
                    info={"tool_calls": 1, "tool_errors": int(error)})


def load_environment(spec: str) -> type:
    """The environment class named by `spec` ("package.module:Class" or
    "path/file.py:Class"), imported as reward functions are (nothing evaluated as code)."""
    from posttrain.rewards.combine import _import_file, _import_module

    if not isinstance(spec, str) or ":" not in spec:
        raise ConfigError(f"rollout.environment {spec!r}: expected 'package.module:Class' or "
                          "'path/to/file.py:Class'")
    target, _, attr = spec.rpartition(":")
    is_file = target.endswith(".py") or "/" in target or "\\" in target
    try:
        module = _import_file(spec, target) if is_file else _import_module(spec, target, attr)
    except ConfigError as err:
        raise ConfigError(f"rollout.environment: {str(err).removeprefix('reward function ')}"
                          ) from None
    obj: object = module
    for part in attr.split("."):  # dotted: posttrain.api:registered.Name
        obj = getattr(obj, part, None)
    if not isinstance(obj, type) or not callable(getattr(obj, "step", None)):
        raise ConfigError(f"rollout.environment {spec!r}: {attr} is not a class with a "
                          "step(text) method (see posttrain.rollout.environment.Environment)")
    return obj
