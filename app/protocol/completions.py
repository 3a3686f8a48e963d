"""/v1/completions wire models (OpenAI legacy completions)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Discriminator, Field, Tag, field_validator

from app.protocol.adapters import AdapterMix
from app.protocol.common import OpenAIBaseModel, Seed, StreamOptions, TokenId, Usage

MAX_STOP = 4
MAX_PROMPTS = 128  # prompts per request; prompts x n is limited to the same number of choices
ZERO_ONLY = {"minimum": 0, "maximum": 0}  # penalties: the schema says what is served (0 only)

StopSequence = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]


def _prompt_form(v: object) -> str:
    """Which form of prompt a value is meant to be, by its shape (errors then name that form only)."""
    if isinstance(v, list) and v:
        return "as texts" if isinstance(v[0], str) else "as token-id lists" if isinstance(v[0], list) else "as tokens"
    return "as texts" if isinstance(v, list) else "as text"


Prompt = Annotated[
    Annotated[str, Tag("as text")]
    | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS), Tag("as texts")]
    | Annotated[TokenIds, Tag("as tokens")]
    | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS), Tag("as token-id lists")],
    Discriminator(_prompt_form)]


def normalize_stop(v: object) -> object:
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if isinstance(v, list):
        if len(v) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not isinstance(s, str) or s == "" for s in v):
            raise ValueError("stop sequences must be non-empty strings")
    return v


def no_penalty(v: float) -> float:
    if v != 0.0:
        raise ValueError("presence/frequency penalties are not supported; send 0 or omit them")
    return v


class CompletionRequest(OpenAIBaseModel):
    model: str = Field(..., description="Expert id, as listed by GET /v1/models", examples=["demo-code"])
    adapters: AdapterMix | None = Field(None, description="A request-time mix of LoRA adapters on `model` (a base); "
                                        "the openai client sends it with extra_body")
    prompt: Prompt = Field(
        "", description=f"Text, a list of texts, token ids, or a list of token-id lists (at most {MAX_PROMPTS} "
        f"prompts; prompts x n at most {MAX_PROMPTS} choices)", examples=["def fib(n):"])
    max_tokens: int | None = Field(16, ge=0, le=2**31 - 1,
                                   description="New tokens to generate (0 with echo scores the prompt)")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 means greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=128, description="Choices per prompt (at most MERGEGATE_MAX_N)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(None, ge=0, le=20, description="Return this many alternatives per token")
    echo: bool = Field(False, description="Prepend the prompt (and its logprobs) to each choice")
    stop: list[StopSequence] = Field(default_factory=list, max_length=MAX_STOP,
                                     description="Up to 4 sequences; generation stops before them")
    seed: Seed | None = Field(None, description="Same seed and request, same output (a signed 64-bit integer)")
    presence_penalty: float = Field(0.0, json_schema_extra=ZERO_ONLY, description="Only 0 (not implemented)")
    frequency_penalty: float = Field(0.0, json_schema_extra=ZERO_ONLY, description="Only 0 (not implemented)")
    user: str | None = None

    model_config = {"extra": "allow", "json_schema_extra": {"examples": [
        {"model": "demo-code", "prompt": "def fib(n):", "max_tokens": 32, "temperature": 0}]}}

    _stop = field_validator("stop", mode="before")(classmethod(lambda cls, v: normalize_stop(v)))
    _penalties = field_validator("presence_penalty", "frequency_penalty")(classmethod(lambda cls, v: no_penalty(v)))


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
