"""Record kinds, loading from every file type, and errors that name file, line and field."""

from __future__ import annotations

import codecs
import json
import logging

import pytest

from posttrain.data.formats import (
    detect_kind,
    distinct_prompts,
    unpair_preferences,
    validate_record,
)
from posttrain.data.loading import load_examples, read_records, shuffled, split_examples
from posttrain.errors import DataError

RECORDS = {
    "prompt": {"prompt": "1+2=", "answer": "3"},
    "preference": {"prompt": "q:", "chosen": "good", "rejected": "bad"},
    "unpaired": {"prompt": "q:", "completion": "good", "label": True},
    "completion": {"prompt": "1+2=", "completion": "3"},
    "messages": {"messages": [{"role": "user", "content": "hi"},
                              {"role": "assistant", "content": "hello"}]},
    "text": {"text": "some pretraining text"},
}


@pytest.mark.parametrize("kind", list(RECORDS))
def test_each_kind_is_detected_and_validated(kind):
    assert detect_kind(RECORDS[kind]) == kind
    ex = validate_record(RECORDS[kind], "x.jsonl line 1")
    assert ex.kind == kind and ex.where == "x.jsonl line 1"


def test_extra_columns_are_kept():
    ex = validate_record({"prompt": "1+2=", "answer": "3", "level": 2}, "w")
    assert ex.extra == {"answer": "3", "level": 2}


def test_conversational_preference_record():
    rec = {"prompt": [{"role": "user", "content": "q"}],
           "chosen": [{"role": "assistant", "content": "a"}],
           "rejected": [{"role": "assistant", "content": "b"}]}
    ex = validate_record(rec, "w")
    assert ex.chosen == [{"role": "assistant", "content": "a"}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_json_parquet_and_dataset_dir_load_the_same(tmp_path):
    import datasets

    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(5)]
    jsonl = write_jsonl(tmp_path / "d.jsonl", rows)
    js = tmp_path / "d.json"
    js.write_text(json.dumps(rows))
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    loaded = [load_examples(p, kind="prompt") for p in
              (jsonl, js, tmp_path / "d.parquet", tmp_path / "saved", tmp_path / "dd")]
    for exs in loaded:
        assert [(e.prompt, e.extra["answer"]) for e in exs] == [(r["prompt"], r["answer"])
                                                                for r in rows]
    assert loaded[0][2].where.endswith("d.jsonl line 3")
    assert loaded[2][2].where.endswith("d.parquet row 2")
    assert len(load_examples(tmp_path / "dd", split="test")) == 1
    with pytest.raises(DataError, match="no split 'validation'"):
        load_examples(tmp_path / "dd", split="validation")


def test_blank_lines_are_skipped(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    assert [e.text for e in load_examples(p)] == ["a", "b"]


@pytest.mark.parametrize(
    ("content", "kind", "message"),
    [
        (b'{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": \n', "prompt",
         r"d\.jsonl line 2: not valid JSON"),
        (b'{"prompt": "a"}\n{"answer": "1"}\n', "prompt", r"line 2: missing field 'prompt'"),
        (b'{"prompt": 5}\n', "prompt", r"line 1: field 'prompt': expected a string or a list "
                                       r"of messages, got int"),
        (b'{"prompt": "   "}\n', "prompt", r"line 1: field 'prompt': is empty"),
        (b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n', "prompt",
         r"line 2: not valid UTF-8 \(byte 0xe9 at column 16\)"),
        (b'[1, 2]\n', "prompt", r"line 1: expected an object with named fields, got list"),
        (b'{"prompt": "q", "chosen": "a", "rejected": null}\n', "preference",
         r"field 'rejected': expected a string or a list of messages, got null"),
        (b'{"messages": [{"role": "robot", "content": "x"}]}\n', "messages",
         r"field 'messages\[0\].role': 'robot' is not one of"),
        (b'{"messages": [{"role": "user", "content": 3}]}\n', "messages",
         r"field 'messages\[0\].content': expected a string, got int"),
        (b'{"prompt": "q", "chosen": "a", "rejected": [{"role": "assistant", "content": "b"}]}\n',
         "preference", r"mix strings and message lists"),
        (b'{"foo": 1}\n', None, r"line 1: cannot tell the record kind"),
        (b'{"prompt": "q", "completion": "a", "label": true}\n'
         b'{"prompt": "q", "completion": "b", "label": 1}\n', "unpaired",
         r"d\.jsonl line 2: field 'label': expected true \(desirable\) or false "
         r"\(undesirable\), got 1"),
        (b'{"prompt": "q", "completion": "a", "label": "yes"}\n', None,
         r"line 1: field 'label': expected true .* got 'yes'"),
        (b'{"prompt": "q", "completion": "a"}\n', "unpaired",
         r"line 1: missing field 'label' \(a 'unpaired' record needs prompt, completion, "
         r"label"),
        (b'{"prompt": "q", "completion": null, "label": false}\n', "unpaired",
         r"line 1: field 'completion': expected a string or a list of messages, got null"),
        (b'{"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}\n', "preference",
         r"line 1: field 'margin': expected a finite number .* got 'big'"),
        (b'{"prompt": "q", "chosen": "a", "rejected": "b", "margin": true}\n', "preference",
         r"line 1: field 'margin': expected a finite number"),
        (b'{"prompt": "q", "chosen": "a", "rejected": "b", "margin": NaN}\n', "preference",
         r"line 1: field 'margin': expected a finite number"),
    ],
)
def test_malformed_input_names_where(tmp_path, content, kind, message):
    p = tmp_path / "d.jsonl"
    p.write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_examples(p, kind=kind)


def test_missing_file_and_unknown_type(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_examples(tmp_path / "nope.jsonl")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"unknown file type '\.csv'"):
        list(read_records(tmp_path / "d.csv"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="holds no records"):
        load_examples(tmp_path / "empty.jsonl")


def test_a_utf8_byte_order_mark_is_read_past(tmp_path):
    # Windows editors (Notepad, Excel's "UTF-8" export) start files with EF BB BF
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_bytes(codecs.BOM_UTF8 + b'{"text": "a"}\n{"text": "b"}\n')
    assert [e.text for e in load_examples(jsonl)] == ["a", "b"]
    js = tmp_path / "d.json"
    js.write_bytes(codecs.BOM_UTF8 + json.dumps([{"text": "a"}]).encode())
    assert [e.text for e in load_examples(js)] == ["a"]
    # columns of line 1 still count from what an editor shows, after the mark
    jsonl.write_bytes(codecs.BOM_UTF8 + b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl line 1: not valid UTF-8 \(byte 0xe9 at "
                                        r"column 16\)"):
        load_examples(jsonl)


def test_pairs_whose_chosen_equals_rejected_are_left_out_with_a_warning(tmp_path, caplog):
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "q1", "chosen": "a", "rejected": "b"},
        {"prompt": "q2", "chosen": "same", "rejected": "same"},
        {"prompt": "q3", "chosen": "c", "rejected": "d"},
        {"chosen": "Q: 1? A: x", "rejected": "Q: 1? A: x"},  # implicit prompt
    ])
    for kind in ("preference", None):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="posttrain.data.loading"):
            examples = load_examples(path, kind=kind)
        assert [e.prompt for e in examples] == ["q1", "q3"]
        assert [r.getMessage() for r in caplog.records] == [
            f"{path}: left out 2 preference pairs whose 'chosen' equals 'rejected' (line 2, "
            "line 4): they say nothing about which response is better; give two different "
            "responses to train on them"]
    # a malformed pair is still an error naming its field, not a duplicate
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "chosen": None, "rejected": None}])
    with pytest.raises(DataError, match=r"bad\.jsonl line 1: field 'chosen': expected a string"):
        load_examples(bad)
    # nothing left: an error, not an empty run
    only = write_jsonl(tmp_path / "only.jsonl", [{"prompt": "q", "chosen": "x", "rejected": "x"}])
    with pytest.raises(DataError, match=r"only\.jsonl: every preference pair in it \(1\) has "
                                        r"'chosen' equal to 'rejected'"):
        load_examples(only)


