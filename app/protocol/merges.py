"""/admin/merges wire models. The recipe itself is `merging.recipe.MergeRecipe` (validated there)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, model_validator

from app.protocol.common import ExpertId, RequestModel, combination_error

RECIPE_EXAMPLE = {
    "method": "ties", "base": "demo-code",
    "experts": [{"id": "expert-a", "weight": 0.5, "density": 0.5}, {"id": "expert-b", "weight": 0.5, "density": 0.5}],
    "parameters": {"lambda": 1.0}, "dtype": "float32", "seed": 0,
}

MERGEKIT_YAML_EXAMPLE = """merge_method: ties
base_model: demo-base
models:
  - model: demo-code
    parameters:
      density: [1, 0.7, 0.1]   # a gradient over the layers
      weight: 1.0
  - model: /models/my-finetune  # a directory on the server: imported as expert 'my-finetune'
    parameters:
      density: 0.5
      weight:
        - filter: mlp          # tensors whose name contains 'mlp'
          value: 0.5
        - value: 0
parameters:
  normalize: true
dtype: float32
"""
_RECIPE_HELP = ("A MergeGate merge recipe: method, base, experts with per-expert parameters, global parameters, "
                "output dtype, seed")
_MERGEKIT_HELP = ("A mergekit configuration as written for `mergekit-yaml`: its YAML text (a string) or the same "
                  "as a JSON object. `model`/`base_model` are registered expert ids or absolute directories on "
                  "the server (imported as experts named after the directory). Parameters may be gradients over "
                  "layers or `filter` conditions. `slices`, `modules`, `tokenizer`, `tokenizer_source: union` and "
                  "methods other than linear, task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, "
                  "breadcrumbs_ties and slerp are refused with a 400 naming the field. Give either this or `recipe`.")


class _RecipeOrConfig(RequestModel):
    recipe: dict[str, Any] | None = Field(None, description=_RECIPE_HELP, examples=[RECIPE_EXAMPLE])
    mergekit_config: str | dict[str, Any] | None = Field(None, description=_MERGEKIT_HELP,
                                                         examples=[MERGEKIT_YAML_EXAMPLE])

    @model_validator(mode="after")
    def _one_source(self) -> _RecipeOrConfig:
        if (self.recipe is None) == (self.mergekit_config is None):
            raise combination_error("give either 'recipe' or 'mergekit_config'")
        return self


class MergeRequest(_RecipeOrConfig):
    id: ExpertId = Field(..., description="Id of the merged expert to register", examples=["merged-ties"])
    tags: list[str] = Field(default_factory=list)
    domain: str | None = None

    model_config = {"extra": "forbid"}


class PreviewRequest(_RecipeOrConfig):
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
