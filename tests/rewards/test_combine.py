"""Combining rewards: WeightedSum values and per-term logging, loading user reward functions by
module path and by file, and the error policy of call_reward (raise / score) with the
detection of wrong lengths, non-numbers, NaN and inf."""

from __future__ import annotations

import math

import pytest

from posttrain.errors import ConfigError, RewardError
from posttrain.rewards import (
    ExactMatch,
    FormatRegex,
    LengthPenalty,
    TermScores,
    WeightedSum,
    call_reward,
    last_number,
    load_reward_function,
)

# --- reward functions used below ----------------------------------------------------------------


def fragile(prompts, responses, **columns):
    """Fails on any response containing "boom", as a user's buggy reward might."""
    return [1.0 / (0 if "boom" in r else 1) for r in responses]


def batch_only_bug(prompts, responses, **columns):
    """Fine one sample at a time, broken on batches."""
    if len(responses) > 1:
        raise IndexError("batch handling bug")
    return [1.0]


def returns(values):
    """A reward function that returns `values` whatever it is given, counting its calls."""

    def fn(prompts, responses, **columns):
        fn.calls += 1
        return values

    fn.calls = 0
    return fn


class FakeArray:
    """Stands in for a NumPy array or a tensor: has `tolist`, is not a list."""

    def __init__(self, values):
        self.values = values

    def tolist(self):
        return list(self.values)


P3 = ["p0", "p1", "p2"]


# --- WeightedSum --------------------------------------------------------------------------------


def make_sum(**kwargs):
    return WeightedSum(
        [
            ("correct", ExactMatch(), 1.0),
            ("format", FormatRegex(r"\d+"), 0.5),
            ("length", LengthPenalty(max_length=20, cache_length=5), 1.0),
        ],
        **kwargs,
    )


def test_weighted_sum_values_and_per_term_scores():
    ws = make_sum()
    responses = ["42", "abc", "4" * 18]
    totals = ws(P3, responses, answer=[42, 42, 42], source=["a", "b", "c"])
    # "42":      correct 1, format 1, length 0      -> 1·1 + 0.5·1 + 1·0     = 1.5
    # "abc":     correct 0, format 0, length 0      -> 0
    # "4" * 18:  correct 0, format 1, length −0.6   -> 0.5 − 0.6             = −0.1
    assert totals[:2] == [1.5, 0.0]
    assert totals[2] == pytest.approx(-0.1, abs=1e-12)
    assert ws.last is not None
    assert ws.last.terms == {
        "correct": [1.0, 0.0, 0.0],
        "format": [1.0, 0.0, 1.0],
        "length": [0.0, 0.0, -0.6],
    }
    assert ws.last.errors == {"correct": 0, "format": 0, "length": 0}
    assert ws.last.total == totals


def test_weighted_sum_equals_a_loop_over_its_terms():
    ws = make_sum()
    responses = ["7", "x" * 17, "8" * 30, "no"]
    result = ws.score(["q"] * 4, responses, answer=["7", "7", "8", "no"])
    weights = {"correct": 1.0, "format": 0.5, "length": 1.0}
    for i in range(4):
        expected = 0.0
        for name, w in weights.items():
            expected += w * result.terms[name][i]
        assert result.total[i] == expected


def test_weighted_sum_score_stores_nothing_and_call_keeps_the_latest():
    ws = make_sum()
    assert isinstance(ws.score(["q"], ["1"], answer=["1"]), TermScores)
    assert ws.last is None
    ws(["q"], ["1"], answer=["1"])
    ws(["q", "q"], ["2", "x"], answer=["2", "2"])
    assert ws.last.terms["correct"] == [1.0, 0.0]


def test_weighted_sum_passes_columns_through_and_declares_the_ones_it_needs():
    def by_difficulty(prompts, responses, difficulty, **columns):
        return [float(d) for d in difficulty]

    ws = WeightedSum([("difficulty", by_difficulty, 2.0), ("correct", ExactMatch("label"), 1.0)])
    assert ws(["q", "q"], ["a", "b"], difficulty=[1, 3], label=["a", "a"]) == [3.0, 6.0]
    assert ws.required_columns == ("label",)
    with pytest.raises(RewardError, match="'label'"):
        ws(["q"], ["a"], difficulty=[1])


