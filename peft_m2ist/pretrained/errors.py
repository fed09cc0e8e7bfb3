"""The one error type of :mod:`peft_m2ist.pretrained`."""

from __future__ import annotations

__all__ = ["TowerUnavailableError"]


class TowerUnavailableError(OSError):
    """A tower could not be loaded, most often because the Hugging Face Hub cannot be reached."""


# Tracebacks and pickles name the error by the path callers import it from, as before the package split.
TowerUnavailableError.__module__ = "peft_m2ist.pretrained"
