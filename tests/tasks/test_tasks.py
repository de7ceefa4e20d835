"""The built-in tasks: files, formats, determinism, the properties each task promises, the
registry and the `posttrain tasks` command. Models are not built here (see test_tiny.py)."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.cli import main
from posttrain.data.formats import detect_kind, validate_record
from posttrain.errors import ConfigError, DataError, RewardError
from posttrain.tasks import TASKS, list_tasks, make_task, register_task
from posttrain.tasks.arithmetic import (
    ANSWER_PATTERN,
    carry_free_sum,
    check_cot,
    cot_completion,
    cot_completion_forgetting_carries,
    cot_completion_with_slip,
    cot_has_carry,
    extract_answer,
    has_carry,
    parse_cot,
)
from posttrain.tasks.preference import (
    BaseSampler,
    GoldReward,
    GoldScorer,
    PreferenceConfig,
    build_preference,
    make_preference_pairs,
)

NAMES = ("arithmetic", "arithmetic_cot", "arithmetic_cot_free", "preference")
MULTITURN = ("calculator", "guess")  # their data and environments: test_multiturn.py
ALL_NAMES = ", ".join(NAMES + MULTITURN)  # as an error lists them


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    """Each task made once with seed 0 and no model."""
    root = tmp_path_factory.mktemp("tasks")
    return {name: make_task(name, root / name, seed=0, model=False) for name in NAMES}


def files(out: Path) -> dict[str, list[dict]]:
    info = json.loads((out / "task.json").read_text())
    return {stem: read_jsonl(out / f["path"]) for stem, f in info["files"].items()}


def sum_of(prompt: str) -> int:
    a, b = re.fullmatch(r"(\d+)\+(\d+)=", prompt).groups()
    return int(a) + int(b)


# --- every task --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_files_exist_and_validate(made, name):
    out = made[name]
    info = json.loads((out / "task.json").read_text())
    assert info["name"] == name and info["seed"] == 0 and info["model"] is None
    assert set(info["files"]) == set(TASKS[name].files)
    for stem, f in info["files"].items():
        path = out / f["path"]
        records = read_jsonl(path)
        assert len(records) == f["records"] > 0, stem
        for i, record in enumerate(records, start=1):
            example = validate_record(record, f"{path} line {i}", f["kind"])
            # The kind a loader would detect on its own is the declared one.
            assert detect_kind(record) == example.kind == f["kind"]
    expected = {"sft_train": "completion", "sft_eval": "completion", "rl_train": "prompt",
                "rl_eval": "prompt"}
    if name in ("preference", "arithmetic_cot", "arithmetic_cot_free"):
        expected |= {"pref_train": "preference", "pref_eval": "preference"}
    if name in ("arithmetic", "arithmetic_cot", "arithmetic_cot_free"):
        expected |= {"ptx_train": "completion"}
    assert {s: f["kind"] for s, f in info["files"].items()} == expected


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_bytes_other_seed_other_data(made, tmp_path, name):
    again = make_task(name, tmp_path / "again", seed=0, model=False)
    other = make_task(name, tmp_path / "other", seed=1, model=False)
    stems = TASKS[name].files
    for stem in stems:
        assert (again / f"{stem}.jsonl").read_bytes() == (made[name] / f"{stem}.jsonl").read_bytes()
        assert (other / f"{stem}.jsonl").read_bytes() != (made[name] / f"{stem}.jsonl").read_bytes()


@pytest.mark.parametrize("name", NAMES)
def test_eval_prompts_never_in_training_files(made, name):
    data = files(made[name])
    train = {r["prompt"] for stem, rs in data.items() if stem.endswith("_train") for r in rs}
    held_out = {r["prompt"] for stem, rs in data.items() if stem.endswith("_eval") for r in rs}
    assert held_out and train and not held_out & train


# --- arithmetic --------------------------------------------------------------------------------


def test_arithmetic_answers_and_wrong_demonstrations(made):
    data = files(made["arithmetic"])
    assert data["sft_train"][0]["prompt"].endswith("=")
    for stem in ("rl_train", "rl_eval"):
        assert all(r["answer"] == str(sum_of(r["prompt"])) for r in data[stem])
    assert all(r["completion"] == str(sum_of(r["prompt"])) for r in data["sft_eval"])
    operands = [int(x) for r in data["rl_train"] for x in r["prompt"][:-1].split("+")]
    assert min(operands) == 0 and max(operands) == 49
    # 2,500 pairs: 250 held out, 2,250 for training.
    assert len(data["rl_eval"]) == 250 and len(data["rl_train"]) == 2250
    pairs = [tuple(map(int, r["prompt"][:-1].split("+"))) for r in data["sft_train"]]
    answers = [int(r["completion"]) for r in data["sft_train"]]
    n_carry = sum((a % 10 + b % 10) >= 10 for a, b in pairs)
    # 70% of the 1,002 sums with a carry forget it (701, 10 short); a tenth of the other
    # 1,549 are off by 1..10 at random (155); a random -10 looks like a slip, hence the range
    short = sum(ans == a + b - 10 for ans, (a, b) in zip(answers, pairs, strict=True))
    wrong = sum(ans != a + b for ans, (a, b) in zip(answers, pairs, strict=True))
    assert n_carry == 1002 and 701 <= short <= 701 + 155
    assert wrong == 701 + 155
    for ans, (a, b) in zip(answers, pairs, strict=True):
        assert ans >= 0 and 0 <= abs(ans - a - b) <= 10
    # ptx text: exactly the right demonstrations without a carry (1,248 carry-free sums, less
    # those of the 155 random slips that fell on them), none with the demonstrator's slip
    right_free = [f"{a}+{b}=" for ans, (a, b) in zip(answers, pairs, strict=True)
                  if ans == a + b and (a % 10 + b % 10) < 10]
    assert [r["prompt"] for r in data["ptx_train"]] == right_free
    assert all(r["completion"] == str(sum_of(r["prompt"])) for r in data["ptx_train"])
    assert 2250 - 1002 - 155 <= len(right_free) < 2250 - 1002
    # SFT and RL training files ask the same prompts.
    assert sorted(r["prompt"] for r in data["sft_train"]) == sorted(
        r["prompt"] for r in data["rl_train"])


def test_carry_free_sum_and_the_carry_slip_option(tmp_path):
    assert carry_free_sum(37, 48) == 75 and carry_free_sum(5, 5) == 0
    assert carry_free_sum(99, 1) == 90 and carry_free_sum(40, 9) == 49
    assert has_carry(37, 48) and has_carry(5, 5) and not has_carry(40, 9)
    out = make_task("arithmetic", tmp_path, model=False, wrong_fraction=0.0,
                    carry_slip_fraction=0.5)
    records = files(out)["sft_train"]
    pairs = [tuple(map(int, r["prompt"][:-1].split("+"))) for r in records]
    carries = [i for i, (a, b) in enumerate(pairs) if has_carry(a, b)]
    wrong = [i for i, r in enumerate(records) if int(r["completion"]) != sum(pairs[i])]
    # exactly half the carries forgotten, nothing else wrong
    assert set(wrong) <= set(carries) and len(wrong) == round(0.5 * len(carries))
    assert all(int(records[i]["completion"]) == carry_free_sum(*pairs[i]) for i in wrong)


@pytest.mark.parametrize("fraction", [0.0, 0.5])
def test_arithmetic_wrong_fraction_option(tmp_path, fraction):
    out = make_task("arithmetic", tmp_path, model=False, wrong_fraction=fraction, max_operand=19,
                    carry_slip_fraction=0.0)
    data = files(out)
    wrong = sum(r["completion"] != str(sum_of(r["prompt"])) for r in data["sft_train"])
    assert wrong == round(fraction * len(data["sft_train"]))
    assert all(r["completion"] == str(sum_of(r["prompt"])) for r in data["sft_eval"])


# --- arithmetic_cot ----------------------------------------------------------------------------


def test_cot_format_by_hand():
    # 347 + 85: 7+5 = 12 (write 2, carry 1); 4+8+1 = 13 (write 3, carry 1); 3+0+1 = 4.
    assert cot_completion(347, 85) == "7+5=12;4+8+1=13;3+0+1=4;#432"
    assert cot_completion(7, 5) == "7+5=12;#12"
    assert cot_completion(0, 0) == "0+0=0;#0"
    assert cot_completion(999, 999) == "9+9=18;9+9+1=19;9+9+1=19;#1998"
    assert parse_cot("7+5=12;4+8+1=13;3+0+1=4;#432") == (
        [(7, 5, 0, 12), (4, 8, 1, 13), (3, 0, 1, 4)], 432)
    assert parse_cot("the answer is 432") is None
    assert extract_answer("7+5=12;#12") == "12" and extract_answer("12") is None
    assert check_cot("347+85=", "7+5=12;4+8+1=13;3+0+1=4;#432")
    assert not check_cot("347+85=", "7+5=12;4+8=12;3+0=3;#322")


def test_cot_forgetting_carries_by_hand():
    # 347 + 85 without carrying: 7+5 = 12, then 4+8 = 12 and 3+0 = 3 (no +1): 3, 2, 2.
    assert cot_completion_forgetting_carries(347, 85) == "7+5=12;4+8=12;3+0=3;#322"
    # the last column's own overflow is written, as in the right working
    assert cot_completion_forgetting_carries(9, 9) == "9+9=18;#18"
    assert cot_completion_forgetting_carries(99, 1) == "9+1=10;9+0=9;#90"
    assert cot_completion_forgetting_carries(40, 9) == cot_completion(40, 9)
    assert cot_has_carry(347, 85) and cot_has_carry(99, 1)
    assert not cot_has_carry(9, 9) and not cot_has_carry(40, 9)
    # the right working is two characters longer a carry
    assert len(cot_completion(347, 85)) - len(cot_completion_forgetting_carries(347, 85)) == 4


def test_cot_slip_is_one_consistent_mistake():
    rng = random.Random(0)
    for a, b in [(347, 85), (0, 0), (999, 999), (5, 4), (90, 19)]:
        for _ in range(20):
            response = cot_completion_with_slip(a, b, rng)
            steps, answer = parse_cot(response)
            assert answer != a + b and abs(answer - (a + b)) in (1, 10, 100)
            assert all(0 <= s <= 19 for *_, s in steps)


def test_cot_answers_parse_and_lengths_vary(made):
    data = files(made["arithmetic_cot"])
    for r in data["sft_eval"]:
        assert re.search(ANSWER_PATTERN, r["completion"]).group(1) == str(sum_of(r["prompt"]))
        assert check_cot(r["prompt"], r["completion"])
    for r in data["rl_eval"] + data["rl_train"]:
        assert r["answer"] == str(sum_of(r["prompt"]))
    train = data["sft_train"]
    pairs = [tuple(map(int, r["prompt"][:-1].split("+"))) for r in train]
    carries = [i for i, pair in enumerate(pairs) if cot_has_carry(*pair)]
    forgot = [i for i, r in enumerate(train)
              if r["completion"] == cot_completion_forgetting_carries(*pairs[i])
              and cot_has_carry(*pairs[i])]
    # 70% of the sums with a carry forget every carry; a tenth of the others have one slip
    assert set(forgot) <= set(carries) and len(forgot) == round(0.7 * len(carries))
    slipped = [i for i, r in enumerate(train) if i not in forgot
               and extract_answer(r["completion"]) != str(sum_of(r["prompt"]))]
    assert len(slipped) == round(0.1 * (len(train) - len(forgot)))
    assert all(parse_cot(r["completion"]) is not None for r in train)
    # ptx text: exactly the right workings without a carry, in training order
    assert data["ptx_train"] == [r for pair, r in zip(pairs, train, strict=True)
                                 if not cot_has_carry(*pair)
                                 and r["completion"] == cot_completion(*pair)]
    assert len(data["ptx_train"]) > 0.4 * len(train)
    lengths = [len(r["completion"]) for r in train]
    ratio = max(lengths) / min(lengths)
    print(f"arithmetic_cot completion lengths: {min(lengths)}..{max(lengths)} ({ratio:.1f}x)")
    assert ratio >= 3, f"completion lengths vary only {ratio:.1f}x"


def test_cot_free_is_cot_with_half_the_demonstrations_answering_without_working(made):
    cot, free = files(made["arithmetic_cot"]), files(made["arithmetic_cot_free"])
    for stem in cot:  # the same seed: every other file, and the other half, as in arithmetic_cot
        if stem not in ("sft_train", "ptx_train"):
            assert free[stem] == cot[stem], stem
    short = [i for i, (c, f) in enumerate(zip(cot["sft_train"], free["sft_train"], strict=True))
             if c != f]
    assert len(short) == round(0.5 * len(cot["sft_train"]))
    for i in short:
        record = free["sft_train"][i]
        assert record["completion"] == f"#{sum_of(record['prompt'])}"
        assert record["prompt"] == cot["sft_train"][i]["prompt"]
    assert all(r in cot["ptx_train"] for r in free["ptx_train"])
    lengths = [len(r["completion"]) for r in free["sft_train"]]
    assert min(lengths) == 2 and max(lengths) >= 25  # "#7" .. three columns of working


# --- preference --------------------------------------------------------------------------------


def gold_agreement(scorer: GoldScorer, pairs: list[dict]) -> float:
    return sum(scorer.score(p["prompt"], p["chosen"]) > scorer.score(p["prompt"], p["rejected"])
               for p in pairs) / len(pairs)


def test_preference_labels_follow_gold_and_noise_lowers_agreement(made):
    scorer = GoldScorer.from_file(made["preference"])
    data = files(made["preference"])
    clean = gold_agreement(scorer, data["pref_train"])
    assert clean > 0.7
    assert all(p["chosen"] != p["rejected"] for p in data["pref_train"])
    _, noisy = build_preference(0, PreferenceConfig(label_noise=0.3, n_pref_train=1000))
    # A flip with probability 0.3 moves agreement a towards 0.7 a + 0.3 (1 - a) = 0.81 -> 0.61.
    assert gold_agreement(scorer, noisy["pref_train"]) < clean - 0.1
    _, sharp = build_preference(0, PreferenceConfig(temperature=0.1, n_pref_train=1000))
    assert gold_agreement(scorer, sharp["pref_train"]) > 0.95


def test_base_sampler_draws_distinct_characters_by_its_probabilities():
    sampler = BaseSampler.from_seed(0)
    responses = sampler("x:", 20000, random.Random(0))
    assert all(len(set(r)) == len(r) and 2 <= len(r) <= 8 for r in responses)
    assert {len(r) for r in responses} == set(range(2, 9))
    # the first character is a plain draw from probs (standard error about 0.003)
    for c, p in sampler.probs.items():
        assert abs(sum(r[0] == c for r in responses) / len(responses) - p) < 0.015, c
    # the second is drawn from the others, renormalised: P(second = c) = sum over first = f
    # of p_f p_c / (1 - p_f)
    for c, p in sampler.probs.items():
        expected = sum(q * p / (1 - q) for f, q in sampler.probs.items() if f != c)
        assert abs(sum(r[1] == c for r in responses) / len(responses) - expected) < 0.015, c
    assert max(len(r) for r in BaseSampler.from_seed(0, "abc")("x:", 200, random.Random(0))) == 3
    with pytest.raises(ConfigError, match="distinct characters"):
        BaseSampler(probs={"a": 0.5, "b": 0.5}, max_length=3)


def test_gold_scorer_json_round_trip(tmp_path, made):
    scorer = GoldScorer.from_seed(3)
    loaded = GoldScorer.from_file(scorer.save(tmp_path / "gold.json"))
    rng = random.Random(0)
    responses = [*BaseSampler.from_seed(0)("x:", 200, rng), "", "dddddddddddddddd", "a1 b?"]
    for response in responses:
        assert loaded.score("owl fig cab:", response) == scorer.score("owl fig cab:", response)
    assert loaded == scorer
    assert GoldScorer.from_file(made["preference"] / "gold.json") == GoldScorer.from_seed(0)
    (tmp_path / "bad.json").write_text('{"weights": {}}')
    with pytest.raises(DataError, match="not a gold scorer"):
        GoldScorer.from_file(tmp_path / "bad.json")
    with pytest.raises(DataError, match="tasks make preference"):
        GoldScorer.from_file(tmp_path / "missing.json")


def test_gold_score_by_hand_and_over_optimisation():
    scorer = GoldScorer(weights={"a": 1.0, "b": -0.5}, prompt_bonus=0.5, cap=3, overuse=1.0,
                        min_length=2, max_length=6, length_penalty=0.5, unknown_weight=-1.0)
    # "ab" to a prompt without a or b: 1.0 - 0.5.
    assert scorer.score("x:", "ab") == 0.5
    # a is in the prompt "a:": 1.5 + (-0.5).
    assert scorer.score("a:", "ab") == 1.0
    # 5 a: 3 counted (3.0), 2 over the cap (-2.0).
    assert scorer.score("x:", "aaaaa") == 1.0
    # 8 a: 3.0 - 5 overuse - 0.5 * (8 - 6)^2 = -4.0; one unknown character costs 1.
    assert scorer.score("x:", "aaaaaaaa") == -4.0
    assert scorer.score("x:", "a?") == 0.0
    # Empty: 0.5 * 2^2 below min_length.
    assert scorer.score("x:", "") == -2.0
    t = scorer.terms("a:", "aaaaab?")
    assert sum(t.values()) == scorer.score("a:", "aaaaab?")
    # The default scorer rewards its best character only up to the cap: a proxy that learned
    # "more of it is better" is led past the gold optimum.
    gold = GoldScorer.from_seed(0)
    best = max(gold.weights, key=gold.weights.get)
    scores = [gold.score("sky owl:", best * n) for n in range(1, 13)]
    assert max(scores) == scores[2] and scores[-1] < scores[0]


def test_gold_reward_contract(made):
    reward = GoldReward.from_file(made["preference"])
    scorer = GoldScorer.from_file(made["preference"] / "gold.json")
    prompts, responses = ["owl fig:", "owl fig:", "sky jam:"], ["abc", "dd", "hhhh"]
    scores = reward(prompts, responses, answer=["x", "y", "z"])
    assert isinstance(scores, list) and all(isinstance(s, float) for s in scores)
    assert scores == [scorer.score(p, r) for p, r in zip(prompts, responses, strict=True)]
    # Conversational prompts and completions (as TRL passes them) score their text.
    chat = reward([[{"role": "user", "content": "owl fig:"}]],
                  [[{"role": "assistant", "content": "abc"}]])
    assert chat == scores[:1]
    with pytest.raises(RewardError, match="one prompt per response"):
        reward(prompts, responses[:2])


def test_preference_pairs_from_any_sampler():
    scorer = GoldScorer.from_seed(0)
    best = max(scorer.weights, key=scorer.weights.get)
    worst = min(scorer.weights, key=scorer.weights.get)

    def two_fixed(prompt, n, rng):
        return [worst * 3, best * 3][:n]

    pairs = make_preference_pairs(["sky owl:"] * 50, two_fixed, scorer, random.Random(0),
                                  temperature=0.1)
    assert all(p == {"prompt": "sky owl:", "chosen": best * 3, "rejected": worst * 3}
               for p in pairs)

    def collapsed(prompt, n, rng):
        return ["abc"] * n

    # Ties carry no preference: those prompts are skipped.
    assert make_preference_pairs(["sky owl:"] * 5, collapsed, scorer, random.Random(0)) == []
    with pytest.raises(ConfigError, match="exactly n"):
        make_preference_pairs(["sky owl:"], lambda p, n, rng: ["a"], scorer, random.Random(0))


def test_sft_demonstrations_are_not_gold_optimal(made):
    # The base sampler ignores the gold score, so RL and DPO have room to improve on SFT.
    scorer = GoldScorer.from_file(made["preference"])
    demos = files(made["preference"])["sft_train"]
    mean_gold = sum(scorer.score(r["prompt"], r["completion"]) for r in demos) / len(demos)
    top = sorted(scorer.weights, key=scorer.weights.get, reverse=True)
    good = "".join(c * 3 for c in top[:4])  # 12 characters, each under the cap
    assert scorer.score("sky owl:", good) > mean_gold + 5


# --- registry and command line -----------------------------------------------------------------


def test_registry():
    assert list_tasks() == list(NAMES + MULTITURN)
    for name in NAMES + MULTITURN:
        task = TASKS[name]
        assert task.name == name and task.description and "\n" not in task.description
    assert TASKS["arithmetic"].reward == {"name": "exact_match", "column": "answer"}
    assert TASKS["arithmetic_cot"].reward == {"name": "exact_match", "column": "answer",
                                              "extract": "#(-?\\d+)"}
    with pytest.raises(ConfigError, match="already registered"):
        register_task(TASKS["arithmetic"])


def test_registry_errors(tmp_path):
    with pytest.raises(ConfigError, match=ALL_NAMES):
        make_task("algebra", tmp_path, model=False)
    with pytest.raises(ConfigError, match="did you mean 'wrong_fraction'"):
        make_task("arithmetic", tmp_path, model=False, wrong_fractoin=0.1)
    with pytest.raises(ConfigError, match="must be of type int"):
        make_task("arithmetic", tmp_path, model=False, max_operand="49")
    with pytest.raises(ConfigError, match="between 0 and 1"):
        make_task("arithmetic", tmp_path, model=False, wrong_fraction=1.5)
    with pytest.raises(ConfigError, match="tokenizer lacks"):
        make_task("preference", tmp_path, model=False, alphabet="ABC")


def test_cli_tasks_list(capsys):
    assert main(["tasks", "list"]) == 0
    out = capsys.readouterr().out
    for name in NAMES + MULTITURN:
        assert re.search(rf"^{name}\s+\S", out, re.MULTILINE)


def test_cli_tasks_make(tmp_path, capsys):
    out_dir = tmp_path / "arith"
    code = main(["tasks", "make", "arithmetic", "--out", str(out_dir), "--seed", "3",
                 "--no-model", "--option", "wrong_fraction=0.5"])
    assert code == 0
    out = capsys.readouterr().out
    assert "sft_train.jsonl" in out and "task.json" in out and "model/" not in out
    info = json.loads((out_dir / "task.json").read_text())
    assert info["seed"] == 3 and info["options"]["wrong_fraction"] == 0.5
    assert not (out_dir / "model").exists()


def test_cli_tasks_errors(tmp_path, capsys):
    assert main(["tasks", "make", "algebra", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'algebra'" in err and ALL_NAMES in err
    assert main(["tasks", "make", "arithmetic", "--out", str(tmp_path), "--no-model",
                 "--option", "max_operand=0"]) == 2
    assert "max_operand=0" in capsys.readouterr().err
    assert main(["tasks"]) == 2
    assert "list" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["tasks", "make", "--help"])
    assert exit_info.value.code == 0
    assert "--no-model" in capsys.readouterr().out


def test_import_tasks_is_light():
    code = ("import sys, posttrain.tasks, posttrain.tasks.preference;"
            "print([m for m in ('torch', 'transformers', 'tokenizers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_cot_preference_pairs_prefer_correct_working(made):
    from posttrain.tasks.arithmetic import check_cot

    for stem in ("pref_train", "pref_eval"):
        for record in read_jsonl(made["arithmetic_cot"] / f"{stem}.jsonl"):
            assert check_cot(record["prompt"], record["chosen"])
            assert not check_cot(record["prompt"], record["rejected"])