def test_weighted_sum_score_policy_only_touches_the_failing_term_and_sample():
    ws = WeightedSum([("fragile", fragile, 1.0), ("format", FormatRegex(r"\w+"), 2.0)],
                     on_error="score", error_score=-1.0)
    totals = ws(P3, ["ok", "boom", "fine"])
    # The failing term gives −1 to sample 1 only; the format term still counts: −1 + 2·1 = 1.
    assert totals == [3.0, 1.0, 3.0]
    assert ws.last.terms["fragile"] == [1.0, -1.0, 1.0]
    assert ws.last.errors == {"fragile": 1, "format": 0}


def test_weighted_sum_raise_policy_names_the_term():
    ws = WeightedSum([("safe", FormatRegex("x"), 1.0), ("fragile", fragile, 1.0)])
    with pytest.raises(RewardError, match="fragile \\(WeightedSum term 'fragile'\\)") as info:
        ws(P3, ["ok", "boom", "fine"])
    assert isinstance(info.value.__cause__, ZeroDivisionError)


@pytest.mark.parametrize(
    ("terms", "kwargs", "match"),
    [
        ([], {}, "terms is empty"),
        ("exact_match", {}, "list of \\(name, fn, weight\\)"),
        ([("a", fragile)], {}, "terms\\[0\\] must be a \\(name, fn, weight\\) triple"),
        ([("a", fragile, 1.0), ("a", fragile, 2.0)], {}, "'a' is used twice"),
        ([("a", "fragile", 1.0)], {}, "not callable"),
        ([("a", fragile, float("nan"))], {}, "weight must be a finite number"),
        ([("", fragile, 1.0)], {}, "non-empty string"),
        ([("a", fragile, 1.0)], {"on_error": "ignore"}, "on_error must be one of raise, score"),
        ([("a", fragile, 1.0)], {"error_score": math.inf}, "error_score must be a finite"),
    ],
)
def test_weighted_sum_checks_its_arguments(terms, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        WeightedSum(terms, **kwargs)


# --- load_reward_function -----------------------------------------------------------------------

REWARDS_PY = """
from dataclasses import dataclass

THRESHOLD = 3

def shout(prompts, responses, **columns):
    return [1.0 if r.isupper() else 0.0 for r in responses]

@dataclass(frozen=True)
class Longer:
    threshold: int = THRESHOLD

    def __call__(self, prompts, responses, **columns):
        return [float(len(r) > self.threshold) for r in responses]

    @staticmethod
    def always_one(prompts, responses, **columns):
        return [1.0] * len(responses)

longer = Longer()
"""


@pytest.fixture
def rewards_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARDS_PY)
    return path


def test_load_from_a_module_path():
    assert load_reward_function("posttrain.rewards.rules:last_number") is last_number


def test_load_from_a_package_on_sys_path(tmp_path, monkeypatch):
    package = tmp_path / "user_rewards_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "scoring.py").write_text(REWARDS_PY)
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = load_reward_function("user_rewards_pkg.scoring:shout")
    assert fn(["q", "q"], ["HEY", "hey"], answer=["x", "y"]) == [1.0, 0.0]
    method = load_reward_function("user_rewards_pkg.scoring:Longer.always_one")
    assert method(["q"], ["a"]) == [1.0]


def test_load_from_a_file(rewards_file):
    shout = load_reward_function(f"{rewards_file}:shout")
    assert shout(["q", "q"], ["HEY", "hey"]) == [1.0, 0.0]
    # A dataclass instance defined in the file works (the module is registered while it runs).
    longer = load_reward_function(f"{rewards_file}:longer")
    assert longer(["q", "q"], ["abcd", "ab"]) == [1.0, 0.0]


def test_load_from_a_relative_file(rewards_file, monkeypatch):
    monkeypatch.chdir(rewards_file.parent)
    assert load_reward_function("my_rewards.py:shout")(["q"], ["A"]) == [1.0]


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("posttrain.rewards.rules", "expected 'package.module:function'"),
        ("posttrain.rewards.rules:", "is not a Python name"),
        ("posttrain.rewards.rules:1x", "is not a Python name"),
        ("no_such_module_xyz:reward", "no module named 'no_such_module_xyz'"),
        ("posttrain.no_such_module:reward", "no module named 'posttrain.no_such_module'"),
        ("posttrain.rewards.rules:exact_mach", "has no attribute 'exact_mach'"),
        ("posttrain.rewards.rules:last_numbr", "Did you mean 'last_number'\\?"),
        ("posttrain.rewards.rules:RULE_REWARDS", r"\(of type dict\) is not callable"),
        ("posttrain.rewards.rules:ExactMatch", "is a class"),
        ("not a module:fn", "neither a module path"),
        ("missing_dir/nowhere.py:fn", "not found"),
    ],
)
def test_load_errors(spec, match):
    with pytest.raises(ConfigError, match=match):
        load_reward_function(spec)


