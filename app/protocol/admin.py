"""Admin wire models: experts and jobs."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from app.protocol.common import ExpertId, RequestModel


class ExpertView(BaseModel):
    id: str
    kind: str
    status: str
    architecture: str | None = None
    num_params: int | None = None
    dtype: str | None = None
    context_length: int | None = None
    tokenizer_fingerprint: str | None = None
    domain: str | None = None
    tags: list[str] = []
    lineage: dict[str, Any] | None = Field(None, description="Parents with weights and the recipe that produced it")
    spec: dict[str, Any] = {}
    path: str | None = Field(None, description="Artifact directory, relative to the data dir")
    size_bytes: int | None = None
    pinned: bool = False
    loaded: bool = False
    remote: dict[str, Any] | None = Field(None, description="Remote experts: breaker state, concurrency, counters")
    created_at: float
    updated_at: float


class ExpertList(BaseModel):
    object: str = "list"
    data: list[ExpertView]


class RegisterExpertRequest(RequestModel):
    """Register a Hugging Face causal-LM directory that already exists on the gateway's machine."""

    id: ExpertId = Field(..., description="Unique expert id (letters, digits, '.', '_', ':', '-')",
                         examples=["my-expert"])
    path: str = Field(..., description="Directory on the server with config.json, *.safetensors, tokenizer files",
                      examples=["/models/my-expert"])
    base: str | None = Field(None, description="For a LoRA adapter directory: the registered base expert")
    tags: list[str] = Field(default_factory=list, examples=[["code"]])
    domain: str | None = Field(None, examples=["code"])
    lineage: dict[str, Any] | None = None

    model_config = {"extra": "forbid"}


class PinRequest(RequestModel):
    pinned: bool = True


class DeletedView(BaseModel):
    id: str
    object: str = "expert"
    deleted: bool = True


class JobView(BaseModel):
    id: str
    object: str = "job"
    kind: str
    params: dict[str, Any]
    status: str = Field(..., description="queued | running | succeeded | failed | cancelled")
    progress: float = Field(..., description="0..1")
    message: str | None = None
    result: Any = None
    error: str | None = None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    updated_at: float
    detail: dict[str, Any] | None = Field(None, description="Live progress details of some job kinds (a "
                                          "search: queries used, stage, best loss and coefficients so far, "
                                          "the loss-vs-queries series)")
    owner: str | None = Field(None, description="the gateway replica running the job")
    lease_until: float | None = Field(None, description="until when the owner's heartbeat holds the job; past "
                                      "it, another replica fails it")


class JobList(BaseModel):
    object: str = "list"
    data: list[JobView]


class LoadedView(BaseModel):
    id: str
    loaded: bool
    pinned: bool
