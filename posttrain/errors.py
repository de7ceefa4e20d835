"""Errors a user can catch.

Every error says where the problem is (argument, file, line, field) and what to do about it.
The classes also derive from the matching built-in exception so that generic handlers
(`except ValueError`) keep working.
"""

from __future__ import annotations


class PosttrainError(Exception):
    """Base class of every error posttrain raises on purpose."""


class ShapeError(PosttrainError, ValueError):
    """A tensor argument has the wrong shape, dtype or device for the function it was given to."""


class ConfigError(PosttrainError, ValueError):
    """A configuration value is unknown, of the wrong type or out of range."""


class DataError(PosttrainError, ValueError):
    """A data file or record is malformed; the message names the file, line and field."""


class RewardError(PosttrainError, RuntimeError):
    """A reward function raised or returned something that is not one finite score per sample."""


class CheckpointError(PosttrainError, RuntimeError):
    """A checkpoint is missing, incomplete or does not match the run being resumed."""


class NonFiniteError(PosttrainError, FloatingPointError):
    """A loss or gradient became NaN or infinite."""
