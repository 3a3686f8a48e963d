"""Request-time LoRA mixes: a base and a weighted set of its adapters, served without registering anything.

A mix is named by a compact model id, `<base>@<method>:<adapter>*<weight>,<adapter>*<weight>` (for
`evo`: `<adapter>*<alpha>/<beta>`), e.g. `pool-base@linear:pool-a*0.7,pool-b*0.3`; ids cannot contain
`@ * , /`, so the form is unambiguous. A request can also send the same thing as the body field
`adapters` (`{"method": ..., "experts": [{"id", "weight"} | {"id", "alpha", "beta"}], "parameters": ...}`),
which is turned into the compact id. A mix is checked exactly as `POST /admin/merges` checks a LoRA
recipe, and its factors are the ones that merge would register, so the answers are the same.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from experts.errors import InvalidExpertError
from experts.hf.multilora import LoraFactors, factors_from
from experts.repository.merges import MergeRunner
from experts.repository.registry import ExpertRecord
from experts.repository.repo import ExpertRepository
from merging.methods import get_method
from merging.recipe import MergeRecipe, load_recipe

MIX_METHODS = ("linear", "cat", "evo")
SEP = "@"


def is_mix_id(model_id: str) -> bool:
    return SEP in model_id


def _num(text: str, what: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise InvalidExpertError(f"mix: {what} {text!r} is not a number") from None
    if not math.isfinite(x):
        raise InvalidExpertError(f"mix: {what} {text!r} is not finite")
    return x


def parse_mix_id(model_id: str) -> tuple[str, dict[str, Any]]:
    """(base, recipe mapping) from a compact mix id; InvalidExpertError (400) when it is malformed."""
    base, _, rest = model_id.partition(SEP)
    method, colon, items = rest.partition(":")
    if not base or not colon or not items:
        raise InvalidExpertError(f"mix {model_id!r}: expected <base>@<method>:<adapter>*<weight>,...")
    if method not in MIX_METHODS:
        raise InvalidExpertError(f"mix {model_id!r}: method must be one of {', '.join(MIX_METHODS)}")
    experts: list[dict[str, Any]] = []
    for item in items.split(","):
        eid, star, value = item.partition("*")
        if not eid:
            raise InvalidExpertError(f"mix {model_id!r}: an adapter id is empty")
        if method == "evo":
            alpha, slash, beta = value.partition("/")
            if not star or not slash:
                raise InvalidExpertError(f"mix {model_id!r}: evo parts are <adapter>*<alpha>/<beta>")
            experts.append({"id": eid, "alpha": _num(alpha, "alpha"), "beta": _num(beta, "beta")})
        else:
            experts.append({"id": eid, "weight": _num(value, "weight") if star else 1.0})
    return base, {"method": method, "experts": experts}


def _fmt(x: float) -> str:
    return repr(float(x))


def mix_id(base: str, spec: Mapping[str, Any]) -> str:
    """The compact id of a mix given as the body field `adapters` (global `parameters` are folded in)."""
    method = spec.get("method", "linear")
    if method not in MIX_METHODS:
        raise InvalidExpertError(f"adapters.method must be one of {', '.join(MIX_METHODS)}")
    params = dict(spec.get("parameters") or {})
    extra = set(params) - {"weight", "alpha", "beta", "normalize"}
    if extra:
        raise InvalidExpertError(f"adapters.parameters: {sorted(extra)[0]!r} is not a mix parameter")
    experts = spec.get("experts") or []
    if not experts:
        raise InvalidExpertError("adapters.experts must list at least one adapter")
    parts = []
    for e in experts:
        if not isinstance(e, Mapping) or "id" not in e:
            raise InvalidExpertError("adapters.experts[] must be objects with an 'id'")
        eid = str(e["id"])
        if method == "evo":
            parts.append(f"{eid}*{_fmt(e.get('alpha', params.get('alpha', 1.0)))}/"
                         f"{_fmt(e.get('beta', params.get('beta', 1.0)))}")
        else:
            parts.append(f"{eid}*{_fmt(e.get('weight', params.get('weight', 1.0)))}")
    suffix = ",normalize" if params.get("normalize") else ""
    return f"{base}{SEP}{method}:{','.join(parts)}{suffix}"


def _recipe(model_id: str) -> tuple[str, MergeRecipe]:
    normalize = model_id.endswith(",normalize")
    base, raw = parse_mix_id(model_id.removesuffix(",normalize"))
    if normalize:
        raw["parameters"] = {"normalize": True}
    if get_method(raw["method"]).needs_base:  # evo: the adapters' base, as merge sessions write the recipe
        raw["base"] = base
    try:
        return base, load_recipe(raw)
    except ValueError as e:
        raise InvalidExpertError(f"mix {model_id!r}: {e}") from None


def mix_record(repo: ExpertRepository, model_id: str) -> ExpertRecord:
    """The checked mix as a `lora` record (not stored): its adapters exist, are LoRA adapters of `base`
    with the same targets, and the parameters are in range — the checks of a LoRA merge recipe."""
    base, recipe = _recipe(model_id)
    base_rec = repo.record(base)  # 404 for an unknown base
    runner = MergeRunner(repo)
    runner.preflight(recipe)
    adapters = [repo.record(i) for i in recipe.expert_ids]
    wrong = [r.id for r in adapters if r.kind != "lora" or r.spec.get("base") != base]
    if wrong:
        raise InvalidExpertError(f"mix {model_id!r}: {wrong[0]!r} is not a LoRA adapter of {base!r}")
    return ExpertRecord(id=model_id, kind="lora", status="ready", architecture=base_rec.architecture,
                        context_length=base_rec.context_length, tokenizer_fingerprint=base_rec.tokenizer_fingerprint,
                        spec={"base": base, "mix": recipe.model_dump(mode="json")},
                        lineage={"op": "mix", "recipe": recipe.model_dump(mode="json")})


def mix_factors(repo: ExpertRepository, model_id: str) -> LoraFactors:
    """The mix's factors: the tensors `POST /admin/merges` would register for the same recipe."""
    _, recipe = _recipe(model_id)
    tensors, config = MergeRunner(repo).lora_tensors(recipe)
    return factors_from(model_id, tensors, config, tuple(recipe.expert_ids))
