"""The multi-turn tasks `calculator` and `guess`: the `calc` tool by hand, the environments'
answers turn by turn, and the data the demonstrators write (files, determinism, held-out
prompts, the shares of guessed and miscopied answers, feedback-consistent guesses). Learning
on them is tested in tests/trainers/test_episode_runs.py."""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from posttrain.data.formats import detect_kind, validate_record
from posttrain.errors import ConfigError
from posttrain.rollout.environment import load_environment, tool_schemas
from posttrain.tasks import TASKS, make_task
from posttrain.tasks.multiturn import CalculatorEnv, GuessEnv, calc

NAMES = ("calculator", "guess")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("multiturn")
    return {name: make_task(name, root / name, seed=0, model=False) for name in NAMES}


def files(out: Path) -> dict[str, list[dict]]:
    info = json.loads((out / "task.json").read_text())
    return {stem: read_jsonl(out / f["path"]) for stem, f in info["files"].items()}


# --- the calc tool ---------------------------------------------------------------------------


@pytest.mark.parametrize(("expression", "value"), [
    ("37*48", "1776"), ("12+3*4", "24"), ("5-2*3", "-1"), (" 7 * 6 ", "42"),
    ("2*3*4-1", "23"), ("0", "0"), ("99*99+1", "9802")])
def test_calc_by_hand(expression, value):
    assert calc(expression) == value


@pytest.mark.parametrize("expression", [
    "1/2", "(1+2)", "", "2**8", "__import__('os')", "1+", "3*-2", "1" * 65])
def test_calc_refuses_anything_but_integers_joined_by_plus_minus_times(expression):
    with pytest.raises(ValueError, match="not integers joined by"):
        calc(expression)


def test_calc_schema_comes_from_its_docstring():
    (schema,) = tool_schemas([calc])
    fn = schema["function"]
    assert fn["name"] == "calc" and fn["parameters"]["required"] == ["expression"]
    assert fn["parameters"]["properties"]["expression"]["type"] == "string"


# --- the environments, turn by turn ----------------------------------------------------------


def test_calculator_env_calls_the_tool_then_scores_the_answer():
    env = CalculatorEnv()
    assert env.reset([{"role": "user", "content": "37*48"}], answer="1776") is None
    step = env.step("calc(37*48)")
    assert step.observation == [{"role": "tool", "content": "1776"}] and not step.done
    assert step.reward == 0.0 and step.info == {"tool_calls": 1, "tool_errors": 0}
    final = env.step("#1776")
    assert final.done and final.reward == 1.0 and final.observation is None
    env.reset("37*48", answer="1776")
    for wrong in ("#1775", "1776", "# 1776x"):
        env.reset("37*48", answer="1776")
        assert env.step(wrong).reward == 0.0  # the answer format is `#N`


def test_calculator_env_turns_bad_calls_into_counted_observations():
    env = CalculatorEnv()
    env.reset("37*48", answer="1776")
    raised = env.step("calc(1/2)")  # the tool raises: its error is the model's to read
    assert not raised.done and raised.info == {"tool_calls": 1, "tool_errors": 1}
    assert raised.observation[0]["content"].startswith("error: ValueError: not integers")
    unknown = env.step("add(1)")
    assert unknown.info["tool_errors"] == 1 and "no tool 'add'" in unknown.observation[0]["content"]
    # max_calls (2) used up: the next turn is the final answer, even if it is a call
    last = env.step("calc(37*48)")
    assert last.done and last.reward == 0.0


def test_guess_env_feedback_and_reward_for_fewer_turns():
    env = GuessEnv()
    env.reset("guess 1-16", target="5", high="16")
    assert env.step("8").observation == "lower"
    assert env.step("x").observation == "a number 1-16"
    assert env.step("3").observation == "higher"
    found = env.step("5")
    assert found.done and found.reward == pytest.approx(1 - 3 / 6) and found.info == {"turns": 4}
    env.reset("guess 1-16", target="5", high="16")
    assert env.step(" 5 ").reward == 1.0  # at once: the full reward
    env.reset("guess 1-16", target="5", high="16")
    steps = [env.step("1") for _ in range(6)]
    assert [s.done for s in steps] == [False] * 5 + [True] and steps[-1].reward == 0.0


