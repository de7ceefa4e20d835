r"""MathVerify (the `math_verify` rule, on the math-verify package): hand-written answer pairs,
equivalent forms accepted and wrong ones rejected as math-verify really decides them, how the
answer is read (`extract`), the reference answer's forms, unparsable responses and answers under
each `reward.on_error`, the SIGALRM timeout and threads, argument errors, the missing package.

math-verify is in the `dev` extra, so these tests require it rather than skip without it."""

from __future__ import annotations

import sys
import threading

import pytest

from posttrain.errors import ConfigError, RewardError
from posttrain.rewards import RULE_REWARDS, call_reward, make_rule_reward
from posttrain.rewards.build import build_rewards
from posttrain.rewards.rules import MathVerify

# An answer whose comparison never ends without a time limit (9^(9^(9^9)) is evaluated).
TOWER = r"\boxed{9^{9^{9^{9}}}}"


def score(rule, responses, answers):
    return rule(["q"] * len(responses), responses, answer=answers)


def one(rule, response, answer):
    return score(rule, [response], [answer])[0]


# --- equivalent forms are accepted --------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "answer"),
    [
        (r"\boxed{\frac{1}{2}}", "0.5"),
        (r"\boxed{2\sqrt{2}}", r"\sqrt{8}"),
        ("1/2", r"\frac12"),
        (r"The answer is \boxed{42}.", "42"),
        (r"The answer is \boxed{42}.", "$42$"),  # the answer given with its $ delimiters
        (r"The answer is \boxed{42}.", 42),  # or as a number
        (r"\boxed{0.5}", 0.5),
        (r"\boxed{\frac{1}{2}}", r"$\frac{1}{2}$"),
        (r"\boxed{\dfrac{3}{4}}", "0.75"),
        (r"\boxed{0.001}", "1e-3"),  # an exponent in the answer is read as a number
        (r"\boxed{10^{-3}}", 1e-3),
        (r"\boxed{1{,}000}", "1000"),
        ("#### 1,000", "1,000"),  # GSM8K style: a plain number with thousands separators
        ("37 + 48 = 85", "85"),
        (r"\boxed{(1,2]}", "(1, 2]"),  # intervals
        (r"\boxed{[1,2)}", "[1, 2)"),
        (r"\boxed{\{2,1\}}", r"\{1,2\}"),  # sets, in any order
        (r"\boxed{5, 3}", "3, 5"),  # a list of answers is a set
        (r"\boxed{x^2+2x+1}", "(x+1)^2"),  # expressions, symbolically
        (r"\boxed{x=3}", "3"),  # an assignment matches its value, both ways
        (r"\boxed{3}", "x=3"),
        (r"\boxed{\begin{pmatrix}1\\2\end{pmatrix}}", r"\begin{pmatrix}1\\2\end{pmatrix}"),
        (r"\boxed{\$18}", r"\$18"),  # an escaped \$ is a currency sign, not a delimiter
        (r"\boxed{5\text{ cm}}", "5"),  # units are dropped
        (r"\boxed{50\%}", "0.5"),  # a percentage matches its value ...
        (r"\boxed{50\%}", "50"),  # ... and its number
        (r"\boxed{\frac{1}{3}}", "0.333333"),  # numbers are compared to 6 decimals
        (r"\boxed{\text{Evelyn}}", "Evelyn"),
    ],
)
def test_equivalent_forms_are_accepted(response, answer):
    assert one(MathVerify(), response, answer) == 1.0


# --- wrong answers are rejected -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "answer"),
    [
        (r"\boxed{3}", "4"),
        (r"\boxed{-3}", "3"),
        # 1/3 is 0.333333 to 6 decimals, not 0.33: a rounded answer does not match, either way.
        (r"$\frac{1}{3}$", "0.33"),
        ("0.33", r"\frac{1}{3}"),
        (r"\boxed{\pi}", "3.14159"),  # π rounds to 3.141593
        ("1.000001", "1"),
        (r"\boxed{[1,2]}", "(1, 2]"),  # the endpoints count
        (r"\boxed{(1,2)}", "[1, 2)"),
        (r"\boxed{y^2+2y+1}", "(x+1)^2"),  # variables count
        # A bare word is a product of symbols, so case counts (\text{} is lowercased instead).
        (r"\boxed{Evelyn}", "evelyn"),
    ],
)
def test_wrong_answers_are_rejected(response, answer):
    assert one(MathVerify(), response, answer) == 0.0


