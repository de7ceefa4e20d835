"""Fuzzing the config layer: whatever a YAML file or the command line says, every trainer's
config, loaded as `posttrain COMMAND --config FILE --key value ...` loads it, is either a valid
config (one that `save_config` writes and loads back unchanged) or one `ConfigError` on one line.

The inputs: random mappings of real and unknown sections and keys with random YAML values (ints,
floats with NaN and ±inf, strings, bools, null, lists, mappings); random values of each known
key; YAML text that PyYAML's constructors mishandle (tags, impossible dates, huge and nested
values); random bytes; keys that are not strings or hold line breaks; random `base:` chains;
`imports:` that cannot be imported; random `--key value` argument lists. Any other exception is
a bug: hypothesis shows the smallest input that raises it.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import math
import string
import tempfile
import types
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from posttrain import algos, pipeline
from posttrain.cli import TRAINERS
from posttrain.config import load_config, parse_overrides, save_config
from posttrain.errors import ConfigError
from posttrain.tracking.trackers import TRACKERS
from posttrain.trainers.reward import NORMALIZE_MODES

CONFIGS = {command: getattr(importlib.import_module(module), name)
           for command, (module, name, _, _) in TRAINERS.items()}
"""The config class of every trainer command of the CLI."""

COMMANDS = sorted(CONFIGS)

REQUIRED = {"model": {"path": "models/sft"}, "data": {"train": "data/train.jsonl"}}
"""The keys without a default; given, the fuzzing reaches every other key. Neither path is
checked when a config loads (a run checks them when it starts)."""

UNSAFE = {"imports"}
"""Keys whose strings are imported as modules: fuzzed only with names that cannot import."""

CHOICES = {
    "advantage": algos.ADVANTAGE_ESTIMATORS.names(),
    "policy_loss": algos.POLICY_LOSSES.names(),
    "aggregation": algos.AGGREGATIONS.names(),
    "value_aggregation": algos.AGGREGATIONS.names(),
    "whiten": algos.WHITEN_MODES.names(),
    "kl_estimator": algos.KL_ESTIMATORS.names(),
    "kl_controller": algos.KL_CONTROLLERS.names(),
    "lambda_schedule": algos.LAMBDA_SCHEDULES.names(),
    "is_correction": ["auto", *algos.IS_CORRECTIONS.names()],
    "variant": algos.DPO_VARIANTS.names(),
    "normalize": list(NORMALIZE_MODES),
    "report_to": list(TRACKERS),
}
"""The names a string key chooses from (a registry's), so that valid choices are drawn too."""

# Function-scoped fixtures and hypothesis do not mix: each example makes its own temporary
# directory. The machine may be slow and busy, so no deadline and no too-slow check; an RL
# mapping (AlgoConfig has 50 keys) may outgrow hypothesis' buffer now and then.
FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])

TEXT = st.text(max_size=8)
NAMES = st.text(alphabet=string.ascii_lowercase + "_", min_size=1, max_size=8)
"""Unknown keys that are plain names (odd keys have a test of their own)."""

YAML_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), TEXT)
YAML_VALUES = st.recursive(
    YAML_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(NAMES, inner, max_size=3),
    max_leaves=6,
)
"""Any value `yaml.safe_dump` writes (NaN and ±inf as .nan and ±.inf)."""

HUGE = (st.integers(min_value=2**1024, max_value=10**400)
        | st.integers(min_value=-(10**400), max_value=-(2**1024)))
"""Integers YAML reads exactly that no float holds."""


def _typed(tp: Any, name: str) -> st.SearchStrategy:
    """Values of annotation `tp` (of key `name`) as YAML gives them: of the right type, valid or
    not (0, negative, NaN, ±inf, a choice's names and other strings)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*(_typed(arg, name) for arg in typing.get_args(tp)))
    if origin is Literal:
        return st.sampled_from(typing.get_args(tp))
    if origin in (list, tuple, Sequence):
        args = typing.get_args(tp)
        return st.lists(_typed(args[0], name) if args else YAML_VALUES, max_size=3)
    if dataclasses.is_dataclass(tp):
        return _mappings(tp)
    if tp is type(None):
        return st.none()
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.integers(-2, 3) | st.integers()
    if tp is float:
        return st.floats() | st.integers(-2, 3)
    if tp is str:
        return st.sampled_from(CHOICES[name]) | TEXT if name in CHOICES else TEXT
    return YAML_VALUES  # Any, dict[str, Any]


def _mappings(cls: type) -> st.SearchStrategy:
    """Mappings for config class `cls`: some of its keys, each with a value of its type or any
    value (a section: a mapping for it, or any value), and perhaps unknown keys."""
    hints = typing.get_type_hints(cls)
    known = {f.name: _typed(hints[f.name], f.name) | YAML_VALUES
             for f in dataclasses.fields(cls) if f.name not in UNSAFE}
    unknown = st.just({}) | st.dictionaries(NAMES, YAML_VALUES, max_size=2)
    return st.tuples(unknown, st.fixed_dictionaries({}, optional=known)).map(
        lambda parts: {**parts[0], **parts[1]})


def _leaf_keys(cls: type, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """`(dotted key, annotation)` of every key of `cls` that is not a section."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in UNSAFE:
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaf_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", hints[f.name]


