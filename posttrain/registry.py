"""Name -> function registries, one per kind of choice (habit 4 of STYLE.md). Plain Python,
so any layer can use it without importing torch.

Registering a name twice is an error, and looking up an unknown name lists the known ones, so a
config can validate a string with `REGISTRY.get(name)` (or `name in REGISTRY`).

A registry may declare attributes with defaults, which every entry then carries (an advantage
estimator's `needs_values`, a policy loss's `needs_off_policy`):

    LOSSES = Registry("policy loss", attrs={"needs_off_policy": False})

    @LOSSES.register("gspo", needs_off_policy=True)
    def gspo(...): ...

    LOSSES.attr("gspo", "needs_off_policy")   # True
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from posttrain.errors import ConfigError

F = TypeVar("F", bound=Callable)

_MISSING: Any = object()


class Registry(Generic[F]):
    """A named collection of functions of one signature, e.g. the advantage estimators.

    Args:
        kind: what an entry is, for messages ("advantage estimator").
        attrs: the attributes every entry declares, with their defaults. `register` sets them
            on the function too (so `ADVANTAGE_ESTIMATORS.get("gae").needs_values` works);
            `attr` reads the registry's own record, which stays right even when one function
            is registered under two names with different attributes.
    """

    def __init__(self, kind: str, attrs: Mapping[str, Any] | None = None) -> None:
        self.kind = kind
        self.declared: dict[str, Any] = dict(attrs or {})
        self._items: dict[str, F] = {}
        self._attrs: dict[str, dict[str, Any]] = {}

    def register(self, name: str, **attrs: Any) -> Callable[[F], F]:
        """Decorator adding `fn` under `name`, with declared attributes `attrs` (others keep
        their defaults). A name already registered, or an undeclared attribute, raises."""
        unknown = sorted(set(attrs) - set(self.declared))
        if unknown:
            declared = ", ".join(sorted(self.declared)) or "none"
            raise ValueError(
                f"{self.kind} {name!r}: unknown attribute(s) {', '.join(unknown)}; "
                f"declared: {declared}"
            )
        values = {**self.declared, **attrs}

        def add(fn: F) -> F:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            for key, value in values.items():
                setattr(fn, key, value)
            self._items[name] = fn
            self._attrs[name] = values
            return fn

        return add

    def get(self, name: str) -> F:
        try:
            return self._items[name]
        except KeyError:
            close = difflib.get_close_matches(str(name), self._items, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._items))}.{hint}"
            ) from None

    def attr(self, name: str, key: str, default: Any = _MISSING) -> Any:
        """Attribute `key` of entry `name` (an unknown name raises ConfigError). A key the
        registry does not declare gives `default`, or raises KeyError without one."""
        self.get(name)
        values = self._attrs[name]
        if key in values:
            return values[key]
        if default is not _MISSING:
            return default
        raise KeyError(
            f"{self.kind} {name!r} has no attribute {key!r}; "
            f"declared: {', '.join(sorted(self.declared)) or 'none'}"
        )

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(sorted(self._items))})"

    def names(self) -> list[str]:
        return sorted(self._items)