def test_a_shorter_game_ends_and_scores_by_its_own_turn_limit(tmp_path):
    from posttrain import pipeline

    out = make_task("guess", tmp_path / "g", model=False, max_number=8, max_turns=4)
    prompts = files(out)["rl_train"]
    assert {(p["high"], p["max_turns"]) for p in prompts} == {("8", "4")}
    env = GuessEnv()
    env.reset(**prompts[0] | {"target": "5"})
    assert env.step("2").observation == "higher"
    assert env.step("5").reward == pytest.approx(1 - 1 / 4)  # not 1 - 1/6
    env.reset(**prompts[0] | {"target": "5"})
    steps = [env.step("1") for _ in range(4)]
    assert [s.done for s in steps] == [False] * 3 + [True] and steps[-1].reward == 0.0
    # the rollout plays as many turns as the task's game has (the pipeline's default is 6)
    (out / "sft" / "final").mkdir(parents=True)
    (out / "sft" / "final" / "config.json").write_text("{}")
    assert pipeline.rl_base(out, {})["rollout"]["max_turns"] == 4


def test_opening_scores_by_hand_and_by_playing_the_game():
    from posttrain.tasks.multiturn import opening_scores

    # 1..2 in one turn: right half the time; in two turns a miss leaves one number, found at
    # turn 2 for 1 - 1/2
    assert opening_scores(2, 1) == [0.5, 0.5]
    assert opening_scores(2, 2) == [0.75, 0.75]
    # 1..8 in 4 turns, against 20,000 games per opening played on GuessEnv at random after it
    rng, env, n = random.Random(0), GuessEnv(), 8
    for g, exact in enumerate(opening_scores(n, 4), start=1):
        total = 0.0
        for _ in range(20_000):
            env.reset("", target=str(rng.randint(1, n)), high=str(n), max_turns="4")
            lo, hi, guess = 1, n, g
            while True:
                step = env.step(str(guess))
                if step.done:
                    total += step.reward
                    break
                lo, hi = (guess + 1, hi) if step.observation == "higher" else (lo, guess - 1)
                guess = rng.randint(lo, hi)
        assert total / 20_000 == pytest.approx(exact, abs=0.01), g
    scores = opening_scores(n, 4)
    assert scores == scores[::-1] and max(scores) == scores[3] > scores[0]


def test_task_json_names_the_environment(made):
    for name, cls in (("calculator", CalculatorEnv), ("guess", GuessEnv)):
        info = json.loads((made[name] / "task.json").read_text())
        assert load_environment(info["environment"]) is cls
        assert info["environment"] == TASKS[name].environment


# --- the data --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_files_validate_in_trls_conversational_form(made, name):
    out = made[name]
    info = json.loads((out / "task.json").read_text())
    kinds = {"sft_train": "messages", "sft_eval": "messages", "rl_train": "prompt",
             "rl_eval": "prompt"}
    assert {s: f["kind"] for s, f in info["files"].items()} == kinds
    for stem, f in info["files"].items():
        records = read_jsonl(out / f["path"])
        assert len(records) == f["records"] > 0
        for i, record in enumerate(records, start=1):
            validate_record(record, f"{stem} line {i}", f["kind"])
            assert detect_kind(record) == f["kind"]
            if f["kind"] == "prompt":  # a list of messages, with the environment's columns
                assert isinstance(record["prompt"], list)
                assert record["prompt"][0]["role"] == "user"


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_bytes_other_seed_other_data(made, tmp_path, name):
    again = make_task(name, tmp_path / "again", seed=0, model=False)
    other = make_task(name, tmp_path / "other", seed=1, model=False)
    for stem in TASKS[name].files:
        mine = (made[name] / f"{stem}.jsonl").read_bytes()
        assert (again / f"{stem}.jsonl").read_bytes() == mine
        assert (other / f"{stem}.jsonl").read_bytes() != mine


