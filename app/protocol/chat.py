"""/v1/chat/completions wire models."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from app.protocol.adapters import AdapterMix
from app.protocol.common import OpenAIBaseModel, Seed, StreamOptions, Usage, combination_error
from app.protocol.completions import MAX_STOP, ZERO_ONLY, StopSequence, no_penalty, normalize_stop


class ChatMessage(OpenAIBaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(OpenAIBaseModel):
    model: str = Field(..., examples=["demo-code"])
    adapters: AdapterMix | None = Field(None, description="A request-time mix of LoRA adapters on `model` (a base); "
                                        "the openai client sends it with extra_body")
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    max_completion_tokens: int | None = Field(None, ge=1, le=2**31 - 1, description="Preferred over max_tokens")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=128, description="Choices (at most MERGEGATE_MAX_N)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20, description="Needs logprobs: true")
    stop: list[StopSequence] = Field(default_factory=list, max_length=MAX_STOP)
    seed: Seed | None = None
    presence_penalty: float = Field(0.0, json_schema_extra=ZERO_ONLY, description="Only 0 (not implemented)")
    frequency_penalty: float = Field(0.0, json_schema_extra=ZERO_ONLY, description="Only 0 (not implemented)")
    user: str | None = None

    model_config = {"extra": "allow", "json_schema_extra": {"examples": [
        {"model": "demo-code", "messages": [{"role": "user", "content": "Write a loop"}], "max_tokens": 32}]}}

    _stop = field_validator("stop", mode="before")(classmethod(lambda cls, v: normalize_stop(v)))

    _penalties = field_validator("presence_penalty", "frequency_penalty")(classmethod(lambda cls, v: no_penalty(v)))

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise combination_error("top_logprobs requires logprobs: true")
        return self


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobView(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobView] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
