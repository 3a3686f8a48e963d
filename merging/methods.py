"""Merge methods: one uniform signature, declared parameters, and a registry.

A method function merges ONE tensor position across experts::

    fn(base, tensors, per_expert, params, generator) -> Tensor

* ``base``: the base model's tensor (shape S) or ``None`` when the method needs no base;
* ``tensors``: the N experts' tensors (shape S each);
* ``per_expert``: N mappings of per-expert parameters (``weight``, ``density``, ...);
* ``params``: the global parameters (``normalize``, ``lambda``, ``t``, ...);
* ``generator``: the source of randomness for stochastic methods (DARE).

Call methods through :func:`merge_tensor`, which fills parameter defaults, copies non-float
tensors (int buffers) from the base/first input instead of averaging them, runs the method
in float32 and returns the input's dtype and device. The per-tensor method functions
themselves receive float32 tensors with all parameters resolved.

Parameters are declared once as :class:`ParamSpec` (see :mod:`merging.spec`).
Definitions follow mergekit (``generalized_task_arithmetic.py``, ``sparsify.py``,
``linear.py``, ``slerp.py``); differences to the papers are noted per method.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from merging import ops
from merging.errors import IncompatibleExpertsError, InvalidRecipeError, UnknownMergeMethodError
from merging.spec import MergeFn, MergeMethod, ParamSpec

__all__ = [
    "METHODS",
    "MergeFn",
    "MergeMethod",
    "ParamSpec",
    "get_method",
    "merge_tensor",
]


def _weights(per_expert: Sequence[Mapping[str, float]], name: str, like: Tensor) -> Tensor:
    return torch.tensor([p[name] for p in per_expert], dtype=torch.float32, device=like.device)


def _safe_divide(x: Tensor, divisor: float) -> Tensor:
    # mergekit: a divisor with |d| < 1e-8 is replaced by 1 rather than producing inf/nan
    return x / divisor if abs(divisor) >= 1e-8 else x


def _linear(
    base: Tensor | None,
    tensors: Sequence[Tensor],
    per_expert: Sequence[Mapping[str, float]],
    params: Mapping[str, Any],
    generator: torch.Generator | None,
) -> Tensor:
    """theta = sum_i w_i theta_i [/ sum_i w_i if normalize]. The base, if any, is not used."""
    # Wortsman et al. 2022 (model soups) / Li et al. 2022 (BTM parameter averaging)
    ws = [float(p["weight"]) for p in per_expert]
    total = sum(ws)
    scale = 1.0 / total if params["normalize"] and abs(total) >= 1e-8 else 1.0  # mergekit's safe divide
    # Accumulate in place: no (N, *S) stack, one float32 output (this is the hot path of BTM averaging).
    out = tensors[0].to(torch.float32) * (ws[0] * scale)
    for t, w in zip(tensors[1:], ws[1:], strict=True):
        out.add_(t.to(device=out.device), alpha=w * scale)
    return out


def _gta(sparsify: Literal["magnitude", "random", "breadcrumbs"] | None, consensus: bool) -> MergeFn:
    """Generalised task arithmetic (mergekit's GTA): sparsify, weight, [elect+disjoint], scale."""

    def fn(
        base: Tensor | None,
        tensors: Sequence[Tensor],
        per_expert: Sequence[Mapping[str, float]],
        params: Mapping[str, Any],
        generator: torch.Generator | None,
    ) -> Tensor:
        """theta = base + lambda * M(w, sparsify(tau)), tau_i = theta_i - base.

        M = sum_i w_i tau_i (/ sum_i w_i if normalize) without consensus (task arithmetic,
        DARE-linear, breadcrumbs); with consensus, M = disjoint merge of the entries agreeing
        with the sign elected by sum_i w_i tau_i (TIES, DARE-TIES, breadcrumbs-TIES).
        """
        # Ilharco et al. 2023 (arXiv 2212.04089) Sec. 2: theta = theta_pre + lambda sum_t tau_t
        assert base is not None
        deltas = ops.task_vectors(base, tensors)  # (N, *S) float32, modified in place below
        for d, p in zip(deltas, per_expert, strict=True):
            if sparsify == "magnitude":  # TIES step 1 "trim"
                d.mul_(ops.magnitude_mask(d, p["density"]))
            elif sparsify == "breadcrumbs":  # Davari & Belilovsky 2023, Sec. 3: mask both tails
                d.mul_(ops.breadcrumbs_mask(d, p["density"], p["gamma"]))
            elif sparsify == "random":  # Yu et al. 2024 (DARE) Sec. 3: drop w.p. 1 - density, rescale
                ops.dare_drop_(d, p["density"], rescale=bool(params["rescale"]), generator=generator)
        ws = [float(p["weight"]) for p in per_expert]
        w = torch.tensor(ws, dtype=torch.float32, device=deltas.device)
        if consensus:
            mixed = _disjoint_in_place(deltas, ws, w, normalize=params["normalize"])
        else:
            mixed = ops.weighted_sum(deltas, w)
            if params["normalize"]:
                mixed = _safe_divide(mixed, sum(ws))
        return base.to(torch.float32, copy=True).add_(mixed, alpha=params["lambda"])

    return fn


# Entries per (N, chunk) op of the disjoint merge. CPU: under torch's GRAIN_SIZE (32768),
# elementwise ops run on the calling thread (no OpenMP fork/join per chunk, which stalls when
# another process holds a core) and the chunk's working set stays in L2. Other devices: large
# chunks, only to bound the temporaries.
_TIES_WORK = (1 << 15) - 1
_TIES_WORK_DEVICE = 1 << 24


def _disjoint_in_place(deltas: Tensor, ws: list[float], w: Tensor, *, normalize: bool) -> Tensor:
    """TIES elect + disjoint merge (== ops.sign_consensus_mask on the weighted deltas followed by
    ops.disjoint_merge), in cache-sized column chunks, with no (N, *S) temporaries.

    The elected sign is sgn(sum_i w_i tau_i) (zero elects +); expert i agrees where
    sgn(w_i tau_i) equals it, so zero entries never agree. Disagreeing entries of ``deltas``
    are multiplied by 0 (as mergekit's ``deltas * mask``). Returns the merged delta, shape S."""
    # Yadav et al. 2023, Sec. 3 steps 2-3 (elect, disjoint merge), mergekit's weighted form
    n = deltas.shape[0]
    flat = deltas.view(n, -1)  # (N, P)
    mixed = torch.empty(flat.shape[1], dtype=torch.float32, device=deltas.device)  # (P,)
    flip = None  # (N, 1) sign of w_i, only needed when some weight is negative
    if any(wi < 0 for wi in ws):
        flip = torch.tensor([[1.0 if wi >= 0 else -1.0] for wi in ws], device=deltas.device)
    work = _TIES_WORK if deltas.device.type == "cpu" else _TIES_WORK_DEVICE
    step = max(64, (work // n) // 64 * 64)
    for lo in range(0, flat.shape[1], step):
        d, out = flat[:, lo : lo + step], mixed[lo : lo + step]  # (N, c), (c,)
        torch.mv(d.t(), w, out=out)  # elect: vote = sum_i w_i tau_i
        agree = d * torch.where(out >= 0, 1.0, -1.0)  # (N, c): > 0 where sgn(tau_i) = elected
        if flip is not None:
            agree.mul_(flip)
        agree = agree > 0
        d.mul_(agree)
        torch.mv(d.t(), w, out=out)  # disjoint sum: sum_i w_i m_i tau_i
        if normalize:
            divisor = torch.zeros_like(out)
            for a, wi in zip(agree, ws, strict=True):
                if wi != 0.0:
                    divisor.add_(a, alpha=wi)
            out.div_(divisor.masked_fill_(divisor == 0, 1.0))
    return mixed.view(deltas.shape[1:])


def _slerp(
    base: Tensor | None,
    tensors: Sequence[Tensor],
    per_expert: Sequence[Mapping[str, float]],
    params: Mapping[str, Any],
    generator: torch.Generator | None,
) -> Tensor:
    """slerp(a, b, t) with a = base (or the first expert when there is no base)."""
    a, b = (base, tensors[0]) if base is not None else (tensors[0], tensors[1])
    return ops.slerp(a, b, params["t"])


def _evo(
    base: Tensor | None,
    tensors: Sequence[Tensor],
    per_expert: Sequence[Mapping[str, float]],
    params: Mapping[str, Any],
    generator: torch.Generator | None,
) -> Tensor:
    """theta = base + sum_i beta_i S_{alpha_i}(theta_i - base), summed in expert order."""
    # Black-box Model Merging for LMaaS (2509.12951), Sec. 3 "Merge operator", full-model form
    assert base is not None
    out = base.clone()
    for t, p in zip(tensors, per_expert, strict=True):
        if p["beta"] != 0.0 and p["alpha"] > 0.0:
            out.add_(ops.evo_sparsify(t - base, p["alpha"]), alpha=p["beta"])
    return out


def _p(name: str, default: float, low: float, high: float, per_expert: bool, doc: str) -> ParamSpec:
    return ParamSpec(name, default, low, high, per_expert, "float", doc)


def _flag(name: str, default: bool, doc: str) -> ParamSpec:
    return ParamSpec(name, float(default), 0.0, 1.0, False, "bool", doc)


WEIGHT = _p("weight", 1.0, -10.0, 10.0, True, "mixing weight w_i")
DENSITY = _p("density", 1.0, 0.0, 1.0, True, "fraction of task-vector entries kept")
GAMMA = _p("gamma", 0.01, 0.0, 1.0, True, "fraction of largest-magnitude entries dropped (outliers)")
LAMBDA = _p("lambda", 1.0, -10.0, 10.0, False, "scale of the merged task vector")
ALPHA = _p("alpha", 1.0, 0.0, 1.0, True, "Evo keep fraction of S_alpha")
BETA = _p("beta", 1.0, -1.5, 1.5, True, "Evo sign-aware scale")
T = _p("t", 0.5, 0.0, 1.0, False, "interpolation position: 0 = first input, 1 = second")


def _gta_params(
    sparse: bool, normalize: bool, rescale: bool | None, gamma: bool = False
) -> tuple[ParamSpec, ...]:
    out = [WEIGHT] + ([DENSITY] if sparse else []) + ([GAMMA] if gamma else [])
    out += [LAMBDA, _flag("normalize", normalize, "divide by the (agreeing) weight sum")]
    if rescale is not None:
        out.append(_flag("rescale", rescale, "rescale kept entries by 1/density (DARE)"))
    return tuple(out)


_ARXIV = "https://arxiv.org/abs/"
METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        MergeMethod(
            "linear",
            _linear,
            False,
            (WEIGHT, _flag("normalize", True, "divide by sum of weights")),
            _ARXIV + "2203.05482",
            lora=True,
        ),
        MergeMethod(
            "task_arithmetic", _gta(None, False), True, _gta_params(False, False, None), _ARXIV + "2212.04089"
        ),
        # mergekit's ties elects the sign on the WEIGHTED trimmed deltas and divides by the sum of
        # agreeing weights; Yadav et al. use unit weights, where both coincide.
        MergeMethod(
            "ties", _gta("magnitude", True), True, _gta_params(True, True, None), _ARXIV + "2306.01708"
        ),
        MergeMethod(
            "dare_linear",
            _gta("random", False),
            True,
            _gta_params(True, False, True),
            _ARXIV + "2311.03099",
            stochastic=True,
        ),
        MergeMethod(
            "dare_ties",
            _gta("random", True),
            True,
            _gta_params(True, False, True),
            _ARXIV + "2311.03099",
            stochastic=True,
        ),
        MergeMethod(
            "breadcrumbs",
            _gta("breadcrumbs", False),
            True,
            _gta_params(True, False, None, True),
            _ARXIV + "2312.06795",
        ),
        MergeMethod(
            "breadcrumbs_ties",
            _gta("breadcrumbs", True),
            True,
            _gta_params(True, False, None, True),
            _ARXIV + "2312.06795",
        ),
        MergeMethod(
            "slerp",
            _slerp,
            False,
            (T,),
            "https://dl.acm.org/doi/10.1145/325165.325242",
            min_experts=1,
            max_experts=2,
            optional_base=True,
        ),
        MergeMethod(
            "evo",
            _evo,
            True,
            (ALPHA, BETA, _flag("sparsify_b", False, "LoRA only: also sparsify B")),
            _ARXIV + "2509.12951",
            lora=True,
        ),
        MergeMethod("cat", None, False, (WEIGHT,), "https://github.com/huggingface/peft", lora=True),
    )
}


def get_method(name: str) -> MergeMethod:
    """Look a method up in :data:`METHODS`; raise UnknownMergeMethodError with the known names."""
    try:
        return METHODS[name]
    except KeyError:
        raise UnknownMergeMethodError(f"unknown merge method {name!r}; known: {sorted(METHODS)}") from None


def merge_tensor(
    method: MergeMethod | str,
    base: Tensor | None,
    tensors: Sequence[Tensor],
    per_expert: Sequence[Mapping[str, Any]],
    params: Mapping[str, Any] | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Merge one tensor position with ``method``.

    Args:
        base: shape S, or ``None`` for methods without a base.
        tensors: N tensors of shape S (N >= 1).
        per_expert: N mappings of per-expert parameters (missing ones take defaults).
        params: global parameters (missing ones take defaults).
        generator: randomness for stochastic methods.

    Returns:
        Tensor of shape S with the dtype and device of ``base`` (or of ``tensors[0]``).
        Non-float tensors are copied from ``base`` (or ``tensors[0]``), not merged.
    """
    m = get_method(method) if isinstance(method, str) else method
    if m.fn is None:
        raise InvalidRecipeError(f"method {m.name!r} applies only to LoRA adapters")
    if m.needs_base and base is None:
        raise InvalidRecipeError(f"method {m.name!r} needs a base model")
    if len(per_expert) != len(tensors) or not tensors:
        raise InvalidRecipeError(
            f"got {len(tensors)} tensors but {len(per_expert)} per-expert parameter sets"
        )
    ref = base if base is not None else tensors[0]
    if any(t.shape != ref.shape for t in tensors):
        shapes = sorted({tuple(t.shape) for t in [ref, *tensors]})
        raise IncompatibleExpertsError(f"cannot merge tensors of different shapes: {shapes}")
    if not ref.is_floating_point():
        return ref.clone()
    resolved = m.resolve_global(params or {})
    experts = [m.resolve_expert(p) for p in per_expert]
    base32 = None if base is None else base.float()
    inputs = [t.to(device=ref.device, dtype=torch.float32) for t in tensors]
    return m.fn(base32, inputs, experts, resolved, generator).to(device=ref.device, dtype=ref.dtype)
