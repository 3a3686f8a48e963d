"""/admin/merges wire models. The recipe itself is `merging.recipe.MergeRecipe` (validated there)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from app.protocol.common import ExpertId, RequestModel

RECIPE_EXAMPLE = {
    "method": "ties", "base": "demo-code",
    "experts": [{"id": "expert-a", "weight": 0.5, "density": 0.5}, {"id": "expert-b", "weight": 0.5, "density": 0.5}],
    "parameters": {"lambda": 1.0}, "dtype": "float32", "seed": 0,
}


class MergeRequest(RequestModel):
    id: ExpertId = Field(..., description="Id of the merged expert to register", examples=["merged-ties"])
    recipe: dict[str, Any] = Field(..., description="A merge recipe: method, base, experts with per-expert "
                                   "parameters, global parameters, output dtype, seed", examples=[RECIPE_EXAMPLE])
    tags: list[str] = Field(default_factory=list)
    domain: str | None = None

    model_config = {"extra": "forbid"}


class PreviewRequest(RequestModel):
    recipe: dict[str, Any] = Field(..., examples=[RECIPE_EXAMPLE])
    id: ExpertId | None = Field(None, description="Optional output id, checked for availability")


class PreviewView(BaseModel):
    valid: bool = True
    method: str
    experts: list[str] = Field(..., description="Every model the merge reads, base first")
    num_tensors: int
    input_bytes: int
    output_bytes: int
    peak_bytes: int = Field(..., description="Largest working set beyond what is already resident, in bytes")
    recipe: dict[str, Any] = Field(..., description="The recipe with defaults filled in")


class MethodView(BaseModel):
    name: str
    needs_base: bool
    lora: bool
    parameters: list[dict[str, Any]]
    reference: str | None = None
