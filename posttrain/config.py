"""Typed, frozen, nested dataclass configs; YAML with `base:` inheritance; CLI overrides.

    cfg = load_config(SFTConfig, "my.yaml", overrides=["--optim.lr", "1e-5"])

- Every field is documented with `doc("...")`; `config_help(SFTConfig)` lists them all.
- An unknown key is an error that names the closest valid key; a value of the wrong type is
  an error that names the key, the expected type and the value.
- A YAML file may say `base: other.yaml` (relative to itself) or `base: preset:NAME`; its keys
  are merged over the base's, recursively.
- Configs are never mutated at run time; derive new ones with `dataclasses.replace`.
"""

from __future__ import annotations

import dataclasses
import difflib
import keyword
import math
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from posttrain.errors import ConfigError

T = TypeVar("T")


def doc(text: str, default: Any = dataclasses.MISSING, *,
        default_factory: Callable[[], Any] | Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its help text."""
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata={"help": text})
    return dataclasses.field(default=default, metadata={"help": text})


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting where YAML is loose (int -> float)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_shown(value)}")
    if origin is Literal:
        if value not in get_args(tp):
            choices = ", ".join(repr(a) for a in get_args(tp))
            close = difflib.get_close_matches(_shown(value).strip("'\""),
                                              [str(a) for a in get_args(tp)], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key}: {_shown(value)} is not one of {choices}{hint}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, "
                              f"got {_shown(value)}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin in (list, tuple, Sequence):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {_shown(value)}")
        (item,) = get_args(tp)[:1] or (Any,)
        items = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {_shown(value)}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {_shown(value)}")
    if tp is float:
        number = None
        if isinstance(value, int | float | str) and not isinstance(value, bool):
            try:
                number = float(value)
            except (ValueError, OverflowError):  # OverflowError: an int past 1.8e308
                pass
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {_shown(value)}")
        # NaN passes every range check (`nan <= 0` is False), and no key means ±inf
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {_shown(value)}")
        return number
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {_shown(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {_shown(value)}")
    return value


def _shown(value: Any, limit: int = 80) -> str:
    """`value` for a one-line error: its repr, cut to `limit` characters (a 5,000-digit number
    or a long list stays readable; a repr never holds a line break)."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # an int past Python's digit limit; a deep list
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _printable(text: str) -> str:
    """`text` as it is, or as a quoted repr if it holds a line break or another control
    character (an error stays one line)."""
    return text if text.isprintable() else repr(text)


def key_of(field_name: str) -> str:
    """The config key of a field: its name, but `async` for the field `async_` (a Python
    keyword cannot name a field)."""
    stem = field_name[:-1]
    return stem if field_name.endswith("_") and keyword.iskeyword(stem) else field_name


def field_paths(cls: type, prefix: str = "") -> list[str]:
    """Every settable dotted key of a config class."""
    out = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        inner = [a for a in get_args(tp) if dataclasses.is_dataclass(a)] or (
            [tp] if dataclasses.is_dataclass(tp) else [])
        out.append(prefix + key_of(f.name))
        if inner:
            out += field_paths(inner[0], prefix + f.name + ".")
    return out


def _unknown_key(cls: type, key: Any, prefix: str) -> ConfigError:
    if not isinstance(key, str):  # YAML reads `1:`, `null:`, `yes:` as keys that are no name
        return ConfigError(f"{prefix.rstrip('.') or 'config'}: key {_shown(key)} "
                           f"({type(key).__name__}) is no key name (see --help for all keys)")
    valid = field_paths(cls, prefix)
    close = difflib.get_close_matches(prefix + key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    shown = f"'{prefix}{key}'" if key.isprintable() else repr(prefix + key)  # a line break
    return ConfigError(f"unknown config key {shown}{hint} (see --help for all keys)")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build config `cls` from a (nested) mapping, checking every key and type."""
    hints = _hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    keys = {key_of(name): name for name in names}  # `async` -> async_
    if "imports" in names and data.get("imports"):
        # first: the sections below may name what these modules register
        import_user_modules(_coerce(data["imports"], hints["imports"], prefix + "imports"))
    kwargs = {}
    for key, value in data.items():
        if key not in keys and key not in names:
            raise _unknown_key(cls, key, prefix)
        name = keys.get(key, key)
        kwargs[name] = _coerce(value, hints[name], prefix + key)
    missing = [n for n, f in names.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    for name in missing:
        tp = hints[name]
        if dataclasses.is_dataclass(tp):  # a section: its own check says which key is needed
            kwargs[name] = from_dict(tp, {}, prefix=f"{prefix}{name}.")
        else:
            raise ConfigError(f"missing required config key '{prefix}{name}'")
    try:
        return cls(**kwargs)
    except ConfigError as err:
        if prefix and str(err).startswith(prefix):  # the message names its key already
            raise
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {err}") from None


def import_user_modules(specs: Sequence[str]) -> None:
    """Import each module of a config's `imports:`: a module name (found from the working
    directory too) or a `.py` file (relative to the working directory). Importing registers
    what the module decorates (a policy loss, an advantage estimator, ...)."""
    import importlib
    import importlib.util
    import sys

    for spec in specs:
        if spec.endswith(".py"):
            try:
                path = Path(spec).resolve()
            except (OSError, ValueError):  # a NUL byte
                raise ConfigError(f"imports: {_shown(spec)} is not a valid path") from None
            if not path.is_file():
                raise ConfigError(f"imports: {spec}: no such file (paths are relative to the "
                                  f"working directory, {Path.cwd()})")
            name = f"posttrain_user_{path.stem}"
            if name in sys.modules:
                continue
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
            continue
        if str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))
        try:
            importlib.import_module(spec)
        except ModuleNotFoundError as err:
            raise ConfigError(f"imports: cannot import {_shown(spec)} ({err}); give a module "
                              "on the Python path or a .py file") from None
        except (ValueError, TypeError):  # "", ".relative", a NUL byte: no module name
            raise ConfigError(f"imports: {_shown(spec)} is not a module name; give a module "
                              "on the Python path or a .py file") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as the mapping its YAML holds (keys as `key_of` names them)."""
    return dataclasses.asdict(cfg, dict_factory=lambda items: {key_of(k): v for k, v in items})


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` merged into `base`, recursively for mappings."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path, preset_dir: Path | None = None, _seen: tuple = ()) -> dict:
    """A YAML config with its `base:` chain resolved."""
    import yaml

    path = Path(path)
    where = _printable(str(path))
    try:
        found = path.is_file()
    except (OSError, ValueError):  # a NUL byte, a name too long for the file system
        raise ConfigError(f"config file {where} is not a valid path") from None
    if not found:
        raise ConfigError(f"config file {where} does not exist")
    if path.resolve() in _seen:
        raise ConfigError(f"{where}: `base:` chain loops back to itself")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{where}: not valid UTF-8 (byte offset {err.start}); save the file "
                          "as UTF-8") from None
    except OSError as err:
        raise ConfigError(f"{where}: cannot be read ({err.strerror})") from None
    try:
        data = _safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(_yaml_error(where, text, err)) from None
    except ValueError as err:
        raise ConfigError(f"{where}: not valid YAML ({err})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of keys to values")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{where}: base: expected a file path or preset:NAME, got "
                          f"{_shown(base)}")
    if base.startswith("preset:"):
        if preset_dir is None:
            raise ConfigError(f"{where}: `base: {_printable(base)}` needs a preset directory")
        base_path = preset_dir / f"{base.split(':', 1)[1]}.yaml"
    else:
        base_path = path.parent / base  # checked, then resolved, by the call below
    return merge(read_yaml(base_path, preset_dir, (*_seen, path.resolve())), data)


MAX_DEPTH = 32
"""How deeply a config's values may nest (a config nests 3 levels; a reward's options a few
more): deeper is a mistake, and Python's recursion would fail on it further on."""


def _safe_load(text: str) -> Any:
    """`yaml.safe_load(text)`, with what PyYAML's constructors raise besides `YAMLError` and
    what it builds that no config can hold, as ValueError with the reason: `!!int x`,
    `2020-13-45` and a 5,000-digit number raise ValueError, KeyError or IndexError; a recursive
    alias (`&a [*a]`) builds a list that holds itself; deep nesting overflows the stack."""
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        raise
    except RecursionError:
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels") from None
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError) as err:
        # ValueError holds PyYAML's text of what it could not convert, the others a bare key
        raise ValueError(f"a value YAML cannot convert: {' '.join(str(err).split())[:80]}"
                         ) from None
    _check_nesting(data)
    return data


def _check_nesting(value: Any, depth: int = 0, holders: tuple[int, ...] = ()) -> None:
    if not isinstance(value, dict | list):
        return
    if id(value) in holders:
        raise ValueError("an alias refers to a value that holds it (&name ... *name inside "
                         "itself)")
    if depth >= MAX_DEPTH:
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
    for item in value.values() if isinstance(value, dict) else value:
        _check_nesting(item, depth + 1, (*holders, id(value)))


def _yaml_error(path: str, text: str, err: Exception) -> str:
    """One line naming the file, line and column of a YAML error (PyYAML's own message spans
    several and names the text it was given, `"<unicode string>"`, not the file)."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    if mark is None:
        return f"{path}: not valid YAML ({' '.join(str(err).split())})"
    where = f"{path} line {mark.line + 1} column {mark.column + 1}"
    lines = text.split("\n")
    line = lines[mark.line] if mark.line < len(lines) else ""
    indent = line[: len(line) - len(line.lstrip(" \t"))]
    if "\t" in indent or "'\\t'" in (getattr(err, "problem", None) or ""):
        return (f"{where}: a tab character; YAML does not allow tabs in indentation, indent "
                "with spaces")
    said = [getattr(err, "context", None), getattr(err, "problem", None)]
    reason = "; ".join(" ".join(p.split()) for p in said if p) or " ".join(str(err).split())
    return f"{where}: not valid YAML ({reason})"


def parse_overrides(args: Sequence[str]) -> dict[str, Any]:
    """`["--optim.lr", "1e-5", "--train.steps=10"]` -> `{"optim": {"lr": 1e-5}, ...}`.

    Values are read as YAML scalars (so `true`, `3`, `1e-5`, `null`, `[1, 2]` work)."""
    import yaml

    out: dict[str, Any] = {}
    items = list(args)
    i = 0
    while i < len(items):
        arg = items[i]
        if not arg.startswith("--"):
            raise ConfigError(
                f"unexpected argument {arg!r}; overrides look like --section.key VALUE"
            )
        key, eq, value = arg[2:].partition("=")
        parts = key.split(".")
        if not all(part.strip() and part.isprintable() for part in parts):
            raise ConfigError(f"override {_shown(arg)}: not a key; overrides look like "
                              "--section.key VALUE")
        if not eq:
            if i + 1 >= len(items):
                raise ConfigError(f"override --{key} needs a value")
            value = items[i + 1]
            i += 1
        i += 1
        try:
            parsed = _safe_load(value) if value != "" else ""
        except (yaml.YAMLError, ValueError):  # not YAML: the word itself, a string
            parsed = value
        node = out
        for depth, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                section = ".".join(parts[: depth + 1])
                raise ConfigError(f"override --{key}: --{section} was given a value, so "
                                  f"{section} is no section here; give one of the two")
        node[parts[-1]] = _numeric(parsed)
    return out


def _numeric(value: Any) -> Any:
    # YAML 1.1 reads "1e-5" as a string; a config number should be a number. Not "1e999":
    # as a float it would be inf, which no key takes, and a name may say "1e999".
    if isinstance(value, str) and any(c in value for c in ".eE") and not value.isalpha():
        try:
            number = float(value)
        except ValueError:
            return value
        return number if math.isfinite(number) else value
    return value


def load_config(cls: type[T], path: str | Path | None = None,
                overrides: Sequence[str] | dict[str, Any] = (),
                preset_dir: Path | None = None, base: dict[str, Any] | None = None) -> T:
    """`cls` from (an optional dict `base`) + (an optional YAML file) + (overrides)."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        data = merge(data, read_yaml(path, preset_dir))
    over = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    return from_dict(cls, merge(data, over))


def save_config(cfg: Any, path: str | Path) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def config_help(cls: type, prefix: str = "", defaults: Any = None
                ) -> list[tuple[str, str, str]]:
    """`(key, default, help)` for every leaf field, for `--help`. A section's defaults are
    those of the instance its parent builds (`default_factory`), not the class's: RL's
    `optim.lr` shows RL's default, not `OptimConfig`'s."""
    rows = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        inner = [a for a in get_args(tp) if dataclasses.is_dataclass(a)] or (
            [tp] if dataclasses.is_dataclass(tp) else [])
        value = _default(f, defaults)
        if inner:
            rows += config_help(inner[0], prefix + f.name + ".",
                                value if dataclasses.is_dataclass(value) else None)
            continue
        default = "(required)" if value is dataclasses.MISSING else repr(value)
        rows.append((prefix + key_of(f.name), default, f.metadata.get("help", "")))
    return rows


def _default(f: dataclasses.Field, instance: Any) -> Any:
    """The default of field `f`: `instance`'s value when given, else the field's default
    (a section that cannot be built without required values has none)."""
    if instance is not None:
        return getattr(instance, f.name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        try:
            return f.default_factory()
        except ConfigError:  # e.g. model.path is required
            return dataclasses.MISSING
    return dataclasses.MISSING
