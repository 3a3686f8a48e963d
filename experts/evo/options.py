"""Merge sessions' values: coefficient ranges, limits, errors, and the loss and validation options.

Split from :mod:`experts.evo.sessions` (which re-exports everything here).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from experts.data.scoring import validate_examples
from experts.errors import ExpertError, InvalidExpertError

__all__ = [
    "ALPHA_RANGE",
    "BETA_RANGE",
    "BudgetExhaustedError",
    "InvalidCandidateError",
    "LossOptions",
    "MergeSessionError",
    "SessionLimitError",
    "SessionNotFoundError",
    "ValidationSpec",
]

ALPHA_RANGE = (0.0, 1.0)
BETA_RANGE = (-1.5, 1.5)
MAX_POOL = 1024
MAX_BATCH_CANDIDATES = 1000
# padded tokens per batched forward of a population (candidates x examples). On 2 CPU cores (bench/multi_lora.py,
# popsize 20 x 32 texts x 128 tokens) a generation took 3.64 s at 2,048, 4.03 s at 4,096 and 4.13 s at 8,192:
# bigger forwards' activations fall out of the cache, and every forward is one hop of the engine's thread
BATCH_FORWARD_TOKENS = 2048
DEFAULT_REGISTERED_EXAMPLES = 32  # corpus and task sources without max_examples


# ------------------------------------------------------------------------------------------------
# errors (mapped to HTTP in app/errors.py)


class MergeSessionError(ExpertError):
    """Base class of merge-session errors."""


class SessionNotFoundError(MergeSessionError, KeyError):
    """404: no such session (never created, deleted, or expired)."""

    def __init__(self, session_id: str) -> None:
        super().__init__(f"merge session {session_id!r} does not exist (deleted or expired?)")
        self.session_id = session_id

    def __str__(self) -> str:
        return str(self.args[0])


class BudgetExhaustedError(MergeSessionError):
    """429: the session's query budget cannot cover the request; nothing was evaluated."""

    def __init__(self, session_id: str, budget: int, used: int, requested: int) -> None:
        left = budget - used
        super().__init__(f"merge session {session_id!r}: query budget exhausted ({used} of {budget} used, "
                         f"{left} left, {requested} requested)")
        self.budget, self.used, self.requested = budget, used, requested


class InvalidCandidateError(MergeSessionError, ValueError):
    """400: a coefficient vector has the wrong length, a non-finite value, or a value out of range."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class SessionLimitError(MergeSessionError):
    """429: the gateway holds its maximum number of sessions."""


# ------------------------------------------------------------------------------------------------
# options


@dataclass(frozen=True)
class LossOptions:
    """How the validation loss is computed.

    max_examples: cap on validation examples (the first ones, in the source's deterministic order).
    max_tokens_per_example: truncation (see :func:`experts.data.scoring.encode_examples`), capped at the
        base's context length. batch_tokens: padded tokens per forward pass. append_eos: score an EOS
        after each completion.
    """

    max_examples: int | None = None
    max_tokens_per_example: int = 128
    batch_tokens: int = 1024
    append_eos: bool = False


@dataclass(frozen=True)
class ValidationSpec:
    """The session's validation data: exactly one of inline `examples`, a `corpus` or a `task`.

    Inline: {"prompt", "completion"} pairs or {"text"} (all of them unless `max_examples`). Corpus: the
    split's token stream cut into consecutive windows of max_tokens_per_example tokens (text examples),
    the first `max_examples` (default 32). Task: :func:`experts.data.datasets.load_task` on the split, the
    first `max_examples` (default 32).
    """

    examples: tuple[Mapping[str, Any], ...] | None = None
    corpus: str | None = None
    task: str | None = None
    split: str = "validation"
    max_examples: int | None = None

    def check(self) -> None:
        if sum(x is not None for x in (self.examples, self.corpus, self.task)) != 1:
            raise InvalidExpertError("validation: give exactly one of examples, corpus or task")
        if self.examples is not None:
            validate_examples(self.examples, max_examples=10_000)
        if self.max_examples is not None and self.max_examples < 1:
            raise InvalidExpertError("validation.max_examples must be >= 1")

    def describe(self) -> dict[str, Any]:
        if self.examples is not None:
            return {"source": "inline", "max_examples": self.max_examples}
        src = {"corpus": self.corpus} if self.corpus is not None else {"task": self.task}
        return {"source": "corpus" if self.corpus is not None else "task", **src, "split": self.split,
                "max_examples": self.max_examples}


def _cap(a: int | None, b: int | None) -> int | None:
    vals = [x for x in (a, b) if x is not None]
    return min(vals) if vals else None