def _holds_a_float(tp: Any) -> bool:
    return tp is float or float in typing.get_args(tp)


MAPPINGS = {command: _mappings(cls) for command, cls in CONFIGS.items()}
LEAVES = {command: {key: _typed(tp, key.rsplit(".", 1)[-1]) for key, tp in _leaf_keys(cls)}
          for command, cls in CONFIGS.items()}
FLOAT_KEYS = {command: [key for key, tp in _leaf_keys(cls) if _holds_a_float(tp)]
              for command, cls in CONFIGS.items()}
NUMBER_KEYS = {command: [key for key, tp in _leaf_keys(cls)
                         if _holds_a_float(tp) or tp is int or int in typing.get_args(tp)]
               for command, cls in CONFIGS.items()}


def _merged(base: dict, over: dict) -> dict:
    """`over` over `base`, recursively for mappings."""
    out = dict(base)
    for key, value in over.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merged(out[key], value) if both else value
    return out


def _with(mapping: dict, key: str, value: Any) -> dict:
    """A copy of `mapping` with dotted `key` set to `value` (sections made as needed)."""
    out = copy.deepcopy(mapping)
    node = out
    *sections, leaf = key.split(".")
    for name in sections:
        if not isinstance(node.get(name), dict):
            node[name] = {}
        node = node[name]
    node[leaf] = value
    return out


def _write_yaml(directory: Path, mapping: Any, name: str = "config.yaml") -> Path:
    path = directory / name
    path.write_text(yaml.safe_dump(mapping, sort_keys=False), encoding="utf-8")
    return path


def _one_line(err: ConfigError) -> None:
    message = str(err)
    assert message and "\n" not in message and "\r" not in message, (
        f"a ConfigError of more than one line: {message!r}")


def _load_or_config_error(cls: type, path: Path | None, argv: Sequence[str] = ()) -> Any:
    """`cls` loaded as `posttrain COMMAND --config path ARGV...` loads it (`cli._train`: the
    overrides parsed, then merged over the file, presets found for `base: preset:NAME`), or None
    after a ConfigError of one line. A loaded config must survive `save_config` (a run saves
    its config, and a resumed run reads it back). Any other exception propagates: it is what
    the fuzzing looks for."""
    try:
        cfg = load_config(cls, path, parse_overrides(list(argv)),
                          preset_dir=pipeline.preset_dir(), base={})
    except ConfigError as err:
        _one_line(err)
        return None
    assert isinstance(cfg, cls), cfg
    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / "config.yaml"
        save_config(cfg, saved)
        # repr, not ==: a NaN that loads must load again, and NaN != NaN
        assert repr(load_config(cls, saved)) == repr(cfg)
    return cfg


@pytest.mark.parametrize("command", COMMANDS)
def test_the_required_keys_alone_make_a_valid_config(command):
    # the base of the fuzzing below: without it every example would stop at model.path
    with tempfile.TemporaryDirectory() as tmp:
        assert _load_or_config_error(CONFIGS[command], _write_yaml(Path(tmp), REQUIRED))


# ---------------------------------------------------------------------------------------------
# YAML files: random mappings, random values of known keys


@pytest.mark.parametrize("command", COMMANDS)
@FUZZ
@given(data=st.data())
def test_random_yaml_mappings(command, data):
    mapping = data.draw(MAPPINGS[command], label="mapping")
    if data.draw(st.booleans(), label="with the required keys"):
        mapping = _merged(REQUIRED, mapping)
    with tempfile.TemporaryDirectory() as tmp:
        _load_or_config_error(CONFIGS[command], _write_yaml(Path(tmp), mapping))


@pytest.mark.parametrize("command", COMMANDS)
@FUZZ
@given(data=st.data())
def test_random_values_of_known_keys(command, data):
    leaves = LEAVES[command]
    keys = data.draw(st.lists(st.sampled_from(sorted(leaves)), min_size=1, max_size=3,
                              unique=True), label="keys")
    mapping = REQUIRED
    for key in keys:
        mapping = _with(mapping, key, data.draw(leaves[key] | YAML_VALUES, label=key))
    with tempfile.TemporaryDirectory() as tmp:
        _load_or_config_error(CONFIGS[command], _write_yaml(Path(tmp), mapping))