def test_a_batch_scores_each_response_and_uses_score():
    rule = MathVerify(score=2.5)
    responses = [r"\boxed{\frac{1}{2}}", r"\boxed{3}", "so x = 7"]
    assert score(rule, responses, ["0.5", "4", 7]) == [2.5, 0.0, 2.5]


# --- how the answer is read ---------------------------------------------------------------------


def test_several_bare_boxed_answers_are_read_together_as_a_set():
    # math-verify joins every bare \boxed{} into one set: a self-correction matches neither
    # answer, only the set itself. Inside $...$ the last one counts.
    response = r"So \boxed{12}. Wait, that is wrong: \boxed{14}."
    assert score(MathVerify(), [response] * 3, [12, 14, r"\{12, 14\}"]) == [0.0, 0.0, 1.0]
    assert one(MathVerify(), r"$\boxed{12}$ no, $\boxed{14}$", 14) == 1.0


def test_an_answer_after_the_word_answer_comes_before_the_last_number():
    # Unlike NumericAnswer, which reads the last number.
    response = "The answer is 12. Actually 14."
    assert score(MathVerify(), [response, response], [12, 14]) == [1.0, 0.0]
    assert one(MathVerify(), "12 then 14", 14) == 1.0  # without "answer": the last one


def test_extract_boxed_reads_only_boxed_and_answer_latex():
    rule = MathVerify(extract="boxed")
    assert rule.extract == ("boxed",)
    assert one(rule, r"so $x=3$ and \boxed{4}", 4) == 1.0
    assert one(MathVerify(extract="expr"), r"so $x=3$ and \boxed{4}", 4) == 0.0  # reads x=3
    assert one(rule, "The answer is $12$. Hmm, $14$", 12) == 1.0
    with pytest.raises(RewardError, match=r"no answer it can parse.*extract: boxed"):
        one(rule, "1/2", "0.5")  # no LaTeX: nothing boxed to read


def test_extract_expr_reads_plain_numbers_only():
    rule = MathVerify(extract=["expr"])
    assert one(rule, "#### 72", 72) == 1.0
    with pytest.raises(RewardError, match="no answer it can parse"):
        one(rule, r"\boxed{\frac{1}{2}}", "0.5")
    assert one(MathVerify(extract=["boxed", "expr"]), "#### 72", 72) == 1.0


def test_a_reference_answer_with_delimiters_is_read_like_a_response():
    solution = r"We add: $1 + 1 = 2$, so the answer is $\boxed{2}$."
    rule = MathVerify(column="solution")
    assert rule(["q"], ["the answer is 2"], solution=[solution]) == [1.0]
    # Without delimiters it is the answer itself: "2\sqrt{2}" would otherwise read 2.
    assert one(MathVerify(), "2", r"2\sqrt{2}") == 0.0


# --- unparsable responses and answers go through reward.on_error --------------------------------


def test_an_unparsable_response_raises_reward_error():
    for response in ["I don't know", "", r"\boxed{}"]:
        with pytest.raises(RewardError, match=r"no answer it can parse in the response"):
            one(MathVerify(), response, "5")


def test_unparsable_response_with_on_error_raise_names_the_sample():
    rule = MathVerify()
    with pytest.raises(RewardError) as info:
        call_reward(rule, ["q1", "q2"], [r"\boxed{5}", "no idea"], {"answer": [5, 5]})
    message = str(info.value)
    assert "sample 1 (of 2)" in message
    assert "no answer it can parse" in message
    assert "'no idea'" in message


def test_unparsable_response_with_on_error_score_gets_error_score_and_is_counted():
    ws = build_rewards([{"name": "math_verify"}], on_error="score", error_score=-1.0)
    result = ws.score(["q"] * 3, [r"\boxed{5}", "no idea", r"\boxed{4}"], answer=[5, 5, 5])
    assert result.terms["math_verify"] == [1.0, -1.0, 0.0]
    assert result.errors["math_verify"] == 1
    raising = build_rewards([{"name": "math_verify"}], on_error="raise")
    with pytest.raises(RewardError, match="sample 1"):
        raising(["q"] * 3, [r"\boxed{5}", "no idea", r"\boxed{4}"], answer=[5, 5, 5])


