"""Fuzzing the data loaders: whatever a data file holds, `load_examples` gives validated
`Example`s or raises one `DataError`, on one line, that names the file.

The inputs: random bytes as .jsonl / .json / .parquet; random JSON values as records; records of
every kind with random values in each field (standard and conversational, implicit-prompt
preferences, unpaired labels, margins, extra columns, a column missing); random message lists
(roles, content types, missing keys); random Parquet schemas (nested, null, temporal, binary,
decimal); damaged Parquet files; numbers and nesting past what the parsers take. Any other
exception is a bug: hypothesis shows the smallest file that raises it.
"""

from __future__ import annotations

import codecs
import json
import struct
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from posttrain.data.formats import KINDS, ROLES, Example
from posttrain.data.loading import load_examples
from posttrain.errors import DataError

# Function-scoped fixtures and hypothesis do not mix: each example makes its own temporary
# directory. The machine may be slow and busy, so no deadline and no too-slow check; nested
# random values may outgrow hypothesis' buffer now and then.
HEALTH = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large]
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=HEALTH)

FIELDS = ("prompt", "completion", "chosen", "rejected", "label", "margin", "messages", "text",
          "conversations", "answer", "role", "content")
"""The column names the loader knows, and a few it might be expected to."""

REQUIRED = {"prompt": ("prompt",), "preference": ("prompt", "chosen", "rejected"),
            "unpaired": ("prompt", "completion", "label"), "completion": ("prompt", "completion"),
            "messages": ("messages",), "text": ("text",)}
"""The fields a loaded example of each kind has (not None)."""

SHAPES = {**REQUIRED, "implicit preference": ("chosen", "rejected")}
"""The columns of the record shapes generated."""

KIND = st.sampled_from((None, *KINDS))
"""The `kind` asked of `load_examples` (None: detected from the first record)."""

TEXT = st.text(max_size=12)
WORDS = st.sampled_from(["Q: 2+2? A: four", "Q: 2+2? A: five", "hello", "1+2=", " 3", "a b"])
KEYS = st.sampled_from([*FIELDS, "", "line\nbreak", "carriage\rreturn"]) | st.text(max_size=6)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
    max_leaves=8,
)
"""Any JSON value (NaN and ±Infinity included: Python's json reads and writes them)."""

ROLE = st.sampled_from(ROLES) | st.sampled_from(["", "User", "bot"]) | JSON
CONTENT = st.one_of(
    WORDS, TEXT, JSON,
    # the content parts of multimodal chat formats
    st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]),
                                    "text": TEXT}), max_size=2),
)
GOOD_MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": WORDS})
MESSAGE = st.one_of(
    GOOD_MESSAGE,
    st.fixed_dictionaries({"role": ROLE, "content": CONTENT},
                          optional={"name": TEXT, "tool_calls": JSON}),
    st.fixed_dictionaries({}, optional={"role": ROLE, "content": CONTENT}),
    JSON,
)
MESSAGES = st.lists(GOOD_MESSAGE, min_size=1, max_size=3) | st.lists(MESSAGE, max_size=4)


def _sharing_a_start(parts: st.SearchStrategy) -> st.SearchStrategy:
    """Two values that start alike, as the chosen and rejected of an implicit-prompt pair do:
    `(start + a, start + b)`."""
    return st.tuples(parts, parts, parts).map(lambda t: (t[0] + t[1], t[0] + t[2]))


PAIRS = _sharing_a_start(WORDS | TEXT) | _sharing_a_start(st.lists(MESSAGE, max_size=2))
MARGIN = st.none() | st.floats() | st.integers() | JSON
FIELD_TEXT = st.one_of(WORDS, TEXT, MESSAGES, JSON)
VALUES = {"prompt": FIELD_TEXT, "completion": FIELD_TEXT, "chosen": FIELD_TEXT,
          "rejected": FIELD_TEXT, "label": st.booleans() | JSON, "messages": MESSAGES | JSON,
          "text": st.one_of(WORDS, TEXT, JSON)}
"""A random value of each field: of the right type (valid or not), or any JSON value."""

CONVERSATIONAL = {**VALUES, **{name: MESSAGES for name in ("prompt", "completion", "chosen",
                                                            "rejected", "messages")}}
