"""Rule rewards: hand values for each rule, last-match extraction, the three regions of the
DAPO length penalty, columns (extra ones ignored, missing ones named), the registry's errors."""

from __future__ import annotations

import pytest

from posttrain.errors import ConfigError, RewardError
from posttrain.rewards import (
    RULE_REWARDS,
    ExactMatch,
    FormatRegex,
    LengthPenalty,
    MathVerify,
    NumericAnswer,
    last_number,
    make_rule_reward,
)

BOXED = r"\\boxed{(.*?)}"


def prompts_for(responses):
    return ["q"] * len(responses)


def score(rule, responses, **columns):
    return rule(prompts_for(responses), responses, **columns)


# --- ExactMatch ---------------------------------------------------------------------------------


def test_exact_match_compares_the_stripped_response_with_str_of_the_answer():
    responses = ["  42 \n", "41", "42", "42"]
    # answer 42 (int) -> "42"; " 42 " is stripped too; 42.0 -> "42.0" != "42" (use NumericAnswer)
    assert score(ExactMatch(), responses, answer=[42, 42, " 42 ", 42.0]) == [1.0, 0.0, 1.0, 0.0]


def test_exact_match_without_strip_and_with_a_custom_score():
    rule = ExactMatch(strip=False, score=2.5)
    assert score(rule, [" 42", "42"], answer=["42", "42"]) == [0.0, 2.5]


def test_exact_match_extract_uses_the_last_match():
    rule = ExactMatch(extract=BOXED)
    responses = [r"first \boxed{12}, no: \boxed{14}"] * 2
    assert score(rule, responses, answer=["14", "12"]) == [1.0, 0.0]


def test_exact_match_extract_strips_the_capture_and_scores_0_without_a_match():
    rule = ExactMatch(extract=BOXED)
    # The second response equals the answer, but without a \boxed{} there is nothing to compare.
    assert score(rule, [r"\boxed{ 7 }", "7"], answer=[7, 7]) == [1.0, 0.0]


def test_exact_match_reads_the_named_column_and_ignores_other_columns():
    rule = ExactMatch(column="label")
    got = score(rule, ["yes", "no"], label=["yes", "yes"], answer=["no", "no"],
                difficulty=[3, 4], source=["a", "b"])
    assert got == [1.0, 0.0]


def test_exact_match_missing_column_names_it_and_the_columns_present():
    with pytest.raises(RewardError) as info:
        score(ExactMatch(), ["42"], solution=["42"], difficulty=[1])
    message = str(info.value)
    assert "'answer'" in message
    assert "difficulty, solution" in message
    assert "column=" in message


def test_exact_match_missing_column_with_no_columns_at_all():
    with pytest.raises(RewardError, match="got the columns: none"):
        score(ExactMatch(), ["42"])


def test_exact_match_rejects_a_misaligned_column_and_a_missing_answer():
    with pytest.raises(RewardError, match="2 values for 1 responses"):
        score(ExactMatch(), ["42"], answer=["42", "43"])
    with pytest.raises(RewardError, match="None"):
        score(ExactMatch(), ["None"], answer=[None])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"extract": "(unclosed"}, "not a valid regex"),
        ({"extract": r"\\boxed{.*}"}, "has no group"),
        ({"column": ""}, "column"),
        ({"strip": "yes"}, "strip must be true or false"),
        ({"score": float("nan")}, "score must be a finite number"),
    ],
)
def test_exact_match_checks_its_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ExactMatch(**kwargs)


# --- NumericAnswer ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("37+48=85", 85.0),
        ("I think 12, no, 14", 14.0),  # the LAST number
        ("the result is -7", -7.0),
        ("x = 3.14.", 3.14),  # a full stop after the number is not a decimal point
        ("a loss of -0.25 dollars", -0.25),
        ("1,250 apples", 1250.0),
        ("12-4", 4.0),  # minus after a digit: subtraction, not a sign
        ("f(x)-2", 2.0),  # minus after a bracket: subtraction
        ("so x = -3", -3.0),
        ("step 1e-3", 0.001),
        ("no number here", None),
        ("", None),
    ],
)
def test_last_number(text, expected):
    assert last_number(text) == expected


