"""Corpus exceptions: all are ``ValueError``s; ``UnknownCorpusError`` is also a ``KeyError``."""

from __future__ import annotations


class CorpusError(ValueError):
    """Base class of every corpus error."""


class CorpusUnavailableError(CorpusError):
    """The source of a built-in domain is not installed."""


class InvalidCorpusError(CorpusError):
    """Bad input: an invalid name, split, budget or uploaded corpus."""


class CorpusExistsError(InvalidCorpusError):
    """A user corpus of that name exists already (and ``overwrite`` was not given)."""


class UnknownCorpusError(CorpusError, KeyError):
    """No such domain, or the corpus has not been built under that root."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""