"""Every text field a message list."""

EXTRA_KEYS = st.sampled_from(["answer", "id", "conversations", "line\nbreak", ""]) | TEXT


@st.composite
def records(draw, shape: str, values: dict) -> dict:
    """A record of `shape` (its columns: SHAPES) with values from `values`, perhaps an
    implicit-prompt pair that shares a start, a margin, a column left out and extra columns."""
    record = {name: draw(values[name]) for name in SHAPES[shape]}
    if "chosen" in record and draw(st.booleans()):
        record["chosen"], record["rejected"] = draw(PAIRS)
    if "chosen" in record and draw(st.booleans()):
        record["margin"] = draw(MARGIN)
    if draw(st.integers(0, 4)) == 0:
        del record[draw(st.sampled_from(SHAPES[shape]))]
    return {**draw(st.dictionaries(EXTRA_KEYS, JSON, max_size=2)), **record}


def record_lists(values: dict) -> st.SearchStrategy:
    """The records of a file: all of one shape, or of shapes mixed."""
    shapes = st.sampled_from(sorted(SHAPES))
    one_shape = shapes.flatmap(lambda shape: st.lists(records(shape, values), max_size=4))
    mixed = st.lists(shapes.flatmap(lambda shape: records(shape, values)), max_size=4)
    return one_shape | mixed


LAYOUTS = st.sampled_from(["jsonl", "jsonl-bom-crlf", "json", "json-data"])


def _write_records(directory: Path, items: list, layout: str) -> Path:
    """`items` as a data file: JSON lines (plain, or with a BOM, CRLF line ends and blank
    lines, as Windows editors write them), a JSON list, or `{"data": [...]}`."""
    if layout == "json":
        path, text = directory / "train.json", json.dumps(items)
    elif layout == "json-data":
        path, text = directory / "train.json", json.dumps({"data": items})
    else:
        path = directory / "train.jsonl"
        newline = "\r\n" if layout == "jsonl-bom-crlf" else "\n"
        text = newline.join(json.dumps(item, ensure_ascii=False) for item in items)
    raw = text.encode("utf-8")
    if layout == "jsonl-bom-crlf":
        raw = codecs.BOM_UTF8 + raw + b"\r\n\r\n"
    path.write_bytes(raw)
    return path


def _check_example(ex: Example) -> None:
    """What a validated example promises: its kind's fields are set, texts are strings or
    non-empty lists of {role, content} messages with a known role, an unpaired label is a
    bool."""
    for name in REQUIRED[ex.kind]:
        assert getattr(ex, name) is not None, (ex.kind, name, ex)
    for name in ("prompt", "completion", "chosen", "rejected", "messages", "text"):
        value = getattr(ex, name)
        if isinstance(value, list):
            assert value, (name, ex)
            for message in value:
                assert set(message) == {"role", "content"}, (name, ex)
                assert message["role"] in ROLES and isinstance(message["content"], str), (name, ex)
        else:
            assert value is None or isinstance(value, str), (name, ex)
    assert isinstance(ex.label, bool) if ex.kind == "unpaired" else ex.label is None, ex


def _load_or_data_error(path: Path, kind: str | None) -> list[Example] | None:
    """The examples of `path`, or None after a `DataError` of one line that names the file.
    Any other exception propagates: it is what the fuzzing looks for."""
    try:
        examples = load_examples(str(path), kind)
    except DataError as err:
        message = str(err)
        assert message and "\n" not in message and "\r" not in message, (
            f"a DataError of more than one line: {message!r}")
        assert str(path) in message, f"a DataError that does not name {path}: {message!r}"
        return None
    assert examples and all(isinstance(ex, Example) for ex in examples)
    kinds = {ex.kind for ex in examples}
    assert len(kinds) == 1 and kinds <= set(KINDS), kinds  # every record of one kind
    assert kind is None or kinds == {kind}, (kind, kinds)
    for ex in examples:
        assert ex.where.startswith(str(path)), ex.where
        _check_example(ex)
    return examples


# ---------------------------------------------------------------------------------------------
# Bytes and JSON values


