"""The merge recipe: what to merge, how, and with which parameters.

A :class:`MergeRecipe` is the serialisable lineage of a merged expert: storing it next to
the result is enough to rebuild the result bit for bit (stochastic methods are seeded by
``seed``; ``None`` means seed 0). Validation reads the method's :class:`ParamSpec` list, so
ranges live in one place. Validators raise ``ValueError`` subclasses, so constructing an
invalid recipe raises ``pydantic.ValidationError`` whose message names the parameter;
:func:`load_recipe` turns that into :class:`InvalidRecipeError` for callers that want one
exception type.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, Self

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from merging.errors import InvalidRecipeError
from merging.methods import MergeMethod, get_method

__all__ = ["DTYPES", "MergeRecipe", "RecipeExpert", "load_recipe"]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_EXPERT_PARAMS = ("weight", "density", "gamma", "alpha", "beta")


class RecipeExpert(BaseModel):
    """One input expert and its per-expert parameters (unset ones take the method defaults)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1)
    weight: float | None = None
    density: float | None = None
    gamma: float | None = None
    alpha: float | None = None
    beta: float | None = None

    def given(self) -> dict[str, float]:
        """The per-expert parameters that are set."""
        return {k: v for k in _EXPERT_PARAMS if (v := getattr(self, k)) is not None}


class MergeRecipe(BaseModel):
    """A validated merge recipe.

    ``parameters`` holds the method's global parameters, and may also hold a per-expert
    parameter as the default for every expert (an expert's own field wins), as in mergekit.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str
    base: str | None = None
    experts: list[RecipeExpert] = Field(min_length=1)
    parameters: dict[str, float | bool] = Field(default_factory=dict)
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    seed: int | None = Field(default=None, ge=0)
    allow_tokenizer_mismatch: bool = False

    @model_validator(mode="after")
    def _check_against_method(self) -> Self:
        m = get_method(self.method)  # UnknownMergeMethodError is a ValueError
        ids = [e.id for e in self.experts]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise InvalidRecipeError(f"expert {dup[0]!r} is listed more than once")
        if m.needs_base and self.base is None:
            raise InvalidRecipeError(f"method {m.name!r} needs a base model ('base')")
        if m.needs_base and self.base in ids:
            raise InvalidRecipeError(f"base {self.base!r} must not also be listed as an expert")
        self._check_count(m)
        m.resolve_global(self.parameters)
        known = {p.name for p in m.expert_params}
        for e in self.experts:
            unused = sorted(set(e.given()) - known)
            if unused:
                raise InvalidRecipeError(
                    f"parameter {unused[0]!r} (expert {e.id!r}) is not used by method {m.name!r}; "
                    f"its per-expert parameters are {sorted(known)}"
                )
            m.resolve_expert(e.given(), self.parameters, where=f"expert {e.id!r}")
        self._check_weight_sum(m)
        return self

    def _check_count(self, m: MergeMethod) -> None:
        n = len(self.experts)
        inputs = n + (1 if m.name == "slerp" and self.base is not None else 0)
        if m.name == "slerp" and inputs != 2:
            raise InvalidRecipeError(
                f"slerp merges exactly two models (base + 1 expert, or 2 experts), got {inputs}"
            )
        if n < m.min_experts or (m.max_experts is not None and n > m.max_experts):
            raise InvalidRecipeError(
                f"method {m.name!r} takes {m.min_experts}..{m.max_experts} experts, got {n}"
            )

    def _check_weight_sum(self, m: MergeMethod) -> None:
        if m.spec("weight") is None or m.spec("normalize") is None:
            return
        if not self.resolved_parameters().get("normalize"):
            return
        if abs(sum(p["weight"] for p in self.expert_parameters())) < 1e-8:
            raise InvalidRecipeError(
                "parameter 'weight': weights sum to 0, which 'normalize' cannot divide by"
            )

    @property
    def merge_method(self) -> MergeMethod:
        """The registered method."""
        return get_method(self.method)

    def resolved_parameters(self) -> dict[str, Any]:
        """Global parameters with defaults filled in."""
        return self.merge_method.resolve_global(self.parameters)

    def expert_parameters(self) -> list[dict[str, float]]:
        """Per-expert parameters with defaults filled in, in expert order."""
        m = self.merge_method
        return [m.resolve_expert(e.given(), self.parameters) for e in self.experts]

    @property
    def expert_ids(self) -> list[str]:
        """The experts' ids, in order."""
        return [e.id for e in self.experts]

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The requested output dtype, or ``None`` to keep each tensor's input dtype."""
        return None if self.dtype is None else DTYPES[self.dtype]

    @property
    def effective_seed(self) -> int:
        """The seed used for stochastic methods (``None`` means 0, so merges stay reproducible)."""
        return 0 if self.seed is None else self.seed


def load_recipe(data: str | bytes | Mapping[str, Any]) -> MergeRecipe:
    """Parse a recipe from JSON text or a mapping; raise InvalidRecipeError on any problem.

    The message lists each error's location and text, e.g.
    ``"experts.0: parameter 'density' ... out of range [0.0, 1.0]"``.
    """
    try:
        if isinstance(data, str | bytes):
            return MergeRecipe.model_validate_json(data)
        return MergeRecipe.model_validate(dict(data))
    except ValidationError as exc:
        parts = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            parts.append(f"{loc}: {msg}" if loc else msg)
        raise InvalidRecipeError("invalid merge recipe: " + "; ".join(parts)) from None
