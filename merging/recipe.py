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
from merging.tensor_params import Setting, check_setting, evaluate_setting

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
    per_tensor: dict[str, Setting] = Field(
        default_factory=dict,
        description="Per-expert parameters that vary by tensor: a gradient over layers or filter conditions "
        "(see merging.tensor_params); they win over the scalar fields where they give a value",
    )

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
    per_tensor: dict[str, Setting] = Field(
        default_factory=dict,
        description="Parameters that vary by tensor (gradients over layers, filter conditions), global or "
        "the default of a per-expert one; where a setting gives no value, ``parameters`` applies",
    )

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
        self._check_per_tensor(m)
        self._check_weight_sum(m)
        return self

    def _check_per_tensor(self, m: MergeMethod) -> None:
        levels = [("", self.per_tensor, self.parameters, m.params)]
        levels += [(f"expert {e.id!r}", e.per_tensor, e.given(), m.expert_params) for e in self.experts]
        for where, settings, scalars, specs in levels:
            names = {p.name: p for p in specs}
            for name, setting in settings.items():
                at = where or "per_tensor"
                if name not in names:
                    raise InvalidRecipeError(
                        f"parameter {name!r} ({at}) is not a parameter of method {m.name!r} that can vary "
                        f"there; known: {sorted(names)}"
                    )
                if name in scalars:
                    raise InvalidRecipeError(f"parameter {name!r} ({at}) is set both as a scalar and per tensor")
                check_setting(names[name], setting, where=at)

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
    def varies_by_tensor(self) -> bool:
        """Whether any parameter is a gradient or has filter conditions."""
        return bool(self.per_tensor) or any(e.per_tensor for e in self.experts)

    def parameters_at(self, tensor_name: str, t: float) -> tuple[dict[str, Any], list[dict[str, float]]]:
        """Global and per-expert parameters for one tensor at layer position ``t`` (see
        :func:`merging.tensor_params.layer_positions`), with mergekit's precedence: the expert's
        own setting, then the recipe-wide one (per tensor, then scalar), then the method default.

        Returns:
            (global parameters, per-expert parameters in expert order), defaults filled in.
        """
        m = self.merge_method

        def at(settings: Mapping[str, Setting], scalars: Mapping[str, Any], names: Any) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for name in names:
                v = evaluate_setting(settings[name], tensor_name, t) if name in settings else None
                if v is None and name in scalars:
                    v = scalars[name]
                if v is not None:
                    out[name] = v
            return out

        expert_names = [p.name for p in m.expert_params]
        shared = at(self.per_tensor, self.parameters, [p.name for p in m.params])
        glob = m.resolve_global({k: v for k, v in shared.items() if k not in expert_names})
        per_expert = [m.resolve_expert(at(e.per_tensor, e.given(), expert_names), shared) for e in self.experts]
        return glob, per_expert

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
