"""Configs: YAML with base: inheritance, overrides, and one-line errors that say what to do."""

from __future__ import annotations

import pytest

from posttrain.config import config_help, load_config, parse_overrides, read_yaml
from posttrain.errors import ConfigError
from posttrain.trainers.dpo import DPOConfig
from posttrain.trainers.rl import RLConfig
from posttrain.trainers.sft import SFTConfig

MINIMAL = {"model": {"path": "m"}, "data": {"train": "d.jsonl"}}


def test_yaml_base_inheritance_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "model: {path: base-model}\ndata: {train: d.jsonl}\noptim: {lr: 0.001, warmup_steps: 5}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\noptim: {lr: 0.002}\n")
    cfg = load_config(SFTConfig, tmp_path / "child.yaml",
                      ["--optim.schedule", "cosine", "--run.steps=7", "--optim.lr", "1e-5"])
    assert cfg.model.path == "base-model"
    assert cfg.optim.warmup_steps == 5  # kept from the base
    assert cfg.optim.lr == 1e-5  # the override wins over the child, the child over the base
    assert cfg.optim.schedule == "cosine" and cfg.run.steps == 7


def test_overrides_are_typed():
    assert parse_overrides(["--a.b", "true", "--a.c", "3", "--d", "null", "--e", "[1, 2]",
                            "--f", "1e-5", "--g", "runs/x"]) == {
        "a": {"b": True, "c": 3}, "d": None, "e": [1, 2], "f": 1e-5, "g": "runs/x"}


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim\.lr_rate'; did you mean "
                                          r"'optim\.lr'\?"):
        load_config(SFTConfig, overrides={**MINIMAL, "optim": {"lr_rate": 1}})
    with pytest.raises(ConfigError, match=r"did you mean 'dpo\.beta'"):
        load_config(DPOConfig, overrides=["--dpo.bta", "0.2", "--model.path", "m",
                                          "--data.train", "d"])


def test_wrong_types_and_choices_name_the_key():
    with pytest.raises(ConfigError, match=r"optim\.lr: expected a number, got 'fast'"):
        load_config(SFTConfig, overrides={**MINIMAL, "optim": {"lr": "fast"}})
    with pytest.raises(ConfigError, match=r"run\.steps: expected an integer, got 2\.5"):
        load_config(SFTConfig, overrides={**MINIMAL, "run": {"steps": 2.5}})
    with pytest.raises(ConfigError, match=r"optim\.schedule: 'cosin' is not one of .*did you "
                                          r"mean 'cosine'"):
        load_config(SFTConfig, overrides={**MINIMAL, "optim": {"schedule": "cosin"}})
    with pytest.raises(ConfigError, match=r"run\.tensorboard: expected true or false"):
        load_config(SFTConfig, overrides={**MINIMAL, "run": {"tensorboard": "yes"}})


def test_missing_and_invalid_values():
    # a missing section is reported by the key inside it that has no default
    with pytest.raises(ConfigError, match=r"model\.path is required"):
        load_config(SFTConfig, overrides={"data": {"train": "d"}})
    with pytest.raises(ConfigError, match=r"model\.path is required"):
        load_config(SFTConfig, overrides={"model": {"dtype": "float32"}, "data": {"train": "d"}})
    with pytest.raises(ConfigError, match="lr must be > 0"):
        load_config(SFTConfig, overrides={**MINIMAL, "optim": {"lr": 0}})