@pytest.mark.parametrize("command", COMMANDS)
@settings(FUZZ, max_examples=20)
@given(data=st.data(), value=HUGE)
def test_integers_past_the_float_range(command, data, value):
    key = data.draw(st.sampled_from(NUMBER_KEYS[command]), label="key")
    with tempfile.TemporaryDirectory() as tmp:
        _load_or_config_error(CONFIGS[command], _write_yaml(Path(tmp), _with(REQUIRED, key, value)))


@pytest.mark.parametrize("command", COMMANDS)
def test_nan_is_refused_by_every_number_key(command):
    # NaN is no learning rate, coefficient or bound; compared with `<=` it passes every range
    # check (`nan <= 0` is False), so each key must refuse it itself
    accepted = []
    with tempfile.TemporaryDirectory() as tmp:
        for key in FLOAT_KEYS[command]:
            from_yaml = _write_yaml(Path(tmp), _with(REQUIRED, key, math.nan))
            from_argv = _write_yaml(Path(tmp), REQUIRED, "required.yaml")
            if (_load_or_config_error(CONFIGS[command], from_yaml) is not None
                    or _load_or_config_error(CONFIGS[command], from_argv,
                                             [f"--{key}", "nan"]) is not None):
                accepted.append(key)
    assert not accepted, f"NaN makes a valid {command} config at: {', '.join(accepted)}"


# ---------------------------------------------------------------------------------------------
# YAML text: what PyYAML's constructors mishandle, random bytes, odd keys


SNIPPETS = [
    "!!int x", "!!int ''", "!!float abc", "!!float ''", "!!bool maybe", "!!timestamp x",
    "!!binary '***'", "!!set {a, b}", "!!omap [a: 1]", "!!python/name:os.path.join", "!!str",
    "2020-13-45", "2020-02-30", "2001-12-14t25:59:43.10-05:00", "2001-12-14 21:59:43.10 -5",
    "0b_", "0x_", "._", "1:2:3", "0o17", "1_000", ".nan", "-.inf", "1e999", "9" * 400,
    "1" * 5000, "[" * 3000 + "]" * 3000, "&a [*a]", "&a {x: *a}", "*undefined",
    "{a: 1, a: 2}", "'unterminated", "[1,", "<<: {a: 1}", "~", "yes", "on", "",
]
"""Plain YAML that some of PyYAML's constructors raise ValueError, KeyError, IndexError,
AttributeError or RecursionError on (not YAMLError), and other corners."""

TEMPLATES = ["{s}", "{s}: 1", "optim:\n  lr: {s}", "optim:\n  {s}: 1", "run:\n  name: {s}",
             "run:\n  steps: {s}", "model:\n  path: {s}", "algo: {s}", "rm: {s}",
             "reward:\n  terms: [{s}]", "eval:\n  reward: {s}", "base: {s}"]
"""Where a snippet goes in a file that also sets the required keys."""

REQUIRED_YAML = "model: {path: models/sft}\ndata: {train: data/train.jsonl}\n"


@pytest.mark.parametrize("command", COMMANDS)
@settings(FUZZ, max_examples=40)
@given(snippet=st.sampled_from(SNIPPETS) | TEXT, template=st.sampled_from(TEMPLATES))
def test_yaml_snippets_in_a_config_file(command, snippet, template):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(REQUIRED_YAML + template.replace("{s}", snippet) + "\n",
                        encoding="utf-8")
        _load_or_config_error(CONFIGS[command], path)


@pytest.mark.parametrize("command", COMMANDS)
@settings(FUZZ, max_examples=30)
@given(data=st.data(), snippet=st.sampled_from(SNIPPETS) | TEXT)
def test_yaml_snippets_as_override_values(command, data, snippet):
    key = data.draw(st.sampled_from(["optim", "algo", "run.name", *sorted(LEAVES[command])]),
                    label="key")
    argv = data.draw(st.sampled_from([[f"--{key}", snippet], [f"--{key}={snippet}"]]),
                     label="argv")
    with tempfile.TemporaryDirectory() as tmp:
        _load_or_config_error(CONFIGS[command], _write_yaml(Path(tmp), REQUIRED), argv)


@settings(FUZZ, max_examples=100)
@given(raw=st.binary(max_size=200) | st.text(max_size=100).map(lambda s: s.encode("utf-8"))
       | st.binary(max_size=100).map(lambda b: b"\xef\xbb\xbf" + b))
def test_random_bytes_as_a_config_file(raw):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_bytes(raw)
        _load_or_config_error(CONFIGS["sft"], path)


ODD_KEYS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
    st.sampled_from(["", "line\nbreak", "carriage\rreturn", "tab\tkey", "optim.lr", " optim"]),
    TEXT,
)
"""Keys YAML reads that are no config key: null, true (also `yes`, `on`), numbers, strings with
line breaks."""


