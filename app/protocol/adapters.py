"""The `adapters` field of /v1 requests: a request-time mix of LoRA adapters on the requested base model."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field

from app.protocol.common import RequestModel


class MixPart(RequestModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(..., description="A registered LoRA adapter of the base named by `model`", examples=["pool-a"])
    weight: float | None = Field(None, ge=-10, le=10, description="linear / cat: the adapter's weight (default 1)")
    alpha: float | None = Field(None, ge=0, le=1, description="evo: keep fraction of A (Evo-Merging's alpha)")
    beta: float | None = Field(None, ge=-1.5, le=1.5, description="evo: signed scale (Evo-Merging's beta)")


class AdapterMix(RequestModel):
    """Served without registering anything; checked like a LoRA merge recipe (same base, same targets,
    parameters in range). The same mix as a compact model id: `<base>@<method>:<id>*<w>,...`."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"method": "linear", "experts": [{"id": "pool-a", "weight": 0.7}, {"id": "pool-b", "weight": 0.3}]}]})

    method: Literal["linear", "cat", "evo"] = "linear"
    experts: list[MixPart] = Field(..., min_length=1, max_length=64)
    normalize: bool = Field(False, description="linear: divide the weights by their sum")

    def as_spec(self) -> dict:
        return {"method": self.method, "experts": [p.model_dump(exclude_none=True) for p in self.experts],
                "parameters": {"normalize": True} if self.normalize else {}}
