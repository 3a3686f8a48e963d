"""Parameters that vary by tensor: gradients over layers and tensor-name filters (mergekit's form).

A *setting* is one of

* a scalar (``0.5``, ``true``): the same value for every tensor;
* a gradient (``[0, 0.5, 1]``): values spread evenly over the layers and linearly
  interpolated at each layer's position ``t`` in [0, 1];
* a list of conditions (``[{"filter": "attn", "value": 0.5}, {"value": 0.3}]``): the first
  condition whose ``filter`` is a substring of the tensor name (or has no filter, or ``"*"``)
  gives the value, itself a scalar or a gradient; when none matches the setting gives
  nothing and the next setting in precedence (the recipe-wide one, then the default) applies.

Positions follow mergekit's planner: the tensors of layer ``i`` of ``n`` sit at
``t = i / (n - 1)`` (``t = 1`` when ``n == 1``); tensors outside the layer stack (embeddings,
final norm, head) sit at ``t = 0``. Reference: mergekit ``config.evaluate_setting`` and
``plan.MergePlanner.plan_slice``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, ConfigDict, StrictBool

from merging.errors import InvalidRecipeError
from merging.spec import ParamSpec

__all__ = ["Condition", "Setting", "check_setting", "evaluate_setting", "layer_index", "layer_positions"]


class Condition(BaseModel):
    """One conditional value: applies to tensors whose name contains ``filter``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    filter: str | None = None
    value: StrictBool | float | list[float]


Setting = StrictBool | float | list[float] | list[Condition]

# Transformer stacks name their blocks `<stack>.<i>.` (GPT-2 `transformer.h.3.`, Llama `model.layers.3.`).
_LAYER = re.compile(r"(?:^|\.)(?:h|layers|layer|blocks|block|decoder\.layers)\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The layer number in a tensor name (``transformer.h.3.attn.c_attn.weight`` -> 3), or ``None``."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def layer_positions(names: Iterable[str]) -> dict[str, float]:
    """Each tensor's position ``t`` in [0, 1] over the layer stack (0 outside it), as mergekit plans it.

    Args:
        names: every tensor name of the model (the number of layers is read from them).

    Returns:
        name -> t.
    """
    names = list(names)
    idx = {n: layer_index(n) for n in names}
    layers = [i for i in idx.values() if i is not None]
    count = max(layers) + 1 if layers else 0
    if count <= 1:
        return {n: (1.0 if i is not None else 0.0) for n, i in idx.items()}
    return {n: (0.0 if i is None else i / (count - 1)) for n, i in idx.items()}


def _interpolate(values: list[float], t: float) -> float:
    if len(values) == 1:
        return float(values[0])
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return float((1 - frac) * values[i0] + frac * values[i1])


def evaluate_setting(setting: Setting, tensor_name: str, t: float) -> float | bool | None:
    """The value of ``setting`` for one tensor at layer position ``t``, or ``None`` when no condition matches.

    Example: ``[0, 0.5, 1]`` at ``t = 0.25`` is 0.25; ``[{"filter": "mlp", "value": 0.7}]`` on
    ``"h.0.attn.c_attn.weight"`` is ``None``.
    """
    if isinstance(setting, bool | int | float):
        return setting
    if not setting:
        return None
    if all(isinstance(v, Condition) for v in setting):
        for cond in setting:
            assert isinstance(cond, Condition)
            if cond.filter in (None, "*") or (cond.filter and cond.filter in tensor_name):
                return evaluate_setting(cond.value, tensor_name, t)
        return None
    return _interpolate([float(v) for v in setting], t)  # type: ignore[arg-type]


def _leaves(setting: Setting) -> list[Any]:
    if isinstance(setting, bool | int | float):
        return [setting]
    out: list[Any] = []
    for v in setting:
        out += _leaves(v.value) if isinstance(v, Condition) else [v]
    return out


def check_setting(spec: ParamSpec, setting: Setting, *, where: str = "") -> None:
    """Check every value a setting can produce against the parameter's range (gradients interpolate
    between their points, so checking the points suffices); raise InvalidRecipeError."""
    if isinstance(setting, list) and not setting:
        raise InvalidRecipeError(f"parameter {spec.name!r} ({where}): an empty list sets nothing")
    for leaf in _leaves(setting):
        if spec.kind == "bool" and isinstance(setting, list) and not isinstance(leaf, bool):
            raise InvalidRecipeError(f"parameter {spec.name!r} ({where}) is a flag; it cannot follow a gradient")
        spec.check(leaf, where=where)
