"""Declared merge-method metadata: :class:`ParamSpec`, :class:`MergeMethod` and ``MergeFn``.

Parameters are declared once (bounds double as validation bounds and search bounds) and
read by recipe validation, the search genome and the API docs, like mergekit's
``ConfigParameterDef`` / ``tensor_parameters``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from merging.errors import InvalidRecipeError

__all__ = ["MergeFn", "MergeMethod", "ParamSpec"]

MergeFn = Callable[
    [
        Tensor | None,
        Sequence[Tensor],
        Sequence[Mapping[str, float]],
        Mapping[str, Any],
        torch.Generator | None,
    ],
    Tensor,
]


@dataclass(frozen=True, slots=True)
class ParamSpec:
    """One declared parameter of a merge method.

    ``low``/``high`` are inclusive validation bounds and the search bounds; ``per_expert``
    says whether it is given per expert (mergekit's ``tensor_parameters``) or once.
    """

    name: str
    default: float
    low: float
    high: float
    per_expert: bool
    kind: Literal["float", "bool"] = "float"
    doc: str = ""

    def check(self, value: Any, *, where: str = "") -> float | bool:
        """Return ``value`` converted to this parameter's kind, or raise InvalidRecipeError."""
        at = f" ({where})" if where else ""
        if self.kind == "bool":
            if isinstance(value, bool) or value in (0, 1):
                return bool(value)
            raise InvalidRecipeError(f"parameter {self.name!r}{at} must be a boolean, got {value!r}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidRecipeError(f"parameter {self.name!r}{at} must be a number, got {value!r}")
        v = float(value)
        if not self.low <= v <= self.high:  # also rejects NaN
            raise InvalidRecipeError(
                f"parameter {self.name!r}{at} = {v} is out of range [{self.low}, {self.high}]"
            )
        return v


@dataclass(frozen=True, slots=True)
class MergeMethod:
    """A registered merge method: its function, parameters and constraints.

    ``fn`` is ``None`` for LoRA-only methods (``cat``); ``lora`` says whether
    :mod:`merging.lora` implements a LoRA-factor form of it. ``needs_base``: the base is an
    input (task-vector methods); ``optional_base``: a given base is an input (``slerp``);
    otherwise a recipe's base is lineage only and is not read.
    """

    name: str
    fn: MergeFn | None
    needs_base: bool
    params: tuple[ParamSpec, ...]
    reference_url: str | None = None
    stochastic: bool = False
    min_experts: int = 1
    max_experts: int | None = None
    lora: bool = False
    optional_base: bool = False

    def uses_base(self, base: str | None) -> bool:
        """Whether a recipe with this ``base`` reads the base model's tensors."""
        return base is not None and (self.needs_base or self.optional_base)

    @property
    def expert_params(self) -> tuple[ParamSpec, ...]:
        """The per-expert parameters."""
        return tuple(p for p in self.params if p.per_expert)

    @property
    def global_params(self) -> tuple[ParamSpec, ...]:
        """The parameters given once per merge."""
        return tuple(p for p in self.params if not p.per_expert)

    def spec(self, name: str) -> ParamSpec | None:
        """The spec named ``name``, or ``None``."""
        return next((p for p in self.params if p.name == name), None)

    def resolve_global(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Fill defaults for the global parameters and check ranges (unknown names refused)."""
        specs = {p.name: p for p in self.global_params}
        unknown = sorted(set(params) - specs.keys() - {p.name for p in self.expert_params})
        if unknown:
            raise InvalidRecipeError(
                f"method {self.name!r} has no parameter {unknown[0]!r}; known: {sorted(specs)}"
            )
        out: dict[str, Any] = {}
        for name, spec in specs.items():
            out[name] = spec.check(params[name]) if name in params else _default(spec)
        return out

    def resolve_expert(
        self, given: Mapping[str, Any], fallback: Mapping[str, Any] | None = None, *, where: str = ""
    ) -> dict[str, float]:
        """Fill defaults for one expert's parameters: ``given`` > ``fallback`` > spec default."""
        out: dict[str, float] = {}
        for spec in self.expert_params:
            if spec.name in given:
                out[spec.name] = float(spec.check(given[spec.name], where=where))
            elif fallback is not None and spec.name in fallback:
                out[spec.name] = float(spec.check(fallback[spec.name], where=where))
            else:
                out[spec.name] = spec.default
        return out


def _default(spec: ParamSpec) -> float | bool:
    return bool(spec.default) if spec.kind == "bool" else spec.default
