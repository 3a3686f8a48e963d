"""mergekit configurations, as written for ``mergekit-yaml``, translated to MergeGate recipes.

Accepted: ``merge_method`` (the methods both tools implement), ``models`` (each ``model`` with
optional ``parameters``), ``base_model``, ``parameters``, ``dtype`` / ``out_dtype``,
``tokenizer_source`` (``base`` or omitted). Parameters may be scalars, gradients over layers or
``filter`` conditions (:mod:`merging.tensor_params`); ``int8_mask`` is accepted and ignored (it
only changes how mergekit stores a mask, not the result). Everything else (``slices``
frankenmerges, ``modules``, ``tokenizer``, ``chat_template``, ``tokenizer_source: union``,
other methods) is refused with an :class:`InvalidRecipeError` naming the field.

Model references are resolved by a caller-supplied function (registered id or server path ->
expert id), so this module stays pure. Reference: mergekit ``config.MergeConfiguration``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from merging.errors import InvalidRecipeError
from merging.methods import get_method

__all__ = ["MERGEKIT_METHODS", "from_mergekit"]

Resolve = Callable[[str, str], str]  # (reference, field) -> expert id

MERGEKIT_METHODS = (
    "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "slerp",
)
_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
           "bfloat16": "bfloat16", "bf16": "bfloat16"}
_IGNORED = ("int8_mask",)
_REFUSED = {
    "slices": "layer slices (frankenmerges, layer stacking) are not supported: merge whole models with 'models'",
    "modules": "per-module merges are not supported: merge whole models with 'models'",
    "tokenizer": "tokenizer surgery is not supported: the merged expert keeps the base model's tokenizer",
    "chat_template": "chat templates are not set by merges: the merged expert keeps the base model's one",
}
_KNOWN = ("merge_method", "models", "base_model", "parameters", "dtype", "out_dtype", "tokenizer_source")


def _fail(field: str, message: str) -> InvalidRecipeError:
    return InvalidRecipeError(f"mergekit config: {field}: {message}")


def _check_value(field: str, value: Any) -> None:
    """A scalar, a list of numbers (gradient) or a list of {filter, value} conditions."""
    if isinstance(value, bool | int | float):
        return
    if isinstance(value, list) and value and all(isinstance(v, int | float) and not isinstance(v, bool)
                                                 for v in value):
        return
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for i, cond in enumerate(value):
            extra = sorted(set(cond) - {"filter", "value"})
            if extra or "value" not in cond:
                raise _fail(f"{field}[{i}]", "a condition has 'value' and optionally 'filter'"
                            + (f"; unknown key {extra[0]!r}" if extra else ""))
            if not isinstance(cond.get("filter"), str | None):
                raise _fail(f"{field}[{i}].filter", "must be a string (a part of tensor names)")
            if isinstance(cond["value"], dict) or (isinstance(cond["value"], list) and any(
                    isinstance(v, dict | list) for v in cond["value"])):
                raise _fail(f"{field}[{i}].value", "must be a number, a boolean or a gradient (list of numbers)")
            _check_value(f"{field}[{i}].value", cond["value"])
        return
    raise _fail(field, "must be a number, a boolean, a gradient (list of numbers) or a list of "
                       "{filter, value} conditions")


def _split(field: str, params: Any, allowed: list[str], scope: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(scalars, per-tensor settings) of a `parameters` mapping, names checked against `allowed`."""
    if params is None:
        return {}, {}
    if not isinstance(params, dict):
        raise _fail(field, "must be a mapping of parameter names to values")
    scalars, varying = {}, {}
    for name, value in params.items():
        if name in _IGNORED:
            continue
        if name not in allowed:
            raise _fail(f"{field}.{name}", f"not a {scope} parameter of this method; known: {sorted(allowed)}")
        _check_value(f"{field}.{name}", value)
        (scalars if isinstance(value, bool | int | float) else varying)[name] = value
    return scalars, varying


def _top_level(config: Mapping[str, Any]) -> str:
    for key, why in _REFUSED.items():
        if config.get(key) is not None:
            raise _fail(key, why)
    unknown = sorted(set(config) - set(_KNOWN) - set(_REFUSED))
    if unknown:
        raise _fail(unknown[0], f"unknown field; a mergekit config here has {list(_KNOWN)}")
    method = config.get("merge_method")
    if method not in MERGEKIT_METHODS:
        raise _fail("merge_method", f"{method!r} is not supported; supported: {list(MERGEKIT_METHODS)}")
    ts = config.get("tokenizer_source")
    if ts not in (None, "base") and ts != config.get("base_model"):
        raise _fail("tokenizer_source", f"{ts!r} is not supported: merged models must share one tokenizer, and "
                    "the result keeps the base model's (omit tokenizer_source or use 'base')")
    return str(method)


def from_mergekit(config: Mapping[str, Any], resolve: Resolve) -> dict[str, Any]:
    """Translate a mergekit config (a parsed YAML/JSON mapping) to a MergeGate recipe mapping.

    Args:
        config: the mergekit configuration.
        resolve: maps a model reference and the field it came from (e.g. ``"models[1].model"``)
            to a registered expert id, raising for references it cannot resolve.

    Returns:
        A recipe mapping for :func:`merging.recipe.load_recipe` (which checks ranges and counts).
    """
    if not isinstance(config, Mapping):
        raise _fail("(top level)", "must be a mapping with merge_method and models")
    method = _top_level(config)
    m = get_method(method)
    models = config.get("models")
    if not isinstance(models, list) or not models:
        raise _fail("models", "a non-empty list of {model, parameters} entries is required")
    base_ref = config.get("base_model")
    if base_ref is not None and not isinstance(base_ref, str):
        raise _fail("base_model", "must be a model reference (a registered expert id or a server path)")
    base = resolve(base_ref, "base_model") if base_ref is not None else None
    reads_base = m.needs_base or m.optional_base
    if reads_base and base is None:
        raise _fail("base_model", f"merge_method {method!r} needs a base_model")
    expert_names = [p.name for p in m.expert_params]
    experts = []
    for i, entry in enumerate(models):
        field = f"models[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("model"), str):
            raise _fail(field, "each entry is a mapping with 'model' (a registered expert id or a server path)")
        extra = sorted(set(entry) - {"model", "parameters"})
        if extra:
            raise _fail(f"{field}.{extra[0]}", "unknown field; an entry has 'model' and 'parameters'")
        if "+" in entry["model"]:
            raise _fail(f"{field}.model", "'model+lora' references are not supported: register the adapter "
                        "as a lora expert and merge that, or merge the base models")
        eid = resolve(entry["model"], f"{field}.model")
        if reads_base and eid == base:
            continue  # mergekit reads the base through base_model; its per-model parameters do not apply
        scalars, varying = _split(f"{field}.parameters", entry.get("parameters"), expert_names, "per-model")
        experts.append({"id": eid, **scalars, **({"per_tensor": varying} if varying else {})})
    scalars, varying = _split("parameters", config.get("parameters"), [p.name for p in m.params], "global")
    dtype = config.get("out_dtype") or config.get("dtype")
    if dtype is not None and dtype not in _DTYPES:
        raise _fail("out_dtype" if config.get("out_dtype") else "dtype",
                    f"{dtype!r} is not supported; supported: {sorted(set(_DTYPES.values()))}")
    recipe: dict[str, Any] = {"method": method, "experts": experts, "parameters": scalars}
    if varying:
        recipe["per_tensor"] = varying
    if base is not None:
        recipe["base"] = base
    if dtype is not None:
        recipe["dtype"] = _DTYPES[dtype]
    return recipe
