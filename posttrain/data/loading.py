"""Loading records from JSONL, JSON, Parquet, a saved `datasets` directory or the hub.

Every record comes with where it was found ("train.jsonl line 7", "train.parquet row 3"), so
validation errors point at the exact place to fix. Text files may start with a UTF-8 byte
order mark (as Windows editors write them). Preference pairs whose `chosen` equals `rejected`
are left out, with a warning that counts them and names their lines.
"""

from __future__ import annotations

import codecs
import json
import logging
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from posttrain.data.formats import Example, identical_pair, validate_record
from posttrain.errors import DataError

log = logging.getLogger(__name__)


def _read_jsonl(path: Path) -> Iterator[tuple[Any, str]]:
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path} line {number}"
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]  # columns below count from after it
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
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{where}: not valid JSON ({err.msg} at column {err.colno}); each line "
                    "must hold one JSON object"
                ) from None
            except (ValueError, RecursionError) as err:  # past the parser's limits
                raise DataError(f"{where}: JSON the parser refuses ({_one_line(err)})") from None
            yield record, where


def _read_json(path: Path) -> Iterator[tuple[Any, str]]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))  # a BOM is not JSON
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 (byte offset {err.start})") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path} line {err.lineno}: not valid JSON ({err.msg})") from None
    except (ValueError, RecursionError) as err:  # a number too long, nesting too deep
        raise DataError(f"{path}: JSON the parser refuses ({_one_line(err)})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records (or {{'data': [...]}})")
    for i, record in enumerate(data):
        yield record, f"{path} item {i}"


def _read_parquet(path: Path) -> Iterator[tuple[Any, str]]:
    import pyarrow.parquet as pq

    try:
        # to Python values here too: a date out of range or a string that is not UTF-8 fails
        # only in the conversion
        records = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: cannot read as Parquet ({_one_line(err)})") from None
    for i, record in enumerate(records):
        yield record, f"{path} row {i}"


def _one_line(err: BaseException) -> str:
    """An exception's message on one line (pyarrow's and json's may span several)."""
    return " ".join(str(err).split()) or type(err).__name__


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


READERS = {".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".json": _read_json,
           ".parquet": _read_parquet, ".pq": _read_parquet}
"""The data files read, by extension."""

SAVED_DATASET = (("dataset_info.json", "state.json"), ("dataset_dict.json",))
"""The files of a `datasets.save_to_disk` directory: a `Dataset`'s, or a `DatasetDict`'s."""


def _extensions() -> str:
    names = list(READERS)
    return f"{', '.join(names[:-1])} or {names[-1]}"


def _not_a_dataset(path: Path) -> DataError:
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in READERS)
    hint = f"; did you mean {str(files[0])!r}?" if files else ""
    return DataError(
        f"{path}: is a directory but not a saved dataset (it has neither dataset_info.json and "
        f"state.json nor dataset_dict.json); give a data file ({_extensions()}) or a directory "
        f"written by `datasets`' save_to_disk (a Dataset or a DatasetDict){hint}")


def read_records(source: str | Path, split: str = "train") -> Iterator[tuple[Any, str]]:
    """Yield `(record, where)` pairs from a file, a saved dataset directory or a hub id."""
    path = Path(source)
    suffix = path.suffix.lower()
    if path.is_file():
        if suffix in READERS:
            return READERS[suffix](path)
        raise DataError(f"{path}: unknown file type {suffix!r}; use {_extensions()}")
    if path.is_dir():
        if not any(all((path / name).is_file() for name in names) for names in SAVED_DATASET):
            raise _not_a_dataset(path)
        return _read_dataset(str(path), split)
    if suffix in READERS or str(source).startswith((".", "/")):
        raise DataError(f"{source}: no such file or directory")
    return _read_dataset(str(source), split)


def load_examples(
    source: str | Path, kind: str | None = None, split: str = "train", limit: int | None = None
) -> list[Example]:
    """Read and validate every record of `source` (all must be of one kind). Preference pairs
    whose `chosen` equals `rejected` are left out, with one warning counting them.

    Args:
        source: a .jsonl/.json/.parquet file, a `datasets.save_to_disk` directory or a hub id.
        kind: the record kind required (see `posttrain.data.formats`); None to detect it from
            the first record.
        split: the split of a dataset directory or hub dataset.
        limit: read at most this many records.
    """
    examples: list[Example] = []
    identical: list[str] = []  # where each pair with chosen == rejected was
    for record, where in read_records(source, split):
        if limit is not None and len(examples) >= limit:
            break
        if kind in (None, "preference") and identical_pair(record, where):
            identical.append(where)
            continue
        ex = validate_record(record, where, kind)
        if kind is None:
            kind = ex.kind
        examples.append(ex)
    if identical and not examples:
        raise DataError(f"{source}: every preference pair in it ({len(identical)}) has "
                        "'chosen' equal to 'rejected'; a pair needs two different responses")
    if identical:
        log.warning("%s", _identical_warning(identical))
    if not examples:
        raise DataError(f"{source}: holds no records")
    return examples


def _identical_warning(wheres: Sequence[str], shown: int = 5) -> str:
    """One line: how many pairs were left out and where ("d.jsonl: ... (line 3, line 9)")."""
    heads = {w.rsplit(" ", 2)[0] for w in wheres}
    if len(heads) == 1 and all(len(w.rsplit(" ", 2)) == 3 for w in wheres):
        head = heads.pop()
        places = [w[len(head) + 1:] for w in wheres]
    else:
        head, places = "data", list(wheres)
    more = f" and {len(places) - shown} more" if len(places) > shown else ""
    one = len(wheres) == 1
    return (f"{head}: left out {len(wheres)} preference pair{'' if one else 's'} whose "
            f"'chosen' equals 'rejected' ({', '.join(places[:shown])}{more}): "
            f"{'it says' if one else 'they say'} nothing about which response is better; give "
            f"two different responses to train on {'it' if one else 'them'}")


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
