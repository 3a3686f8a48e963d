"""Wire models shared by all endpoints (OpenAI-compatible)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class OpenAIBaseModel(BaseModel):
    """Requests accept and ignore unknown fields, as OpenAI clients send extras (user, metadata...)."""

    model_config = ConfigDict(extra="allow")


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class StreamOptions(BaseModel):
    include_usage: bool = False


def error_responses(*codes: int) -> dict[int | str, dict]:
    """OpenAPI documentation of the error envelope for the given status codes."""
    desc = {400: "Bad request", 401: "Missing or wrong key", 403: "Not allowed with this key", 404: "Not found",
            409: "Conflict", 413: "Body too large", 429: "Rate limited", 502: "Upstream error",
            503: "Unavailable", 504: "Upstream timeout"}
    return {c: {"model": ErrorResponse, "description": desc.get(c, "Error")} for c in codes}