@pytest.mark.parametrize("command", COMMANDS)
@settings(FUZZ, max_examples=30)
@given(key=ODD_KEYS, section=st.sampled_from([None, "optim", "run", "model", "data"]),
       value=YAML_SCALARS)
def test_odd_keys(command, key, section, value):
    mapping = copy.deepcopy(REQUIRED)
    (mapping if section is None else mapping.setdefault(section, {}))[key] = value
    with tempfile.TemporaryDirectory() as tmp:
        _load_or_config_error(CONFIGS[command], _write_yaml(Path(tmp), mapping))


BASES = st.one_of(
    st.sampled_from(["preset:ppo", "preset:grpo", "preset:no_such_preset", "preset:",
                     "preset:../presets/ppo", "", ".", "..", "/", "config.yaml", "other.yaml",
                     "missing.yaml", "sub/", "a\x00b.yaml", "~/x.yaml"]),
    TEXT, YAML_VALUES,
)
"""What `base:` may say: presets, itself, another file (which has a `base:` too), paths that
do not exist or cannot, and values that are no path."""


@pytest.mark.parametrize("command", COMMANDS)
@settings(FUZZ, max_examples=30)
@given(base=BASES, other_base=BASES, other=MAPPINGS["rl"])
def test_random_base_chains(command, base, other_base, other):
    with tempfile.TemporaryDirectory() as tmp:
        _write_yaml(Path(tmp), {"base": other_base, **other}, "other.yaml")
        path = _write_yaml(Path(tmp), {"base": base, **REQUIRED})
        _load_or_config_error(CONFIGS[command], path)


IMPORT_NAMES = st.one_of(
    st.sampled_from(["", ".relative", "..", "a..b", "\x00", "a\x00.py", ".py",
                     "no_such_module_for_posttrain_fuzz", "no_such_module_for_posttrain_fuzz.sub",
                     "missing_for_posttrain_fuzz.py", "sub/missing_for_posttrain_fuzz.py"]),
    st.integers(), st.floats(allow_nan=False), st.none(), st.booleans(),
)
"""Entries of `imports:` that cannot import (no random text: it might name a real module)."""


@settings(FUZZ, max_examples=50)
@given(imports=st.lists(IMPORT_NAMES, max_size=3) | IMPORT_NAMES
       | st.dictionaries(NAMES, st.none(), max_size=2))
def test_imports_that_cannot_be_imported(imports):
    with tempfile.TemporaryDirectory() as tmp:
        path = _write_yaml(Path(tmp), {**REQUIRED, "imports": imports})
        _load_or_config_error(CONFIGS["rl"], path)


# ---------------------------------------------------------------------------------------------
# Command-line overrides


OVERRIDE_VALUES = st.one_of(
    st.sampled_from(["true", "null", "[1, 2]", "{a: 1}", "1e-5", "1e999", "nan", ".inf", "-1",
                     "", "--", "a: b", "- x", "'quoted'"]),
    TEXT, YAML_VALUES.map(json.dumps),
)


@st.composite
def override_lists(draw, keys: st.SearchStrategy) -> list[str]:
    """Command-line words: `--key value`, `--key=value`, a `--key` without its value, and
    words that are no override; keys that are sections of one another (`--optim 1
    --optim.lr 2`)."""
    argv: list[str] = []
    for _ in range(draw(st.integers(0, 4))):
        key, value = draw(keys), draw(OVERRIDE_VALUES)
        form = draw(st.sampled_from(["pair", "equals", "no value", "not an override"]))
        if form == "pair":
            argv += [f"--{key}", value]
        elif form == "equals":
            argv.append(f"--{key}={value}")
        elif form == "no value":
            argv.append(f"--{key}")
        else:
            argv.append(value)
    return argv


NESTED_KEYS = st.sampled_from(["optim", "optim.lr", "optim.lr.x", "run", "run.steps", "run.name",
                               "model", "model.path", "data.train", "", ".", "a..b"])


@pytest.mark.parametrize("command", COMMANDS)
@FUZZ
@given(data=st.data())
def test_random_override_lists(command, data):
    keys = NESTED_KEYS | st.sampled_from(sorted(LEAVES[command])) | TEXT
    argv = data.draw(override_lists(keys), label="argv")
    with tempfile.TemporaryDirectory() as tmp:
        _load_or_config_error(CONFIGS[command], _write_yaml(Path(tmp), REQUIRED), argv)


@settings(FUZZ, max_examples=150)
@given(argv=st.lists(TEXT | TEXT.map(lambda s: f"--{s}"), max_size=6))
def test_parse_overrides_of_random_words(argv):
    try:
        overrides = parse_overrides(argv)
    except ConfigError as err:
        _one_line(err)
        return
    assert isinstance(overrides, dict)
