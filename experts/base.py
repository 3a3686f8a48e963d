"""The expert contract: what every kind of expert (local, lora, remote, ensemble) offers the API layer."""

from __future__ import annotations

import enum
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

FinishReason = Literal["stop", "length"]


class ExpertKind(str, enum.Enum):
    LOCAL = "local"  # a full Hugging Face causal LM directory
    LORA = "lora"  # a PEFT adapter on a registered base expert
    REMOTE = "remote"  # an OpenAI-compatible upstream
    ENSEMBLE = "ensemble"  # a set of experts served together


class ExpertStatus(str, enum.Enum):
    READY = "ready"
    REGISTERING = "registering"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class GenerationParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # None: no logprobs; k >= 0: chosen token plus k alternatives
    echo: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)  # forwarded verbatim by remote experts

    def sampling_seed(self) -> int:
        """The request's seed, or a fresh one in [0, 2**63). A fresh seed comes from the process's Mersenne
        Twister (seeded from the OS at start, reseeded in a forked child): no system call on the event
        loop's thread, where each one is a point at which the engine's thread can take the GIL."""
        return self.seed if self.seed is not None else random.getrandbits(63)


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One token of a prompt or completion with its log-probability under the expert."""

    token: str
    token_id: int
    logprob: float | None  # None for the first prompt token (nothing predicts it)
    top: tuple[tuple[str, float], ...] = ()
    text_offset: int = 0  # character offset in the returned text
    raw: bytes = b""  # the token's bytes (for chat logprobs)


@dataclass(slots=True)
class Choice:
    index: int
    text: str
    finish_reason: FinishReason
    tokens: list[TokenLogprob] | None = None  # completion tokens (when logprobs were asked for)
    prompt_tokens: list[TokenLogprob] | None = None  # echo


@dataclass(slots=True)
class GenerationResult:
    choices: list[Choice]
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class StreamDelta:
    """An increment of one choice of a streamed generation."""

    index: int
    text: str
    tokens: tuple[TokenLogprob, ...] = ()
    finish_reason: FinishReason | None = None


@dataclass(slots=True)
class StreamEnd:
    prompt_tokens: int
    completion_tokens: int


@runtime_checkable
class Expert(Protocol):
    """A servable expert. Calls are blocking; the API layer runs them off the event loop."""

    @property
    def id(self) -> str: ...

    def describe(self) -> dict[str, Any]: ...

    def count_tokens(self, text: str) -> int: ...

    def render_chat(self, messages: Sequence[Mapping[str, Any]]) -> str: ...

    def generate(self, prompt: str, params: GenerationParams) -> GenerationResult: ...

    def stream(self, prompt: str, params: GenerationParams) -> Iterator[StreamDelta | StreamEnd]: ...

    def score(self, text: str, *, top_logprobs: int = 0) -> list[TokenLogprob]: ...
