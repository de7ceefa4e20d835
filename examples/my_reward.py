"""A reward function of your own: `(prompts, responses, **columns) -> list[float]`.

The dataset's other columns (here `answer`) arrive by name, one value per response. Load it
in a config with `reward.terms: ["examples/my_reward.py:close_answer"]`.
"""


def close_answer(prompts, responses, answer, **columns):
    """1 for the exact answer, less the further a number is from it, 0 for no number."""
    scores = []
    for response, target in zip(responses, answer, strict=True):
        try:
            scores.append(max(0.0, 1.0 - abs(int(response.strip()) - int(target)) / 10))
        except ValueError:
            scores.append(0.0)
    return scores
