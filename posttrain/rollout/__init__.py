"""Turning prompts into experience: the Experience dataclass and rollout engines."""
