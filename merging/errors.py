"""Typed errors of the merge library.

All of them are "bad input" errors and therefore subclass :class:`ValueError`, so that
pydantic validators can raise them and ``app/errors.py`` can map them to HTTP 400.
"""

from __future__ import annotations

__all__ = [
    "IncompatibleExpertsError",
    "InvalidRecipeError",
    "MergeError",
    "UnknownMergeMethodError",
]


class MergeError(ValueError):
    """Base class of every error raised by :mod:`merging`."""


class InvalidRecipeError(MergeError):
    """A merge recipe is malformed: unknown or out-of-range parameter, wrong expert count, ..."""


class IncompatibleExpertsError(MergeError):
    """The experts (and base) cannot be merged: missing tensors, shape mismatch, other tokenizer, ..."""


class UnknownMergeMethodError(MergeError):
    """The recipe names a merge method that is not in the registry."""