@pytest.mark.parametrize(
    ("answer", "match"),
    [
        ("", "empty"),
        (None, r"missing \(None\)"),
        (True, "bool"),
        ([1, 2], "list"),
        (float("nan"), "not a finite number"),
        ("$$", "cannot parse"),
        ("1e999999999", "too large or too small"),  # not written out in full
    ],
)
def test_a_bad_reference_answer_raises_reward_error(answer, match):
    with pytest.raises(RewardError, match=match):
        one(MathVerify(), r"\boxed{5}", answer)
    scored, n_errors = call_reward(MathVerify(), ["q"], [r"\boxed{5}"], {"answer": [answer]},
                                   on_error="score", error_score=-2.0)
    assert (scored, n_errors) == ([-2.0], 1)


# --- the timeout --------------------------------------------------------------------------------


def test_a_comparison_past_the_timeout_goes_through_on_error():
    rule = MathVerify(timeout=1)
    with pytest.raises(RewardError, match=r"longer than timeout=1s") as info:
        call_reward(rule, ["q"], [TOWER], {"answer": [1]})
    assert "sample 0 (of 1)" in str(info.value)
    assert call_reward(rule, ["q"], [TOWER], {"answer": [1]}, on_error="score",
                       error_score=-1.0) == ([-1.0], 1)


def run_in_a_thread(fn):
    out = {}

    def target():
        try:
            out["value"] = fn()
        except Exception as err:  # reported to the test's thread
            out["error"] = err

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    return out


def test_the_timeout_needs_the_main_thread_and_none_runs_anywhere():
    out = run_in_a_thread(lambda: one(MathVerify(), r"\boxed{5}", 5))
    assert isinstance(out["error"], RewardError)
    assert "main thread only" in str(out["error"])
    assert "timeout: null" in str(out["error"])
    assert run_in_a_thread(lambda: one(MathVerify(timeout=None), r"\boxed{5}", 5)) == {
        "value": 1.0
    }


# --- arguments, the registry, the missing package -----------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"column": ""}, "column must be a non-empty column name"),
        ({"extract": "boxd"}, r"extract 'boxd' is unknown \(did you mean 'boxed'\?\)"),
        ({"extract": []}, "extract must be one or more of boxed, latex, expr"),
        ({"extract": 3}, "extract must be one or more of"),
        ({"extract": ["latex", "latex"]}, "names a way twice"),
        ({"extract": ["boxed", "latex"]}, "both 'boxed' and 'latex'"),
        ({"timeout": 0}, "timeout must be a positive whole number of seconds or null"),
        ({"timeout": 1.5}, "timeout must be a positive whole number"),
        ({"timeout": True}, "timeout must be a positive whole number"),
        ({"score": float("nan")}, "score must be a finite number"),
    ],
)
def test_math_verify_checks_its_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        MathVerify(**kwargs)


def test_a_missing_column_is_named():
    with pytest.raises(RewardError, match=r"needs the column 'answer'.*solution"):
        MathVerify()(["q"], [r"\boxed{5}"], solution=["5"])
    # Through call_reward a missing column raises whatever the error policy.
    with pytest.raises(RewardError, match=r"needs the column\(s\) 'gold'"):
        call_reward(MathVerify(column="gold"), ["q"], ["5"], {"answer": ["5"]},
                    on_error="score")


def test_registry_and_make_rule_reward():
    assert RULE_REWARDS["math_verify"] is MathVerify
    rule = make_rule_reward("math_verify", column="solution", extract=["boxed"], timeout=None)
    assert rule == MathVerify(column="solution", extract=("boxed",), timeout=None)
    assert rule.required_columns == ("solution",)
    with pytest.raises(ConfigError, match=r"no argument 'colum' \(did you mean 'column'\?\)"):
        make_rule_reward("math_verify", colum="answer")
    with pytest.raises(AttributeError):
        rule.column = "answer"  # type: ignore[misc]


def test_without_the_package_building_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # `import math_verify` fails
    with pytest.raises(ConfigError) as info:
        MathVerify()
    message = str(info.value)
    assert "pip install 'posttrain[math]'" in message
    assert "\n" not in message
    with pytest.raises(ConfigError, match=r"reward.terms\[0\]: MathVerify needs the math-verify"):
        build_rewards([{"name": "math_verify"}])