def test_load_errors_in_a_file(rewards_file):
    with pytest.raises(ConfigError, match=r"has no attribute 'shoot'.*Did you mean 'shout'"):
        load_reward_function(f"{rewards_file}:shoot")
    with pytest.raises(ConfigError, match=r"THRESHOLD \(of type int\) is not callable"):
        load_reward_function(f"{rewards_file}:THRESHOLD")
    with pytest.raises(ConfigError, match="Longer has no attribute 'missing'"):
        load_reward_function(f"{rewards_file}:Longer.missing")


def test_load_a_file_that_fails_to_import(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("raise RuntimeError('no API key')\n")
    with pytest.raises(ConfigError, match="raised RuntimeError: no API key") as info:
        load_reward_function(f"{path}:reward")
    assert isinstance(info.value.__cause__, RuntimeError)


def test_load_a_module_whose_dependency_is_missing(tmp_path, monkeypatch):
    (tmp_path / "needs_dep_mod.py").write_text("import not_installed_dep_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    match = "imports 'not_installed_dep_xyz', which is not installed"
    with pytest.raises(ConfigError, match=match):
        load_reward_function("needs_dep_mod:reward")


# --- call_reward: valid results -----------------------------------------------------------------


def test_call_reward_returns_floats_and_no_errors():
    fn = returns((1, 0.5, True))
    scores, n_errors = call_reward(fn, P3, ["a", "b", "c"])
    assert (scores, n_errors) == ([1.0, 0.5, 1.0], 0)
    assert all(type(s) is float for s in scores)


def test_call_reward_accepts_array_like_results():
    assert call_reward(returns(FakeArray([0.25, 2])), ["p", "p"], ["a", "b"]) == ([0.25, 2.0], 0)


def test_call_reward_passes_columns_by_name():
    seen = {}

    def spy(prompts, responses, **columns):
        seen.update(columns)
        return [0.0] * len(responses)

    call_reward(spy, P3, ["a", "b", "c"], {"answer": [1, 2, 3], "level": ["x", "y", "z"]})
    assert seen == {"answer": [1, 2, 3], "level": ["x", "y", "z"]}


def test_call_reward_empty_batch_does_not_call():
    fn = returns([1.0])
    assert call_reward(fn, [], []) == ([], 0)
    assert fn.calls == 0


# --- call_reward: the raise policy --------------------------------------------------------------


def test_raise_names_function_index_prompt_response_and_chains_the_cause():
    prompts = ["What is 1/1?", "Compute 2/0 please", "What is 3/1?"]
    with pytest.raises(RewardError) as info:
        call_reward(fragile, prompts, ["1", "boom", "3"], {"answer": [1, 0, 3]})
    message = str(info.value)
    assert "reward function fragile failed on sample 1 (of 3)" in message
    assert "ZeroDivisionError" in message
    assert "'Compute 2/0 please'" in message
    assert "'boom'" in message
    assert "on_error='score'" in message
    cause = info.value.__cause__
    assert isinstance(cause, ZeroDivisionError)
    assert str(cause) in message  # the original exception's text is quoted


def test_raise_shortens_long_prompts_and_renders_chat_prompts():
    long_prompt = "x" * 500
    with pytest.raises(RewardError) as info:
        call_reward(fragile, [long_prompt], ["boom"])
    message = str(info.value)
    assert "x" * 200 + "… [500 chars]" in message
    assert "x" * 201 not in message

    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2/0?"}]
    with pytest.raises(RewardError, match=r"system: Be brief\.\\nuser: 2/0\?"):
        call_reward(fragile, [chat], ["boom"])


def test_raise_on_a_batch_only_failure_says_so():
    with pytest.raises(RewardError, match="each response alone scores fine") as info:
        call_reward(batch_only_bug, P3, ["a", "b", "c"])
    assert isinstance(info.value.__cause__, IndexError)


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ([1.0, float("nan"), 0.0], "sample 1 \\(of 3\\): returned nan"),
        ([1.0, 0.0, math.inf], "sample 2 \\(of 3\\): returned inf"),
        ([1.0, "1", 0.0], "sample 1 \\(of 3\\): returned '1' \\(str\\)"),
        ([None, 1.0, 0.0], "sample 0 \\(of 3\\): returned None"),
        ([1.0, [1.0], 0.0], "sample 1 \\(of 3\\): returned \\[1.0\\] \\(list\\)"),
    ],
)
def test_raise_on_invalid_values_names_the_sample(values, match):
    with pytest.raises(RewardError, match=match) as info:
        call_reward(returns(values), P3, ["a", "b", "c"])
    assert info.value.__cause__ is None


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ([1.0, 1.0], "returned 2 scores for 3 responses"),
        ([1.0, 1.0, 1.0, 1.0], "returned 4 scores for 3 responses"),
        (1.0, "returned float 1.0, not a list of scores"),
        (None, "returned NoneType None, not a list of scores"),
    ],
)
def test_raise_on_a_wrong_length_or_type(values, match):
    with pytest.raises(RewardError, match=match):
        call_reward(returns(values), P3, ["a", "b", "c"])