def test_numeric_answer_hand_values():
    responses = ["37+48=85", "I think 12, no, 14", "the result is -7", "x = 3.14", "no idea"]
    answers = [85, 14, "-7", 3.14, 0]
    assert score(NumericAnswer(), responses, answer=answers) == [1.0, 1.0, 1.0, 1.0, 0.0]


def test_numeric_answer_reads_only_the_last_number():
    assert score(NumericAnswer(), ["I think 12, no, 14"], answer=[12]) == [0.0]


def test_numeric_answer_understands_thousands_separators_in_both_places():
    assert score(NumericAnswer(), ["1,250", "1250"], answer=["1,250", 1250]) == [1.0, 1.0]


def test_numeric_answer_tolerance_is_inclusive():
    # 1.75 − 1.5 = 0.25 exactly in binary, so the boundary case is exact.
    rule = NumericAnswer(tolerance=0.25)
    assert score(rule, ["1.75", "2.0", "1.25"], answer=[1.5, 1.5, 1.5]) == [1.0, 0.0, 1.0]
    assert score(NumericAnswer(), ["3.1415"], answer=[3.14]) == [0.0]
    assert score(NumericAnswer(tolerance=0.01), ["3.1415"], answer=[3.14]) == [1.0]


def test_numeric_answer_extract_reads_the_last_number_inside_the_last_match():
    response = "5 apples + 3 = 8\n#### 8\nCheck: 10"
    assert score(NumericAnswer(extract=r"####([^\n]*)"), [response], answer=[8]) == [1.0]
    assert score(NumericAnswer(), [response], answer=[8]) == [0.0]  # reads 10
    # Two matches: the last one counts; no match scores 0.
    rule = NumericAnswer(extract=BOXED)
    assert score(rule, [r"\boxed{3} or \boxed{-4}"], answer=[-4]) == [1.0]
    assert score(rule, ["the answer is -4"], answer=[-4]) == [0.0]


def test_numeric_answer_overflowing_number_scores_0():
    assert score(NumericAnswer(), ["1e999"], answer=[5]) == [0.0]


def test_numeric_answer_bad_reference_answer_raises():
    with pytest.raises(RewardError, match="'twelve' is not a number"):
        score(NumericAnswer(), ["12"], answer=["twelve"])
    with pytest.raises(RewardError, match="'answer'"):
        score(NumericAnswer(), ["12"], question=["?"])


def test_numeric_answer_checks_its_arguments():
    with pytest.raises(ConfigError, match="tolerance must be ≥ 0"):
        NumericAnswer(tolerance=-1e-3)
    with pytest.raises(ConfigError, match="has no group"):
        NumericAnswer(extract="####.*")


# --- FormatRegex --------------------------------------------------------------------------------

THINK = r"(?s)<think>.*</think>\s*<answer>.*</answer>"


def test_format_regex_full_match_and_search():
    good = "<think>\n7 * 6\n</think>\n<answer>42</answer>"
    trailing = good + " and more"
    assert score(FormatRegex(THINK), [good, trailing, "42"]) == [1.0, 0.0, 0.0]
    assert score(FormatRegex(THINK, full_match=False), [good, trailing, "42"]) == [1.0, 1.0, 0.0]


def test_format_regex_score_and_ignored_columns():
    assert score(FormatRegex(r"\d+", score=0.5), ["12", "x"], answer=[1, 2]) == [0.5, 0.0]


def test_format_regex_checks_its_pattern():
    with pytest.raises(ConfigError, match="not a valid regex"):
        FormatRegex("[")


