"""Loading records from JSONL, JSON, Parquet, a saved `datasets` directory or the hub.

Every record comes with where it was found ("train.jsonl line 7", "train.parquet row 3"), so
validation errors point at the exact place to fix.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from posttrain.data.formats import Example, validate_record
from posttrain.errors import DataError


def _read_jsonl(path: Path) -> Iterator[tuple[Any, str]]:
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path} line {number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{where}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column "
                    f"{err.start + 1}); re-encode the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                yield json.loads(line), where
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{where}: not valid JSON ({err.msg} at column {err.colno}); each line "
                    "must hold one JSON object"
                ) from None


def _read_json(path: Path) -> Iterator[tuple[Any, str]]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 (byte offset {err.start})") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path} line {err.lineno}: not valid JSON ({err.msg})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records (or {{'data': [...]}})")
    for i, record in enumerate(data):
        yield record, f"{path} item {i}"


def _read_parquet(path: Path) -> Iterator[tuple[Any, str]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: cannot read as Parquet ({err})") from None
    for i, record in enumerate(table.to_pylist()):
        yield record, f"{path} row {i}"


def _read_dataset(source: str, split: str) -> Iterator[tuple[Any, str]]:
    import datasets

    path = Path(source)
    if path.is_dir():
        ds = datasets.load_from_disk(str(path))
    else:  # a hub id; needs the network or the local cache
        ds = datasets.load_dataset(source, split=split)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{source}: has no split {split!r}; it has {', '.join(ds)}")
        ds = ds[split]
    for i, record in enumerate(ds):
        yield record, f"{source} [{split}] row {i}"


def read_records(source: str | Path, split: str = "train") -> Iterator[tuple[Any, str]]:
    """Yield `(record, where)` pairs from a file, a saved dataset directory or a hub id."""
    path = Path(source)
    suffix = path.suffix.lower()
    if path.is_file():
        if suffix in (".jsonl", ".ndjson"):
            return _read_jsonl(path)
        if suffix == ".json":
            return _read_json(path)
        if suffix in (".parquet", ".pq"):
            return _read_parquet(path)
        raise DataError(f"{path}: unknown file type {suffix!r}; use .jsonl, .json or .parquet")
    if path.is_dir():
        return _read_dataset(str(path), split)
    if suffix in (".jsonl", ".json", ".parquet") or str(source).startswith((".", "/")):
        raise DataError(f"{source}: no such file or directory")
    return _read_dataset(str(source), split)


def load_examples(
    source: str | Path, kind: str | None = None, split: str = "train", limit: int | None = None
) -> list[Example]:
    """Read and validate every record of `source` (all must be of one kind).

    Args:
        source: a .jsonl/.json/.parquet file, a `datasets.save_to_disk` directory or a hub id.
        kind: the record kind required (see `posttrain.data.formats`); None to detect it from
            the first record.
        split: the split of a dataset directory or hub dataset.
        limit: read at most this many records.
    """
    examples: list[Example] = []
    for record, where in read_records(source, split):
        if limit is not None and len(examples) >= limit:
            break
        ex = validate_record(record, where, kind)
        if kind is None:
            kind = ex.kind
        examples.append(ex)
    if not examples:
        raise DataError(f"{source}: holds no records")
    return examples


def shuffled(items: Sequence, seed: int) -> list:
    """A copy of `items` in an order that depends only on `seed`."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in order]


def split_examples(
    examples: Sequence[Example], eval_fraction: float, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """Shuffle with `seed` and hold out `eval_fraction` of the examples (at least one)."""
    if not 0.0 < eval_fraction < 1.0:
        raise DataError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    items = shuffled(examples, seed)
    n_eval = max(1, round(len(items) * eval_fraction))
    if n_eval >= len(items):
        raise DataError(f"{len(items)} examples are too few to hold out {eval_fraction:.0%}")
    return items[n_eval:], items[:n_eval]