# --- call_reward: the score policy --------------------------------------------------------------


def test_score_gives_error_score_to_the_failing_samples_only():
    scores, n_errors = call_reward(
        fragile, ["p"] * 5, ["ok", "boom", "fine", "boom!", "x"], on_error="score",
        error_score=-1.0,
    )
    assert (scores, n_errors) == ([1.0, -1.0, 1.0, -1.0, 1.0], 2)


def test_score_replaces_invalid_values_without_calling_again():
    fn = returns([0.5, float("nan"), -math.inf, 2])
    scores, n_errors = call_reward(fn, ["p"] * 4, list("abcd"), on_error="score")
    assert (scores, n_errors) == ([0.5, 0.0, 0.0, 2.0], 2)
    assert fn.calls == 1


def test_score_rescoring_per_sample_after_a_wrong_length():
    # Always two scores: wrong for the batch of 3 and for each sample alone -> all 3 fail.
    assert call_reward(returns([1.0, 1.0]), P3, list("abc"), on_error="score") == ([0.0] * 3, 3)
    # Right one sample at a time: the per-sample scores are used and nothing failed.
    assert call_reward(batch_only_bug, P3, list("abc"), on_error="score") == ([1.0] * 3, 0)


def test_score_per_sample_calls_get_that_sample_s_columns():
    def needs_answer(prompts, responses, answer, **columns):
        if len(responses) > 1:
            raise RuntimeError("flaky batch")
        return [float(responses[0] == answer[0])]

    scores, n_errors = call_reward(
        needs_answer, P3, ["1", "2", "9"], {"answer": ["1", "2", "3"]}, on_error="score"
    )
    assert (scores, n_errors) == ([1.0, 1.0, 0.0], 0)


# --- call_reward: arguments and misaligned inputs -----------------------------------------------


def test_call_reward_checks_the_policy_and_error_score():
    with pytest.raises(ConfigError, match="on_error must be one of raise, score, got 'skip'"):
        call_reward(fragile, ["p"], ["a"], on_error="skip")
    with pytest.raises(ConfigError, match="error_score must be a finite number"):
        call_reward(fragile, ["p"], ["a"], on_error="score", error_score=float("nan"))


@pytest.mark.parametrize("on_error", ["raise", "score"])
def test_misaligned_inputs_and_missing_columns_always_raise(on_error):
    fn = returns([1.0, 1.0])
    with pytest.raises(RewardError, match="got 1 prompts for 2 responses"):
        call_reward(fn, ["p"], ["a", "b"], on_error=on_error)
    with pytest.raises(RewardError, match="column 'answer' has 3 values for 2 responses"):
        call_reward(fn, ["p", "p"], ["a", "b"], {"answer": [1, 2, 3]}, on_error=on_error)
    with pytest.raises(RewardError, match="column 'answer' must be a list"):
        call_reward(fn, ["p", "p"], ["a", "b"], {"answer": "12"}, on_error=on_error)
    with pytest.raises(RewardError, match="named 'responses'"):
        call_reward(fn, ["p", "p"], ["a", "b"], {"responses": [1, 2]}, on_error=on_error)
    # A rule's missing column would fail every sample alike: an error, not a batch of zeros.
    with pytest.raises(RewardError, match=r"needs the column\(s\) 'answer'.*has: level"):
        call_reward(ExactMatch(), ["p", "p"], ["a", "b"], {"level": [1, 2]}, on_error=on_error)
