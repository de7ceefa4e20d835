"""A user's reward functions, imported by `module:function` in RL tests."""


def short_answers(prompts, responses, **columns):
    # one point for a response of at most 2 characters; ignores the other columns
    return [1.0 if len(r) <= 2 else 0.0 for r in responses]


def constant_one(prompts, responses, **columns):
    # every response scores the same: no group has reward variance
    return [1.0 for _ in responses]


def starts_with_seven(prompts, responses, **columns):
    # a bandit on the first answer token: the fast learning check's reward
    return [1.0 if r.startswith("7") else 0.0 for r in responses]


def characters(prompts, responses, **columns):
    # the response's length in characters, /10: varies within a group even for a random model
    return [len(r) / 10 for r in responses]


def trl_token_count(completions, completion_ids, **kwargs):
    # written for TRL: by keyword, with the response's token ids (EOS included)
    assert len(completions) == len(completion_ids)
    return [len(ids) / 10 for ids in completion_ids]