def test_a_directory_that_is_not_a_saved_dataset_says_what_is_accepted(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    accepted = ("give a data file (.jsonl, .ndjson, .json, .parquet or .pq) or a directory "
                "written by `datasets`' save_to_disk (a Dataset or a DatasetDict)")
    with pytest.raises(DataError) as err:
        load_examples(folder)
    assert str(err.value) == (f"{folder}: is a directory but not a saved dataset (it has "
                              "neither dataset_info.json and state.json nor dataset_dict.json); "
                              f"{accepted}")
    write_jsonl(folder / "train.jsonl", [{"text": "a"}])
    with pytest.raises(DataError) as err:
        load_examples(folder)
    assert str(err.value).endswith(f"{accepted}; did you mean {str(folder / 'train.jsonl')!r}?")


def test_split_and_shuffle_are_seeded():
    exs = [validate_record({"text": str(i)}, f"line {i}") for i in range(20)]
    train, held = split_examples(exs, 0.25, seed=1)
    assert len(held) == 5 and len(train) == 15
    assert {e.text for e in train} | {e.text for e in held} == {str(i) for i in range(20)}
    assert split_examples(exs, 0.25, seed=1) == (train, held)
    assert split_examples(exs, 0.25, seed=2) != (train, held)
    assert shuffled(list(range(10)), 3) == shuffled(list(range(10)), 3)
    with pytest.raises(DataError, match="eval_fraction"):
        split_examples(exs, 1.0)


def test_unpaired_records_and_margins():
    ex = validate_record({"prompt": "q:", "completion": "bad", "label": False, "id": 3}, "w")
    assert (ex.kind, ex.prompt, ex.completion, ex.label, ex.extra) == (
        "unpaired", "q:", "bad", False, {"id": 3})
    # a margin column is kept (as a float) for the reward model; null means "no margin"
    pair = validate_record({"prompt": "q", "chosen": "a", "rejected": "b", "margin": 2}, "w")
    assert pair.extra["margin"] == 2.0 and isinstance(pair.extra["margin"], float)
    none = validate_record({"prompt": "q", "chosen": "a", "rejected": "b", "margin": None}, "w")
    assert none.extra["margin"] is None


def test_unpair_preferences_gives_chosen_true_then_rejected_false():
    pairs = [validate_record({"prompt": "p1", "chosen": "a", "rejected": "b", "k": 1},
                             "d.jsonl line 1"),
             validate_record({"prompt": "p2", "chosen": "c", "rejected": "d", "k": 2},
                             "d.jsonl line 2")]
    out = unpair_preferences(pairs)
    assert [(e.kind, e.prompt, e.completion, e.label, e.extra["k"]) for e in out] == [
        ("unpaired", "p1", "a", True, 1), ("unpaired", "p1", "b", False, 1),
        ("unpaired", "p2", "c", True, 2), ("unpaired", "p2", "d", False, 2)]
    assert out[1].where == "d.jsonl line 1 (rejected)"
    assert all(e.chosen is None and e.rejected is None for e in out)
    # unpaired examples pass through; other kinds are an error naming the record
    assert unpair_preferences(out[:1]) == out[:1]
    with pytest.raises(DataError, match=r"t line 4: expected a preference or unpaired"):
        unpair_preferences([validate_record({"text": "x"}, "t line 4")])
    # each prompt once, in order
    assert [e.prompt for e in distinct_prompts(out)] == ["p1", "p2"]
