"""User-caused errors raised by the trainer (all subclasses of :class:`activation_cache.UserError`).

The CLI prints them as one line; the messages name the numbers, step, file or fields involved.
"""

from __future__ import annotations

from activation_cache import UserError


class DimensionMismatchError(UserError, ValueError):
    """Activations (or a checkpoint) have a different width than the SAE's ``d_in``."""


class NonFiniteActivationError(UserError, ValueError):
    """A batch of activations contains NaN or inf; training stops before using it."""


class TrainingDivergedError(UserError, RuntimeError):
    """The loss became NaN/inf (usually a learning rate that is too high)."""


class CheckpointMismatchError(UserError, ValueError):
    """A checkpoint or saved SAE was written with a different configuration, or is incomplete."""


class EmptySourceError(UserError, ValueError):
    """An activation source yielded no tokens."""
