"""Multi-turn episodes (ALGORITHMS.md 6d) on a scripted engine: the ids trained on are the ids
sampled, observation tokens are masked, turn rewards sit at their turns' last tokens, and
every way an episode ends gives the stated flags."""

from __future__ import annotations

import copy

import pytest

from posttrain.errors import ConfigError
from posttrain.rollout.engine import SamplingConfig
from posttrain.rollout.environment import (
    Environment,
    Step,
    ToolEnvironment,
    load_environment,
    parse_call,
    parse_hermes,
)
from posttrain.rollout.episodes import EpisodeLimits, ObservationRenderer, run_episodes
from posttrain.rollout.vllm_engine import samples_to_experience

# the tiny tokenizer's template, with tool messages (as a user turn with a marker)
TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% elif m['role'] == 'tool' %}<|user|>={{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture
def tok(tiny_tokenizer):
    t = copy.deepcopy(tiny_tokenizer)
    t.chat_template = TEMPLATE
    return t


class Scripted:
    """An engine that answers the k-th call with `script[k]` (one token list per context),
    with log-prob −0.01·(j+1) for the j-th token; it records every call's contexts."""

    model = None

    def __init__(self, script, eos):
        self.script, self.eos, self.calls = list(script), eos, []

    def generate(self, prompt_ids, sampling, prompts=(), meta=None, seeds=None):
        turn = self.script[len(self.calls)]
        self.calls.append({"contexts": [list(p) for p in prompt_ids], "seeds": seeds,
                           "max_new_tokens": sampling.max_new_tokens})
        assert len(turn) == len(prompt_ids)
        samples = [[(t[: sampling.max_new_tokens], [-0.01 * (j + 1) for j in range(len(t))])]
                   for t in turn]
        return samples_to_experience(prompt_ids, samples, 0, self.eos, "cpu", True)


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def calc(expression: str) -> str:
    """Add two numbers.

    Args:
        expression: like 2+3
    """
    a, b = expression.split("+")
    return str(int(a) + int(b))


def broken(expression: str) -> str:
    """Always fails.

    Args:
        expression: anything
    """
    raise RuntimeError("the tool is down")


class Adder(ToolEnvironment):
    tools = (calc, broken)
    max_calls = 2

    def answer_reward(self, text):
        return 1.0 if text == "#" + self.columns["answer"] else 0.0


SAMPLING = SamplingConfig(samples_per_prompt=1, max_new_tokens=12, seed=3,
                          return_logprobs=True)


def test_observations_are_rendered_as_the_template_continues_a_conversation(tok):
    render = ObservationRenderer(tok)
    got = render([{"role": "tool", "content": "5"}])
    assert tok.decode(got) == "<|user|>=5<|assistant|>"
    full = tok.apply_chat_template(
        [{"role": "user", "content": "2+3"}, {"role": "assistant", "content": "calc(2+3)"},
         {"role": "tool", "content": "5"}], add_generation_prompt=True, tokenize=False)
    assert full.endswith(tok.decode(got))


def test_a_tool_episode_keeps_the_sampled_ids_and_masks_the_observation(tok):
    eos = tok.eos_token_id
    turn1, turn2 = [*ids(tok, "calc(2+3)"), eos], [*ids(tok, "#5"), eos]
    engine = Scripted([[turn1], [turn2]], eos)
    prompt = ids(tok, "<|user|>2+3<|assistant|>")
    exp = run_episodes(engine, tok, Adder, [prompt], SAMPLING, EpisodeLimits(4, 64),
                       prompts=[[{"role": "user", "content": "2+3"}]],
                       meta={"answer": ["5"]})
    obs = ids(tok, "<|user|>=5<|assistant|>")
    body = turn1 + obs + turn2
    assert exp.input_ids[0].tolist() == prompt + body
    assert exp.attention_mask[0].all()
    assert exp.response_mask[0].tolist() == [True] * len(turn1) + [False] * len(obs) + \
        [True] * len(turn2)
    # μ's log-probs at the policy's tokens, 0 on the observation
    want = [-0.01 * (j + 1) for j in range(len(turn1))] + [0.0] * len(obs) + \
        [-0.01 * (j + 1) for j in range(len(turn2))]
    assert exp.old_logp[0].tolist() == pytest.approx(want)
    # the reward of the last turn at its last token; the tool turn's reward (0) at its own
    assert exp.token_scores[0].tolist() == [0.0] * (len(body) - 1) + [1.0]
    assert not exp.truncated[0]
    # the second turn was sampled on the first turn's ids and the observation's, verbatim
    assert engine.calls[1]["contexts"] == [prompt + turn1 + obs]
    assert exp.meta["episode"][0] == [{"role": "assistant", "content": "calc(2+3)"},
                                      {"role": "tool", "content": "5"},
                                      {"role": "assistant", "content": "#5"}]
    assert exp.meta["episode_stats"][0] == {"turns": 2, "tool_calls": 1, "tool_errors": 0,
                                            "turn_rewards": [0.0, 1.0]}
    assert exp.meta["answer"] == ["5"]


def test_ids_that_do_not_survive_a_text_round_trip_are_trained_as_sampled(tok):
    """A special token inside a turn vanishes from its decoded text; re-tokenising the text
    would train on ids the model never produced."""
    eos = tok.eos_token_id
    odd = ids(tok, "calc(2+3)")
    odd.insert(3, tok.convert_tokens_to_ids("<|system|>"))
    turn1, turn2 = [*odd, eos], [*ids(tok, "#5"), eos]
    assert ids(tok, tok.decode(odd, skip_special_tokens=True)) != odd
    engine = Scripted([[turn1], [turn2]], eos)
    prompt = ids(tok, "<|user|>2+3<|assistant|>")
    exp = run_episodes(engine, tok, Adder, [prompt], SAMPLING, EpisodeLimits(4, 64),
                       meta={"answer": ["5"]})
    body = exp.input_ids[0, len(prompt):]
    assert body[: len(turn1)].tolist() == turn1
    assert exp.meta["episode"][0][0]["content"] == "calc(2+3)"  # what the tool was given
    assert exp.token_scores[0, -1] == 1.0


def test_a_raising_tool_and_a_malformed_call_are_observations_counted(tok):
    eos = tok.eos_token_id
    script = [[[*ids(tok, "broken(1)"), eos]], [[*ids(tok, "nothing(1)"), eos]],
              [[*ids(tok, "calc(2+3)"), eos]]]
    engine = Scripted(script, eos)
    exp = run_episodes(engine, tok, Adder, [ids(tok, "<|user|>2+3<|assistant|>")], SAMPLING,
                       EpisodeLimits(5, 200), meta={"answer": ["5"]})
    turns = exp.meta["episode"][0]
    assert turns[1] == {"role": "tool", "content": "error: RuntimeError: the tool is down"}
    assert turns[3]["content"].startswith("error: no tool 'nothing'")
    # max_calls 2: the third turn is the final answer whatever it is, scored 0
    assert len(turns) == 5 and exp.meta["episode_stats"][0]["tool_errors"] == 2
    assert exp.meta["episode_stats"][0]["tool_calls"] == 2
    assert not exp.truncated[0] and exp.token_scores[0].sum() == 0


class Counter(Environment):
    """Never done: says 'more' after every turn."""

    def step(self, text):
        return Step(observation="more", reward=0.5)


def test_episodes_end_at_the_turn_and_token_limits_truncated(tok):
    eos = tok.eos_token_id
    a = [*ids(tok, "ab"), eos]
    # three episodes (one prompt, n = 3); max_turns 2: all truncated after two turns
    engine = Scripted([[a, a, a], [a, a, a]], eos)
    sampling = SamplingConfig(samples_per_prompt=3, max_new_tokens=8, seed=1,
                              return_logprobs=True)
    exp = run_episodes(engine, tok, Counter, [ids(tok, "x")], sampling, EpisodeLimits(2, 100))
    assert exp.truncated.tolist() == [True] * 3
    assert exp.group_ids.tolist() == [0, 0, 0]
    assert exp.token_scores.sum(-1).tolist() == [1.0, 1.0, 1.0]  # two turns of 0.5
    # every episode has a seed of its own, another one each turn
    seeds = [c["seeds"] for c in engine.calls]
    assert len(set(seeds[0])) == 3 and set(seeds[0]).isdisjoint(seeds[1])
    # a turn cut by the token limit (no end token) ends its episode, truncated, unstepped
    long = ids(tok, "abcdefgh")
    engine = Scripted([[long]], eos)
    exp = run_episodes(engine, tok, Counter, [ids(tok, "x")], SAMPLING, EpisodeLimits(3, 6))
    assert exp.truncated.tolist() == [True] and exp.response_mask[0].sum() == 6
    assert exp.token_scores.sum() == 0 and len(engine.calls) == 1


def test_an_environment_that_returns_no_step_is_one_line(tok):
    class Bad(Environment):
        def step(self, text):
            return 1.0

    eos = tok.eos_token_id
    engine = Scripted([[[*ids(tok, "a"), eos]]], eos)
    with pytest.raises(ConfigError, match=r"Bad\.step must return a posttrain.rollout"):
        run_episodes(engine, tok, Bad, [ids(tok, "x")], SAMPLING, EpisodeLimits(2, 10))


def test_tool_call_parsers():
    assert parse_call("calc(37*48)").name == "calc"
    assert parse_call("calc(37*48)").arguments == "37*48"
    assert parse_call("#1776") is None
    call = parse_hermes('ok <tool_call>{"name": "calc", "arguments": {"x": 1}}</tool_call>')
    assert (call.name, call.arguments) == ("calc", {"x": 1})
    assert parse_hermes("no call") is None
    with pytest.raises(ValueError):
        parse_hermes("<tool_call>{not json}</tool_call>")


def test_environment_specs_load_like_reward_functions(tmp_path):
    assert load_environment("tests.rollout.test_episodes:Adder") is Adder
    f = tmp_path / "env.py"
    f.write_text("from posttrain.rollout.environment import Environment\n"
                 "class Mine(Environment):\n    def step(self, text):\n        pass\n"
                 "def not_a_class():\n    pass\n")
    assert load_environment(f"{f}:Mine").__name__ == "Mine"
    with pytest.raises(ConfigError, match="not_a_class is not a class with a step"):
        load_environment(f"{f}:not_a_class")
    with pytest.raises(ConfigError, match=r"rollout\.environment: .*no module named"):
        load_environment("no_such_module_xyz:Env")
    with pytest.raises(ConfigError, match=r"expected 'package\.module:Class'"):
        load_environment("Env")
