"""Wire models of /admin/orphans: artifacts without a registry row, quarantined in `<data dir>/orphans`."""

from __future__ import annotations

from pydantic import BaseModel, Field

from app.protocol.common import RequestModel


class OrphanView(BaseModel):
    object: str = "orphan"
    name: str = Field(..., description="Directory name under <data dir>/orphans")
    files: list[str]
    size_bytes: int
    modified_at: float
    looks_like: str = Field(..., description="model (config.json) | adapter (adapter_config.json) | unknown")
    suggested_id: str = Field(..., description="The expert id its artifact directory was named after")


class OrphanList(BaseModel):
    object: str = "list"
    data: list[OrphanView]


class AdoptOrphanRequest(RequestModel):
    """Register a quarantined artifact again: validated and registered like any other expert."""

    id: str = Field(..., description="The expert id to register it as", examples=["my-expert"])
    tags: list[str] = []
    domain: str | None = None
    base: str | None = Field(None, description="For a LoRA adapter: its registered base expert")


class OrphanDeletedView(BaseModel):
    name: str
    object: str = "orphan"
    deleted: bool = True