RAW_BYTES = st.one_of(
    st.binary(max_size=200),
    st.binary(max_size=100).map(lambda b: codecs.BOM_UTF8 + b),
    st.binary(max_size=100).map(lambda b: b"PAR1" + b + b"PAR1"),  # Parquet's magic at both ends
    st.text(max_size=100).map(lambda s: s.encode("utf-8")),
    st.lists(JSON.map(json.dumps), max_size=4).map(lambda lines: "\n".join(lines).encode()),
)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
@FUZZ
@given(raw=RAW_BYTES, kind=KIND)
def test_random_bytes_load_or_raise_one_data_error(suffix, raw, kind):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"train{suffix}"
        path.write_bytes(raw)
        _load_or_data_error(path, kind)


@FUZZ
@given(items=st.lists(JSON | st.dictionaries(KEYS, JSON, max_size=4), max_size=5),
       layout=LAYOUTS, kind=KIND)
def test_random_json_values_as_records(items, layout, kind):
    with tempfile.TemporaryDirectory() as tmp:
        _load_or_data_error(_write_records(Path(tmp), items, layout), kind)


@FUZZ
@given(top=JSON)
def test_a_json_file_of_any_json_value(top):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.json"
        path.write_text(json.dumps(top), encoding="utf-8")
        _load_or_data_error(path, None)


# ---------------------------------------------------------------------------------------------
# Records of every kind, every field random


@FUZZ
@given(items=record_lists(VALUES), layout=LAYOUTS, kind=KIND)
def test_random_values_in_every_field_of_every_kind(items, layout, kind):
    with tempfile.TemporaryDirectory() as tmp:
        _load_or_data_error(_write_records(Path(tmp), items, layout), kind)


@FUZZ
@given(items=record_lists(CONVERSATIONAL), layout=LAYOUTS, kind=KIND)
def test_random_message_lists_in_every_field(items, layout, kind):
    with tempfile.TemporaryDirectory() as tmp:
        _load_or_data_error(_write_records(Path(tmp), items, layout), kind)


# ---------------------------------------------------------------------------------------------
# Numbers and nesting past what the parsers take


@settings(FUZZ, max_examples=20)
@given(value=st.one_of(
           st.integers(4301, 6000).map(lambda n: "9" * n),  # past int()'s 4300-digit limit
           st.integers(2000, 6000).map(lambda n: "[" * n + "]" * n),  # past the recursion limit
       ),
       field=st.sampled_from(["text", "prompt", "answer"]),
       suffix=st.sampled_from([".jsonl", ".json"]))
def test_json_past_the_parsers_limits(value, field, suffix):
    record = f'{{"{field}": {value}}}'
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"train{suffix}"
        path.write_text(record if suffix == ".jsonl" else f"[{record}]", encoding="utf-8")
        _load_or_data_error(path, None)


@settings(FUZZ, max_examples=20)
@given(margin=st.integers(min_value=2**1024, max_value=10**4000)
       | st.integers(min_value=-(10**4000), max_value=-(2**1024)), kind=KIND)
def test_a_margin_past_the_float_range(margin, kind):
    # an integer JSON reads exactly, too large for a float: a margin cannot be one
    record = {"prompt": "q:", "chosen": "good", "rejected": "bad", "margin": margin}
    with tempfile.TemporaryDirectory() as tmp:
        _load_or_data_error(_write_records(Path(tmp), [record], "jsonl"), kind)


# ---------------------------------------------------------------------------------------------
# Parquet: random schemas, damaged files


def _nullable(values: st.SearchStrategy) -> st.SearchStrategy:
    return st.none() | values


INT64 = st.integers(-(2**63), 2**63 - 1)
MESSAGE_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
ARROW_LEAVES = st.sampled_from([
    (pa.null(), st.none()),
    (pa.bool_(), st.booleans()),
    (pa.int8(), st.integers(-128, 127)),
    (pa.int64(), INT64),
    (pa.uint64(), st.integers(0, 2**64 - 1)),
    (pa.float32(), st.floats(width=32)),
    (pa.float64(), st.floats()),
    (pa.string(), WORDS | TEXT),
    (pa.large_string(), TEXT),
    (pa.binary(), st.binary(max_size=8)),
    # temporal types from their stored integers: any int64 is a valid Parquet value
    (pa.date32(), st.integers(-(2**31), 2**31 - 1)),
    (pa.timestamp("s"), INT64),
    (pa.timestamp("ms", tz="UTC"), INT64),
    (pa.duration("s"), INT64),
    (pa.decimal128(10, 2), st.decimals(min_value=-(10**7), max_value=10**7, places=2,
                                       allow_nan=False, allow_infinity=False)),
    (MESSAGE_TYPE, st.lists(st.fixed_dictionaries({
        "role": _nullable(st.sampled_from(ROLES) | TEXT), "content": _nullable(WORDS | TEXT)}),
        max_size=3)),
])
"""`(arrow type, strategy of its Python values)` of the flat columns."""