# --- LengthPenalty (DAPO Eq. 13) ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "expected"),
    [
        # L_max = 20, L_cache = 5: no penalty up to L_max − L_cache = 15.
        (0, 0.0),
        (15, 0.0),
        # Ramp: ((20 − 5) − L) / 5, i.e. (15 − 16)/5 = −0.2, (15 − 18)/5 = −0.6, (15 − 20)/5 = −1.
        (16, -0.2),
        (18, -0.6),
        (20, -1.0),
        # Past L_max: the full −penalty.
        (21, -1.0),
        (100, -1.0),
    ],
)
def test_length_penalty_regions(length, expected):
    assert score(LengthPenalty(max_length=20, cache_length=5), ["x" * length]) == [expected]


def test_length_penalty_scales_with_penalty_and_counts_characters():
    rule = LengthPenalty(max_length=20, cache_length=5, penalty=0.5)
    # (15 − 18)/5 · 0.5 = −0.3; "é" and "日" are one character each.
    assert score(rule, ["é" * 18, "日" * 21, "a" * 3]) == [-0.3, -0.5, 0.0]


def test_length_penalty_ignores_columns():
    assert score(LengthPenalty(20, 5), ["x"], answer=["y"]) == [0.0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_length": 20, "cache_length": 5, "unit": "tokens"}, "only 'chars'"),
        ({"max_length": 20, "cache_length": 25}, r"cache_length \(25\) must be ≤ max_length"),
        ({"max_length": 20, "cache_length": 0}, "cache_length must be a positive integer"),
        ({"max_length": 20.0, "cache_length": 5}, "max_length must be a positive integer"),
        ({"max_length": True, "cache_length": 1}, "max_length must be a positive integer"),
        ({"max_length": 20, "cache_length": 5, "penalty": -1}, "penalty must be ≥ 0"),
    ],
)
def test_length_penalty_checks_its_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LengthPenalty(**kwargs)


# --- the registry -------------------------------------------------------------------------------


def test_registry_names():
    assert RULE_REWARDS == {
        "exact_match": ExactMatch,
        "numeric_answer": NumericAnswer,
        "format_regex": FormatRegex,
        "length_penalty": LengthPenalty,
        "math_verify": MathVerify,
    }


def test_make_rule_reward_builds_the_rule():
    assert make_rule_reward("exact_match", extract=BOXED) == ExactMatch(extract=BOXED)
    assert make_rule_reward("length_penalty", max_length=20, cache_length=5) == LengthPenalty(20, 5)
    rule = make_rule_reward("numeric_answer", tolerance=0.5)
    assert score(rule, ["2.4"], answer=[2]) == [1.0]


def test_make_rule_reward_unknown_name_suggests_the_closest():
    with pytest.raises(ConfigError) as info:
        make_rule_reward("exact_mach")
    message = str(info.value)
    assert "unknown rule reward 'exact_mach'" in message
    assert "Did you mean 'exact_match'?" in message
    assert "exact_match, format_regex, length_penalty, math_verify, numeric_answer" in message


def test_make_rule_reward_unknown_argument_lists_the_valid_ones():
    with pytest.raises(ConfigError) as info:
        make_rule_reward("exact_match", colum="label")
    message = str(info.value)
    assert "no argument 'colum'" in message
    assert "did you mean 'column'?" in message
    assert "valid arguments: column, extract, strip, score" in message
    assert "_regex" not in message  # the cached regex is not an argument


def test_make_rule_reward_missing_argument_and_bad_value():
    with pytest.raises(ConfigError, match=r"needs the argument\(s\) 'pattern'"):
        make_rule_reward("format_regex", score=1.0)
    with pytest.raises(ConfigError, match="tolerance"):
        make_rule_reward("numeric_answer", tolerance="tight")


def test_rules_are_frozen_and_declare_their_columns():
    rule = ExactMatch()
    with pytest.raises(AttributeError):
        rule.column = "label"  # type: ignore[misc]
    assert ExactMatch(column="label").required_columns == ("label",)
    assert NumericAnswer().required_columns == ("answer",)
    assert FormatRegex("x").required_columns == ()
    assert LengthPenalty(2, 1).required_columns == ()