def test_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_yaml(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_yaml(tmp_path / "bad.yaml")
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        read_yaml(tmp_path / "loop.yaml")


def test_yaml_with_a_tab_names_the_file_and_line(tmp_path):
    path = tmp_path / "tabbed.yaml"
    path.write_text("model:\n\tpath: m\ndata: {train: d.jsonl}\n")
    with pytest.raises(ConfigError) as err:
        load_config(SFTConfig, path)
    message = str(err.value)
    assert message == (f"{path} line 2 column 1: a tab character; YAML does not allow tabs in "
                       "indentation, indent with spaces")
    assert "<unicode string>" not in message
    # other YAML errors: one line, naming the file and line too
    (tmp_path / "bad.yaml").write_text("model: {path: m}\ndata: [1,\n")
    with pytest.raises(ConfigError,
                       match=r"bad\.yaml line \d+ column \d+: not valid YAML \(") as err:
        read_yaml(tmp_path / "bad.yaml")
    assert "\n" not in str(err.value) and "<unicode string>" not in str(err.value)


def test_help_lists_every_field_with_default_and_meaning():
    rows = {key: (default, text) for key, default, text in config_help(SFTConfig)}
    # the default the SFT config builds (2e-5), not OptimConfig's own
    assert rows["optim.lr"] == ("2e-05", "Peak learning rate of AdamW.")
    assert rows["model.path"][0] == "(required)" or rows["model.path"][0] == "''"
    assert all(text for _, text in rows.values()), [k for k, (_, t) in rows.items() if not t]


def test_configs_are_frozen():
    cfg = load_config(SFTConfig, overrides=MINIMAL)
    with pytest.raises(AttributeError):
        cfg.optim.lr = 1.0


# What the fuzzing of the config layer (test_fuzz_config.py) found, each a traceback or a
# silent acceptance before: the message that replaced it.
FOUND_BY_FUZZING = [
    ("optim:\n  lr: .nan\n", r"^optim\.lr: expected a finite number, got nan$"),
    ("optim:\n  lr: 1e999\n", r"^optim\.lr: expected a finite number, got '1e999'$"),
    ("optim:\n  lr: " + "9" * 400 + "\n", r"^optim\.lr: expected a number, got 9999.*\.\.\.$"),
    ("optim:\n  1: 2\n", r"^optim: key 1 \(int\) is no key name"),
    ("null: 2\n", r"^config: key None \(NoneType\) is no key name"),
    ('"a\\nb": 2\n', r"^unknown config key 'a\\nb'"),
    ("run:\n  steps: !!int x\n", r"config\.yaml: not valid YAML \(a value YAML cannot convert: "
                                 r"invalid literal for int"),
    ("run:\n  name: 2020-13-45\n", r"config\.yaml: not valid YAML \(a value YAML cannot convert"),
    ("run:\n  steps: " + "1" * 5000 + "\n", r"config\.yaml: not valid YAML \(a value YAML "
                                             r"cannot convert: Exceeds the limit"),
    ("run:\n  name: &a [*a]\n", r"config\.yaml: not valid YAML \(an alias refers to a value "
                                r"that holds it"),
    ("reward: " + "[" * 3000 + "]" * 3000 + "\n", r"nested deeper than 32 levels"),
    ("base: [a]\n", r"config\.yaml: base: expected a file path or preset:NAME, got \['a'\]"),
    ('base: "a\\0b.yaml"\n', r"^config file '.*a\\x00b\.yaml' does not exist$"),
    ("imports: ['']\n", r"^imports: '' is not a module name"),
    ("imports: ['.relative']\n", r"^imports: '\.relative' is not a module name"),
]


@pytest.mark.parametrize(("text", "message"), FOUND_BY_FUZZING,
                         ids=[t[:24] for t, _ in FOUND_BY_FUZZING])
def test_what_the_fuzzing_found_is_one_config_error(tmp_path, text, message):
    path = tmp_path / "config.yaml"
    path.write_text("model: {path: m}\ndata: {train: d.jsonl}\n" + text, encoding="utf-8")
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(RLConfig if "imports" in text else SFTConfig, path)
    assert "\n" not in str(caught.value)


def test_an_override_may_not_make_a_section_of_a_value():
    with pytest.raises(ConfigError, match=r"^override --optim\.lr: --optim was given a value"):
        parse_overrides(["--optim", "1", "--optim.lr", "2"])
    for word in ["--", "--.", "--a..b", "--a\nb"]:
        with pytest.raises(ConfigError, match=r"not a key; overrides look like"):
            parse_overrides([word, "1"])
    # a word that is no finite number stays a word: "1e999" names a run, it is no lr
    assert parse_overrides(["--run.name", "1e999"]) == {"run": {"name": "1e999"}}
    with pytest.raises(ConfigError, match=r"^optim\.lr: expected a finite number, got '1e999'"):
        load_config(SFTConfig, overrides=["--optim.lr", "1e999", "--model.path", "m",
                                          "--data.train", "d"])


def test_a_key_that_is_a_python_keyword(tmp_path):
    # rollout.async names the field async_ (a keyword cannot name a field): YAML, overrides,
    # --help and the saved config all say `async`
    from posttrain.config import save_config

    required = ["--model.path", "m", "--data.train", "d"]
    cfg = load_config(RLConfig, overrides=["--rollout.async", "true", *required])
    assert cfg.rollout.async_ is True
    (tmp_path / "c.yaml").write_text("model: {path: m}\ndata: {train: d}\nrollout: {async: true}\n")
    assert load_config(RLConfig, tmp_path / "c.yaml").rollout.async_ is True
    assert "rollout.async" in [key for key, _, _ in config_help(RLConfig)]
    save_config(cfg, tmp_path / "saved.yaml")
    assert "  async: true\n" in (tmp_path / "saved.yaml").read_text()
    assert load_config(RLConfig, tmp_path / "saved.yaml") == cfg
    with pytest.raises(ConfigError, match=r"did you mean 'rollout\.async'"):
        load_config(RLConfig, overrides=["--rollout.asynk", "true", *required])
