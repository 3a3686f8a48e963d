"""Merging LoRA adapters factor by factor (PEFT layout).

For a LoRA module, adapter i holds A_i (r x d_in) and B_i (d_out x r), and the weight update
is dW_i = s_i B_i A_i with s_i = lora_alpha / r (or lora_alpha / sqrt(r) with rsLoRA).
Functions here combine the factors of one module across N adapters and return (A, B) for a
merged adapter; they keep the dtype/device of the first adapter's factors and compute in
float32.

* ``evo``: A = sum_i beta_i S_{alpha_i}(A_i), B = sum_i beta_i B_i (Evo-Merging's asymmetric
  sparsification; ``sparsify_b=True`` applies S to B too, for ablations). The merged adapter
  keeps the first adapter's config (its scaling s = lora_alpha / r), as the authors' code does.
* ``linear``: peft's ``add_weighted_adapter(combination_type="linear")``, which is NOT the
  naive A = sum w_i A_i, B = sum w_i B_i: with c_i = w_i s_i it computes
  A = sum_i sgn(c_i) sqrt(|c_i|) A_i and B = sum_i sqrt(|c_i|) B_i, and the merged adapter
  gets lora_alpha = r (scaling 1). Its dW = B A still has cross terms B_i A_j, so it is an
  approximation of sum_i w_i dW_i (peft says so itself).
* ``cat``: peft's exact form: A = concat_i(c_i A_i) along the rank, B = concat_i(B_i), rank
  sum_i r_i and lora_alpha = that rank (scaling 1), so dW = sum_i w_i dW_i exactly.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from merging import ops
from merging.errors import IncompatibleExpertsError, InvalidRecipeError

__all__ = [
    "LORA_METHODS",
    "cat_lora",
    "evo_lora",
    "is_lora_key",
    "linear_lora",
    "lora_modules",
    "lora_scaling",
    "merge_lora",
    "merged_lora_config",
]

# "<module>.lora_A.weight", "<module>.lora_A.<adapter>.weight", "<module>.lora_embedding_A[.<adapter>]"
_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.lora_(?P<emb>embedding_)?(?P<ab>[AB])(?P<rest>(\.[^.]+)?(\.weight)?)$"
)


def lora_modules(keys: Iterable[str]) -> dict[str, tuple[str, str]]:
    """Pair the LoRA factor keys of one adapter by module.

    Args:
        keys: tensor names of a PEFT adapter state dict.

    Returns:
        ``{module_id: (a_key, b_key)}`` in the order the A keys appear; modules lacking A or B
        are left out. ``module_id`` is the key with ``lora_A`` replaced by ``lora_*``.
    """
    a_keys: dict[str, str] = {}
    b_keys: dict[str, str] = {}
    for key in keys:
        m = _LORA_KEY.match(key)
        if m is None:
            continue
        mid = f"{m['module']}.lora_{m['emb'] or ''}*{m['rest']}"
        (a_keys if m["ab"] == "A" else b_keys)[mid] = key
    return {mid: (a, b_keys[mid]) for mid, a in a_keys.items() if mid in b_keys}


def is_lora_key(key: str) -> bool:
    """True for a LoRA A/B factor key."""
    return _LORA_KEY.match(key) is not None


def lora_scaling(config: Mapping[str, Any]) -> float:
    """s = lora_alpha / r, or lora_alpha / sqrt(r) when ``use_rslora`` (from adapter_config.json)."""
    r, alpha = float(config["r"]), float(config.get("lora_alpha", config["r"]))
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _acc(tensors: Sequence[Tensor], coefs: Sequence[float], keep: Sequence[float] | None) -> Tensor:
    """sum_i coef_i * [S_{keep_i}](t_i), summed in order into a float32 zero tensor."""
    out = torch.zeros(tensors[0].shape, dtype=torch.float32, device=tensors[0].device)
    for i, (t, c) in enumerate(zip(tensors, coefs, strict=True)):
        k = 1.0 if keep is None else keep[i]
        if c != 0.0 and k > 0.0:
            out.add_(ops.evo_sparsify(t.float(), k), alpha=c)
    return out


def _check_pairs(a: Sequence[Tensor], b: Sequence[Tensor], same_rank: bool) -> None:
    if not a or len(a) != len(b):
        raise IncompatibleExpertsError(f"need as many A as B factors, got {len(a)} and {len(b)}")
    for i, (ai, bi) in enumerate(zip(a, b, strict=True)):
        if ai.dim() != 2 or bi.dim() != 2 or ai.shape[0] != bi.shape[1]:
            raise IncompatibleExpertsError(
                f"adapter {i}: A {tuple(ai.shape)} and B {tuple(bi.shape)} do not pair"
            )
        if ai.shape[1] != a[0].shape[1] or bi.shape[0] != b[0].shape[0]:
            raise IncompatibleExpertsError(
                f"adapter {i}: factors A {tuple(ai.shape)}, B {tuple(bi.shape)} do not match the first "
                f"adapter's A {tuple(a[0].shape)}, B {tuple(b[0].shape)}"
            )
        if same_rank and ai.shape[0] != a[0].shape[0]:
            raise IncompatibleExpertsError(
                f"adapter {i} has rank {ai.shape[0]}, the first has {a[0].shape[0]}"
            )


def evo_lora(
    a: Sequence[Tensor],
    b: Sequence[Tensor],
    alpha: Sequence[float],
    beta: Sequence[float],
    *,
    sparsify_b: bool = False,
) -> tuple[Tensor, Tensor]:
    """Evo-Merging operator on one LoRA module.

    A = sum_i beta_i S_{alpha_i}(A_i),  B = sum_i beta_i B_i  (or beta_i S_{alpha_i}(B_i)).

    Args:
        a: N factors (r, d_in); b: N factors (d_out, r); same r for all.
        alpha: N keep fractions in [0, 1]; beta: N scales (may be negative).
        sparsify_b: also sparsify B (ablation; the paper sparsifies A only).

    Returns:
        (A (r, d_in), B (d_out, r)) in the dtype/device of ``a[0]``/``b[0]``.
    """
    # Black-box Model Merging for LMaaS (2509.12951), Sec. 3 "Merged adapter" (asymmetric sparsification)
    _check_pairs(a, b, same_rank=True)
    out_a = _acc(a, beta, alpha)
    out_b = _acc(b, beta, alpha if sparsify_b else None)
    return out_a.to(a[0].dtype), out_b.to(b[0].dtype)


def _peft_coefs(weights: Sequence[float], scalings: Sequence[float]) -> tuple[list[float], list[float]]:
    """c_i = w_i s_i -> (sgn(c_i) sqrt|c_i| for A, sqrt|c_i| for B), as peft computes them."""
    coef_a, coef_b = [], []
    for w, s in zip(weights, scalings, strict=True):
        c = w * s
        coef_a.append(math.sqrt(abs(c)) * (1 if c >= 0 else -1))
        coef_b.append(math.sqrt(abs(c)))
    return coef_a, coef_b


def linear_lora(
    a: Sequence[Tensor], b: Sequence[Tensor], weights: Sequence[float], scalings: Sequence[float]
) -> tuple[Tensor, Tensor]:
    """peft's LoRA "linear" combination (``_generalized_task_arithmetic_weighted_adapter``).

    A = sum_i sgn(c_i) sqrt(|c_i|) A_i, B = sum_i sqrt(|c_i|) B_i with c_i = w_i s_i; the
    result is meant for scaling 1 (lora_alpha = r).

    Args:
        a, b: N factor pairs of equal rank; weights: N w_i; scalings: N s_i.

    Returns:
        (A (r, d_in), B (d_out, r)) in the dtype/device of ``a[0]``/``b[0]``.
    """
    _check_pairs(a, b, same_rank=True)
    coef_a, coef_b = _peft_coefs(weights, scalings)
    stack_a = torch.stack([t.float() for t in a])  # (N, r, d_in)
    stack_b = torch.stack([t.float() for t in b])  # (N, d_out, r)
    out_a = ops.weighted_sum(stack_a, torch.tensor(coef_a, device=stack_a.device))
    out_b = ops.weighted_sum(stack_b, torch.tensor(coef_b, device=stack_b.device))
    return out_a.to(a[0].dtype), out_b.to(b[0].dtype)


def cat_lora(
    a: Sequence[Tensor], b: Sequence[Tensor], weights: Sequence[float], scalings: Sequence[float]
) -> tuple[Tensor, Tensor]:
    """peft's LoRA "cat": A = concat_i(w_i s_i A_i) (rank dim), B = concat_i(B_i); scaling 1.

    Returns:
        (A (sum r_i, d_in), B (d_out, sum r_i)), so B A = sum_i w_i s_i B_i A_i exactly.
    """
    _check_pairs(a, b, same_rank=False)
    out_a = torch.cat([t.float() * (w * s) for t, w, s in zip(a, weights, scalings, strict=True)], dim=0)
    out_b = torch.cat([t.float() for t in b], dim=1)
    return out_a.to(a[0].dtype), out_b.to(b[0].dtype)


LORA_METHODS = ("evo", "linear", "cat")


def merge_lora(
    method: str,
    a: Sequence[Tensor],
    b: Sequence[Tensor],
    per_expert: Sequence[Mapping[str, float]],
    params: Mapping[str, Any],
    scalings: Sequence[float] | None = None,
) -> tuple[Tensor, Tensor]:
    """Dispatch one module's merge by method name (parameters already resolved).

    ``linear`` normalises the weights to sum 1 first when ``params["normalize"]`` is true
    (peft's own call corresponds to ``normalize=False``). ``linear`` and ``cat`` need the
    adapters' scalings.
    """
    if method == "evo":
        return evo_lora(
            a,
            b,
            [p["alpha"] for p in per_expert],
            [p["beta"] for p in per_expert],
            sparsify_b=bool(params.get("sparsify_b", False)),
        )
    if method not in ("linear", "cat"):
        raise InvalidRecipeError(f"method {method!r} has no LoRA form; LoRA methods: {list(LORA_METHODS)}")
    if scalings is None:
        raise IncompatibleExpertsError(f"LoRA {method!r} needs each adapter's scaling (lora_alpha / r)")
    weights = [p["weight"] for p in per_expert]
    if method == "cat":
        return cat_lora(a, b, weights, scalings)
    total = sum(weights)
    if params.get("normalize", False) and abs(total) >= 1e-8:
        weights = [w / total for w in weights]
    return linear_lora(a, b, weights, scalings)


def merged_lora_config(method: str, first_config: Mapping[str, Any], ranks: Sequence[int]) -> dict[str, Any]:
    """adapter_config.json of the merged adapter: the first adapter's, with r/lora_alpha fixed up.

    ``evo`` keeps the first config unchanged (authors' code); ``linear`` sets lora_alpha = r and
    ``cat`` sets r = lora_alpha = sum of ranks (scaling 1), as peft does. rsLoRA is switched off
    for linear/cat so that the scaling really is 1.
    """
    cfg = dict(first_config)
    if method == "evo":
        return cfg
    r = int(sum(ranks)) if method == "cat" else int(ranks[0])
    cfg.update(r=r, lora_alpha=r, use_rslora=False, rank_pattern={}, alpha_pattern={})
    return cfg
