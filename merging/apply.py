"""Applying a recipe to whole models, one tensor position at a time.

:func:`merge_tensors` yields ``(name, tensor)`` pairs; at any moment it holds the current
position's input tensors (base + N experts), their float32 working copies and one output
tensor, never N whole models. Pre-flight checks (:func:`check_compatible`,
:func:`check_tokenizers`) raise :class:`IncompatibleExpertsError` before any tensor is read.

Full models vs LoRA adapters is decided from the experts' tensor names: if they are PEFT
``lora_A``/``lora_B`` factors the merge runs per LoRA module (:mod:`merging.lora`) and the
recipe's base is lineage only; otherwise every tensor position is merged with
:func:`merging.methods.merge_tensor`. Tied embeddings need no special case: a tied
``lm_head.weight`` absent from the files is absent from the output too, and one present in
every input is merged like any other tensor.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from merging.errors import IncompatibleExpertsError
from merging.lora import is_lora_key, lora_modules, merge_lora
from merging.methods import MergeMethod, merge_tensor
from merging.recipe import MergeRecipe
from merging.sources import DictSource, SafetensorsSource, TensorSource, tensor_meta
from merging.tensor_params import layer_positions

__all__ = [
    "DictSource",
    "OnTensor",
    "SafetensorsSource",
    "TensorSource",
    "check_compatible",
    "check_tokenizers",
    "estimate",
    "is_lora_source",
    "merge_tensors",
    "tensor_seed",
]

OnTensor = Callable[[int, int, str], None]
_SHOW = 5


def _names(keys: Sequence[str]) -> str:
    more = f" (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
    return ", ".join(repr(k) for k in keys[:_SHOW]) + more


def check_compatible(sources: Mapping[str, TensorSource], base: str | None = None) -> list[str]:
    """Check that all sources hold the same tensor names with the same shapes.

    Args:
        sources: id -> source, for every model that takes part (base included, if used).
        base: id of the reference model; defaults to the first source.

    Returns:
        The reference's tensor names, in its order.

    Raises:
        IncompatibleExpertsError: naming the missing/extra tensors or the tensor whose shapes
        differ, with both shapes.
    """
    ids = list(sources)
    ref_id = base if base is not None else ids[0]
    ref_keys = list(sources[ref_id].keys())
    ref_set = set(ref_keys)
    for sid in ids:
        if sid == ref_id:
            continue
        keys = set(sources[sid].keys())
        missing, extra = sorted(ref_set - keys), sorted(keys - ref_set)
        if missing or extra:
            hint = (
                " (a tied lm_head.weight stored by one model only?)"
                if "lm_head.weight" in missing + extra
                else ""
            )
            raise IncompatibleExpertsError(
                f"{sid!r} and {ref_id!r} have different tensors{hint}: "
                + "; ".join(
                    p
                    for p in (
                        f"missing in {sid!r}: {_names(missing)}" if missing else "",
                        f"not in {ref_id!r}: {_names(extra)}" if extra else "",
                    )
                    if p
                )
            )
        for k in ref_keys:
            s_ref, s = tensor_meta(sources[ref_id], k)[0], tensor_meta(sources[sid], k)[0]
            if s_ref != s:
                raise IncompatibleExpertsError(
                    f"tensor {k!r} has shape {list(s)} in {sid!r} but {list(s_ref)} in {ref_id!r}"
                )
    return ref_keys


def check_tokenizers(fingerprints: Mapping[str, str | None], *, allow_mismatch: bool = False) -> None:
    """Refuse to merge models whose tokenizers differ (unless explicitly allowed).

    Args:
        fingerprints: model id -> tokenizer fingerprint (``None``: unknown, not compared).
    """
    known = {k: v for k, v in fingerprints.items() if v is not None}
    if allow_mismatch or len(set(known.values())) <= 1:
        return
    first = next(iter(known))
    other = next(k for k, v in known.items() if v != known[first])
    raise IncompatibleExpertsError(
        f"tokenizers differ: {first!r} and {other!r} do not share a vocabulary; a weight merge of such "
        "models produces gibberish (set allow_tokenizer_mismatch to override)"
    )


def is_lora_source(source: TensorSource) -> bool:
    """True when every tensor of ``source`` is a PEFT LoRA factor."""
    keys = list(source.keys())
    return bool(keys) and all(is_lora_key(k) for k in keys)


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed from the recipe seed and the tensor name (order-independent)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _inputs(recipe: MergeRecipe, sources: Mapping[str, TensorSource]) -> tuple[bool, dict[str, TensorSource]]:
    """(is_lora, id -> source of every model whose tensors the merge reads, base first)."""
    m = recipe.merge_method
    missing = [i for i in recipe.expert_ids if i not in sources]
    if missing:
        raise IncompatibleExpertsError(f"no tensors for expert(s) {_names(missing)}")
    experts = {i: sources[i] for i in recipe.expert_ids}
    lora = [is_lora_source(s) for s in experts.values()]
    if any(lora) and not all(lora):
        not_lora = [i for i, x in zip(experts, lora, strict=True) if not x]
        raise IncompatibleExpertsError(
            f"cannot merge LoRA adapters with full models: {_names(not_lora)} are not adapters"
        )
    if all(lora):
        if recipe.varies_by_tensor:
            raise IncompatibleExpertsError(
                "parameters that vary by tensor (gradients, filters) apply to full models, not LoRA adapters"
            )
        if not m.lora:
            raise IncompatibleExpertsError(
                f"method {m.name!r} has no LoRA form; use 'evo', 'linear' or 'cat'"
            )
        return True, experts  # the base model is lineage only for adapter merges
    if m.fn is None:
        raise IncompatibleExpertsError(f"method {m.name!r} applies only to LoRA adapters")
    if m.uses_base(recipe.base):
        assert recipe.base is not None
        if recipe.base not in sources:
            raise IncompatibleExpertsError(f"no tensors for base {recipe.base!r}")
        return False, {recipe.base: sources[recipe.base], **experts}
    return False, experts


def _lora_plan(
    recipe: MergeRecipe, experts: Mapping[str, TensorSource]
) -> list[tuple[str, str, list[int], list[tuple[str, str]]]]:
    """Per module of the first adapter: (a_key, b_key, adapter indices having it, their keys)."""
    srcs = list(experts.values())
    mods = [lora_modules(s.keys()) for s in srcs]
    same_rank = recipe.method != "cat"
    plan = []
    for mid, (a0, b0) in mods[0].items():
        (ra, da), (db, rb) = tensor_meta(srcs[0], a0)[0], tensor_meta(srcs[0], b0)[0]
        idx, keys = [], []
        for i, mm in enumerate(mods):
            if mid not in mm:  # a module missing from an adapter is skipped for that adapter
                continue
            (r, d_in), (d_out, _) = tensor_meta(srcs[i], mm[mid][0])[0], tensor_meta(srcs[i], mm[mid][1])[0]
            if d_in != da or d_out != db or (same_rank and r != ra):
                raise IncompatibleExpertsError(
                    f"LoRA module {mid!r}: adapter {recipe.expert_ids[i]!r} has A {[r, d_in]}, "
                    f"B {[d_out, r]} but {recipe.expert_ids[0]!r} has A {[ra, da]}, B {[db, rb]} "
                    "(same base and rank required)"
                )
            idx.append(i)
            keys.append(mm[mid])
        plan.append((a0, b0, idx, keys))
    return plan


def _lora_scalings(
    recipe: MergeRecipe, experts: Mapping[str, TensorSource], given: Mapping[str, float] | None
) -> list[float] | None:
    if given is not None:
        return [given[i] for i in recipe.expert_ids]
    found: list[float | None] = [getattr(s, "lora_scaling", None) for s in experts.values()]
    return None if any(v is None for v in found) else [float(v or 0.0) for v in found]


def merge_tensors(
    recipe: MergeRecipe,
    sources: Mapping[str, TensorSource],
    on_tensor: OnTensor | None = None,
    *,
    lora_scalings: Mapping[str, float] | None = None,
) -> Iterator[tuple[str, Tensor]]:
    """Merge whole models tensor by tensor.

    Checks run eagerly (before the first tensor is read); the merge itself runs lazily as
    the returned iterator is consumed.

    Args:
        recipe: the validated recipe.
        sources: id -> source for the recipe's experts and (when used) its base.
        on_tensor: progress callback ``(index, total, name)`` called before each output.
        lora_scalings: expert id -> lora_alpha / r, for LoRA ``linear``/``cat`` when the
            sources carry no ``lora_scaling``.

    Returns:
        Iterator of ``(name, tensor)``; float tensors in ``recipe.dtype`` when set, else in
        the input dtype; non-float tensors copied from the base (or the first expert).
    """
    lora, inputs = _inputs(recipe, sources)
    if lora:
        plan = _lora_plan(recipe, inputs)
        scalings = _lora_scalings(recipe, inputs, lora_scalings)
        return _merge_lora(recipe, inputs, plan, scalings, on_tensor)
    keys = check_compatible(inputs, recipe.base if recipe.merge_method.uses_base(recipe.base) else None)
    return _merge_full(recipe, inputs, keys, on_tensor)


def _cast(t: Tensor, dtype: torch.dtype | None) -> Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def _merge_full(
    recipe: MergeRecipe, inputs: Mapping[str, TensorSource], keys: list[str], on_tensor: OnTensor | None
) -> Iterator[tuple[str, Tensor]]:
    m: MergeMethod = recipe.merge_method
    params, per_expert = recipe.resolved_parameters(), recipe.expert_parameters()
    base_src = inputs[recipe.base] if recipe.base is not None and m.uses_base(recipe.base) else None
    experts = [inputs[i] for i in recipe.expert_ids]
    positions = layer_positions(keys) if recipe.varies_by_tensor else {}
    for idx, name in enumerate(keys):
        if on_tensor is not None:
            on_tensor(idx, len(keys), name)
        if positions:
            params, per_expert = recipe.parameters_at(name, positions[name])
        gen = None
        if m.stochastic:
            gen = torch.Generator().manual_seed(tensor_seed(recipe.effective_seed, name))
        base = base_src.get(name) if base_src is not None else None
        out = merge_tensor(m, base, [s.get(name) for s in experts], per_expert, params, gen)
        yield name, _cast(out, recipe.torch_dtype)


def _merge_lora(
    recipe: MergeRecipe,
    experts: Mapping[str, TensorSource],
    plan: list[tuple[str, str, list[int], list[tuple[str, str]]]],
    scalings: list[float] | None,
    on_tensor: OnTensor | None,
) -> Iterator[tuple[str, Tensor]]:
    params, per_expert = recipe.resolved_parameters(), recipe.expert_parameters()
    srcs = list(experts.values())
    total = 2 * len(plan)
    for j, (a_key, b_key, idx, keys) in enumerate(plan):
        if on_tensor is not None:
            on_tensor(2 * j, total, a_key)
        a = [srcs[i].get(k[0]) for i, k in zip(idx, keys, strict=True)]
        b = [srcs[i].get(k[1]) for i, k in zip(idx, keys, strict=True)]
        sc = None if scalings is None else [scalings[i] for i in idx]
        out_a, out_b = merge_lora(recipe.method, a, b, [per_expert[i] for i in idx], params, sc)
        yield a_key, _cast(out_a, recipe.torch_dtype)
        if on_tensor is not None:
            on_tensor(2 * j + 1, total, b_key)
        yield b_key, _cast(out_b, recipe.torch_dtype)


def estimate(recipe: MergeRecipe, sources: Mapping[str, TensorSource]) -> dict[str, int]:
    """Preview a merge without reading tensor data (headers only where sources allow).

    ``peak_bytes`` is the largest per-position working set: the inputs as stored, their
    float32 copies plus a stacked float32 delta per expert, and the output; it excludes
    what the caller already holds. For LoRA merges the position is one module (A and B).

    Returns:
        ``{"num_tensors", "output_bytes", "peak_bytes"}``.
    """
    lora, inputs = _inputs(recipe, sources)
    srcs = list(inputs.values())
    out_dtype = recipe.torch_dtype
    groups: list[list[tuple[TensorSource, list[str]]]]
    if lora:
        plan = _lora_plan(recipe, inputs)
        groups = [[(srcs[i], list(k)) for i, k in zip(idx, keys, strict=True)] for _, _, idx, keys in plan]
        num = 2 * len(plan)
    else:
        keys = check_compatible(inputs, recipe.base if recipe.merge_method.uses_base(recipe.base) else None)
        groups = [[(s, [k]) for s in srcs] for k in keys]
        num = len(keys)
    output_bytes = peak = 0
    for group in groups:
        metas = [[tensor_meta(s, k) for k in ks] for s, ks in group]
        stored = sum(_nbytes(sh, dt) for ms in metas for sh, dt in ms)
        work = sum(2 * _nbytes(sh, torch.float32) for ms in metas for sh, _ in ms)
        outs = metas if lora and recipe.method == "cat" else metas[:1]  # cat stacks the ranks
        out = sum(
            _nbytes(sh, out_dtype if out_dtype is not None and dt.is_floating_point else dt)
            for ms in outs
            for sh, dt in ms
        )
        output_bytes += out
        peak = max(peak, stored + work + out)
    return {"num_tensors": num, "output_bytes": output_bytes, "peak_bytes": peak}


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * torch.empty((), dtype=dtype).element_size()