def test_calculator_answers_and_held_out_products(made):
    data = files(made["calculator"])
    for stem in ("rl_train", "rl_eval"):
        for r in data[stem]:
            a, b = map(int, re.fullmatch(r"(\d\d)\*(\d\d)", r["prompt"][0]["content"]).groups())
            assert r["answer"] == str(a * b)
    held = {r["prompt"][0]["content"] for r in data["rl_eval"]}
    trained = {r["prompt"][0]["content"] for r in data["rl_train"]}
    trained |= {r["messages"][0]["content"] for s in ("sft_train", "sft_eval") for r in data[s]}
    assert len(held) == len(data["rl_eval"]) == 200 and not held & trained


def test_calculator_demonstrations_guess_and_miscopy_at_their_shares(made):
    kinds = Counter()
    for r in files(made["calculator"])["sft_train"]:
        m = r["messages"]
        a, b = map(int, m[0]["content"].split("*"))
        product = str(a * b)
        answer = m[-1]["content"]
        assert m[-1]["role"] == "assistant" and answer.startswith("#")
        if len(m) == 2:  # answered at once: always a wrong guess
            assert answer != "#" + product
            kinds["guess"] += 1
            continue
        assert [x["role"] for x in m] == ["user", "assistant", "tool", "assistant"]
        assert m[1]["content"] == f"calc({a}*{b})" and m[2]["content"] == product
        if answer == "#" + product:
            kinds["tool"] += 1
        else:  # a miscopy: the tool's result with one digit changed
            assert len(answer) - 1 == len(product)
            assert sum(x != y for x, y in zip(answer[1:], product, strict=True)) == 1
            kinds["miscopy"] += 1
    n = sum(kinds.values())
    # 4000 demonstrations: shares within 4 standard errors of the options' defaults
    assert abs(kinds["guess"] / n - 0.6) < 4 * math.sqrt(0.6 * 0.4 / n)
    with_tool = kinds["tool"] + kinds["miscopy"]
    assert abs(kinds["miscopy"] / with_tool - 0.15) < 4 * math.sqrt(0.15 * 0.85 / with_tool)


def test_calculator_options(tmp_path):
    out = make_task("calculator", tmp_path, seed=0, model=False, guess_fraction=0.0,
                    miscopy_fraction=0.0)
    sft = read_jsonl(out / "sft_train.jsonl")
    assert all(len(r["messages"]) == 4 and r["messages"][-1]["content"] == "#" + r["messages"][2]
               ["content"] for r in sft)
    with pytest.raises(ConfigError, match="between 0 and 1"):
        make_task("calculator", tmp_path / "x", model=False, guess_fraction=2.0)
    with pytest.raises(ConfigError, match="min_operand"):
        make_task("calculator", tmp_path / "y", model=False, min_operand=50, max_operand=10)


def test_guess_demonstrations_follow_the_feedback_and_do_not_bisect(made):
    turns = []
    for r in files(made["guess"])["sft_train"]:
        m = r["messages"]
        assert m[0] == {"role": "user", "content": "guess 1-16"}
        assert [x["role"] for x in m[1:]] == ["assistant", "user"] * (len(m) // 2 - 1) + [
            "assistant"]
        lo, hi = 1, 16
        for guess, feedback in zip(m[1::2], [*m[2::2], None], strict=True):
            g = int(guess["content"])
            assert lo <= g <= hi  # never a guess the feedback already ruled out
            if feedback is None:
                break
            assert feedback["content"] in ("higher", "lower")
            lo, hi = (g + 1, hi) if feedback["content"] == "higher" else (lo, g - 1)
        turns.append(len(m) // 2)
    # bisection finds one of 16 numbers in 54/16 = 3.375 guesses on average (a balanced tree
    # of 16 keys: depths 1·1 + 2·2 + 4·3 + 8·4 + 1·5 = 54); a random guess inside the interval
    # needs 2(1 + 1/16)H₁₆ − 3 ≈ 4.18 (a random search tree), capped here at 6 turns
    mean = sum(turns) / len(turns)
    assert mean > 3.375 + 0.3 and max(turns) <= 6
