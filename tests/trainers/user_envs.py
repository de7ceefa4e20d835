"""A user's environments, imported by `module:Class` in the multi-turn RL tests."""

from posttrain.rollout.environment import Environment, Step


class SecondTry(Environment):
    """Arithmetic with a second chance: a wrong first answer is told "no" and may try again;
    a right answer scores 1 at its turn, a second wrong one 0."""

    def reset(self, prompt, answer, **columns):
        self.answer, self.turn = str(answer).strip(), 0

    def step(self, text):
        self.turn += 1
        right = text.strip() == self.answer
        if right or self.turn == 2:
            return Step(done=True, reward=1.0 if right else 0.0)
        return Step(observation="no")