STRUCT_FIELDS = st.sampled_from(["role", "content", "text", "type"]) | st.text(max_size=4)


def _struct(fields: list) -> tuple:
    arrow_type = pa.struct([(name, field_type) for name, (field_type, _) in fields])
    values = st.fixed_dictionaries({name: _nullable(v) for name, (_, v) in fields})
    return arrow_type, values


def _nested(children: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(
        children.map(lambda c: (pa.list_(c[0]), st.lists(_nullable(c[1]), max_size=3))),
        st.lists(st.tuples(STRUCT_FIELDS, children), min_size=1, max_size=3,
                 unique_by=lambda f: f[0]).map(_struct),
        children.map(lambda c: (pa.map_(pa.string(), c[0]),
                                st.lists(st.tuples(TEXT, _nullable(c[1])), max_size=3))),
    )


ARROW_COLUMNS = st.recursive(ARROW_LEAVES, _nested, max_leaves=4)
"""`(arrow type, strategy of its Python values)` of any column: flat, list, struct or map."""

COLUMN_NAMES = st.lists(st.sampled_from(FIELDS) | st.text(max_size=6), max_size=5, unique=True)
PARQUET = settings(FUZZ, suppress_health_check=[*HEALTH, HealthCheck.filter_too_much])


@PARQUET
@given(data=st.data(), kind=KIND)
def test_random_parquet_schemas(data, kind):
    names = data.draw(COLUMN_NAMES, label="names")
    rows = data.draw(st.integers(0, 4), label="rows")
    columns = [data.draw(ARROW_COLUMNS, label=f"type of {name!r}") for name in names]
    values = [data.draw(st.lists(_nullable(strategy), min_size=rows, max_size=rows),
                        label=f"values of {name!r}")
              for name, (_, strategy) in zip(names, columns, strict=True)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.parquet"
        try:
            arrays = [pa.array(v, type=t) for (t, _), v in zip(columns, values, strict=True)]
            pq.write_table(pa.Table.from_arrays(arrays, names=names), path)
        except (pa.ArrowException, ValueError, TypeError, OverflowError):
            reject()  # a table pyarrow itself cannot build or write is no input of the loader
        _load_or_data_error(path, kind)


@FUZZ
@given(rows=st.lists(st.fixed_dictionaries({"prompt": WORDS | TEXT, "completion": WORDS | TEXT}),
                     min_size=1, max_size=4),
       edits=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), max_size=4),
       keep=st.none() | st.integers(min_value=0), kind=KIND)
def test_damaged_parquet_files(rows, edits, keep, kind):
    # a valid file with bytes overwritten (`edits`) or cut short (`keep` bytes): a damaged
    # download or copy
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
        raw = bytearray(path.read_bytes())
        for at, byte in edits:
            raw[at % len(raw)] = byte
        if keep is not None:
            raw = raw[: keep % len(raw)]
        path.write_bytes(bytes(raw))
        _load_or_data_error(path, kind)


def test_a_parquet_string_column_with_invalid_utf8():
    # Latin-1 bytes in a column typed as UTF-8 strings, as a writer that does not check them
    # leaves them
    data = b"caf\xe9"
    column = pa.StringArray.from_buffers(1, pa.py_buffer(struct.pack("<2i", 0, len(data))),
                                         pa.py_buffer(data))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.parquet"
        try:
            pq.write_table(pa.table({"text": column}), path)
        except pa.ArrowException:
            pytest.skip("this pyarrow refuses to write invalid UTF-8")
        _load_or_data_error(path, None)
