"""/v1/models wire models: OpenAI "models" are MergeGate's experts."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mergegate"
    kind: str | None = None
    context_length: int | None = None
    tags: list[str] = []
    metadata: dict[str, Any] | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
