"""Tensor primitives shared by the merge methods.

Every function here is pure: tensors in, tensors out, no I/O, no global state, and any
randomness comes from an explicit ``torch.Generator``. Masks are boolean tensors with the
shape of their input. Unless a docstring says otherwise, results keep the input's dtype and
device; the ``deltas`` helpers work in float32 (the methods upcast before calling them).

Two "how many entries to keep" rules coexist, on purpose (see :func:`keep_count`):

* TIES / breadcrumbs use ``floor(density * numel)`` like mergekit's ``sparsify.py`` and
  peft's ``magnitude_based_pruning`` (``int(density * numel)``);
* the Evo sparsifier S_k uses ``max(1, round(k * numel))`` like the authors' code
  (``core/merger.py``). The spec's summary table says ceil; the code says round, and we
  follow the code. ``round`` is Python's (half to even).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "KeepRule",
    "breadcrumbs_mask",
    "dare_drop_",
    "disjoint_merge",
    "evo_sparsify",
    "keep_count",
    "lerp",
    "magnitude_mask",
    "magnitude_threshold",
    "random_mask",
    "sign_consensus_mask",
    "slerp",
    "task_vectors",
    "weighted_sum",
]

KeepRule = Literal["round", "floor", "ceil"]


def keep_count(numel: int, fraction: float, rule: KeepRule = "floor") -> int:
    """Number of entries a keep-fraction retains.

    Args:
        numel: size of the tensor.
        fraction: keep fraction, clipped to [0, 1].
        rule: ``"floor"`` (mergekit/peft TIES: ``int(fraction*numel)``), ``"round"``
            (Evo-Merging code: ``max(1, round(fraction*numel))``, at least one entry for any
            fraction > 0) or ``"ceil"`` (the Evo spec table's wording).

    Returns:
        An int in [0, numel]; 0 only for fraction <= 0 (or floor with fraction*numel < 1);
        numel for fraction >= 1.
    """
    fraction = float(fraction)
    if numel <= 0 or fraction <= 0.0:
        return 0
    if fraction >= 1.0:
        return numel
    if rule == "floor":
        return min(numel, int(fraction * numel))
    raw = round(numel * fraction) if rule == "round" else math.ceil(numel * fraction)
    return min(numel, max(1, raw))


def magnitude_threshold(x: Tensor, n_keep: int) -> float:
    """The ``n_keep``-th largest ``|x|`` (so ``|x| >= thr`` keeps the top ``n_keep`` plus ties).

    Args:
        x: any shape; ``1 <= n_keep <= x.numel()``.

    Returns:
        The threshold as a Python float (exact for float16/bfloat16/float32 inputs).
    """
    mags = x.detach().reshape(-1).abs().float()  # (numel,)
    # kthvalue is a selection (O(numel)), cheaper than a large topk; k-th smallest, 1-based.
    return float(torch.kthvalue(mags, mags.numel() - n_keep + 1).values)


def magnitude_mask(x: Tensor, density: float, *, rule: KeepRule = "floor") -> Tensor:
    """Keep the top ``keep_count(numel, density, rule)`` entries of ``x`` by magnitude.

    Entries tied with the threshold are kept as well, so the mask may hold a few more than
    the count when ``|x|`` has repeated values (mergekit breaks such ties arbitrarily).

    Args:
        x: any shape.
        density: fraction of entries to keep, in [0, 1].

    Returns:
        Bool tensor, same shape and device as ``x``.
    """
    n_keep = keep_count(x.numel(), density, rule)
    if n_keep >= x.numel():
        return torch.ones_like(x, dtype=torch.bool)
    if n_keep == 0:
        return torch.zeros_like(x, dtype=torch.bool)
    return x.abs() >= magnitude_threshold(x, n_keep)


def evo_sparsify(x: Tensor, k: float, *, rule: KeepRule = "round") -> Tensor:
    """Evo-Merging sparsifier S_k: keep the top ``max(1, round(k*numel))`` entries by magnitude.

    S_k(T) = T * 1[|T| >= thr], thr = min(topk(|T|, n_keep)); ``k == 0`` gives zeros,
    ``k == 1`` gives ``T`` itself, ties at the threshold are kept, and there is NO rescaling.

    Args:
        x: any shape, any float dtype.
        k: keep fraction, clipped to [0, 1].
        rule: see :func:`keep_count`; the default matches the authors' code.

    Returns:
        Tensor like ``x`` (same dtype/device); ``x`` itself when nothing is dropped.
    """
    # Black-box Model Merging for LMaaS (2509.12951), Sec. 3 / core/merger.py sparsify_tensor_by_magnitude
    if x.numel() == 0 or k >= 1.0:
        return x
    if k <= 0.0:
        return torch.zeros_like(x)
    n_keep = keep_count(x.numel(), k, rule)
    thr = magnitude_threshold(x, n_keep)
    return torch.where(x.abs() >= thr, x, torch.zeros((), dtype=x.dtype, device=x.device))


_MASK_CHUNK = 1 << 16  # entries per chunk of the fused DARE drop: bits + mask + values stay in L2


def _bit_stream(generator: torch.Generator | None) -> np.random.SFC64:
    """A numpy SFC64 bit stream seeded by one 63-bit draw from ``generator`` (None: torch's global RNG).

    torch's CPU generator (mt19937) makes ~0.15 G floats/s; SFC64's raw output is several times
    faster. Each call consumes one draw, so successive masks from one generator differ.
    """
    seed = torch.randint(0, 2**63 - 1, (1,), generator=generator, dtype=torch.int64)
    return np.random.SFC64(int(seed))


def _keep_threshold(density: float) -> int:
    """T such that P(u < T) = round(density * 2^32) / 2^32 for u uniform over int32.

    The keep probability is quantised to 2^-32 steps (error <= 1.2e-10; torch.rand's float32
    draws were quantised to 2^-24).
    """
    return round(density * 2**32) - 2**31


def _keep_bits(stream: np.random.SFC64, n: int, threshold: int) -> np.ndarray:
    """n Bernoulli keep flags: the stream's 32-bit words, as int32, compared to ``threshold``."""
    return np.less(stream.random_raw((n + 1) // 2).view(np.int32)[:n], threshold)


def _on_cpu(generator: torch.Generator | None, x: Tensor) -> bool:
    return (generator.device if generator is not None else x.device).type == "cpu"


def random_mask(x: Tensor, density: float, *, generator: torch.Generator | None) -> Tensor:
    """DARE's Bernoulli keep-mask: each entry is kept independently with probability ``density``.

    With a CPU generator (or ``None`` and a CPU ``x``) one 63-bit seed is drawn from it and
    the mask is ``u < T`` over 32-bit words u of a numpy SFC64 stream (see
    :func:`_keep_threshold`: probability exact to 2^-32), made on the CPU and moved to
    ``x.device``, so it does not depend on the device or dtype of ``x``. Other generators
    draw float32 uniforms on their device (``torch.rand < density``).

    Args:
        x: any shape (only its shape and device are used).
        density: keep probability in [0, 1] (= 1 - DARE drop rate p).
        generator: source of randomness; ``None`` uses torch's global RNG (not reproducible).

    Returns:
        Bool tensor of ``x``'s shape on ``x.device``.
    """
    if density >= 1.0:
        return torch.ones_like(x, dtype=torch.bool)
    if density <= 0.0:
        return torch.zeros_like(x, dtype=torch.bool)
    if not _on_cpu(generator, x):
        device = generator.device if generator is not None else x.device
        u = torch.rand(x.shape, generator=generator, device=device, dtype=torch.float32)
        return (u < density).to(x.device)
    keep = _keep_bits(_bit_stream(generator), x.numel(), _keep_threshold(density))
    return torch.from_numpy(keep).reshape(x.shape).to(x.device)


def dare_drop_(x: Tensor, density: float, *, rescale: bool, generator: torch.Generator | None) -> Tensor:
    """DARE drop and rescale in place: x <- x * m [/ density], m = :func:`random_mask` (same draws).

    Float32/float64 CPU tensors are processed in cache-sized chunks (bits, mask and values
    stay in L2; no full-size mask is allocated); other tensors multiply by the full mask.
    Dropped entries become ``x * 0`` (so -0.0 for negative entries), as in mergekit's
    ``tensor * mask``. ``density`` >= 1 or <= 0 consumes no randomness and does not rescale.

    Args:
        x: any shape; modified in place.
        density: keep probability in [0, 1].
        rescale: divide the kept entries by ``density`` (DARE's rescale).
        generator: as for :func:`random_mask`.

    Returns:
        ``x``.
    """
    # Yu et al. 2024 (DARE, arXiv 2311.03099), Sec. 3: drop w.p. 1 - density, rescale by 1/density
    if density >= 1.0:
        return x
    if density <= 0.0:
        return x.zero_()
    fast = x.is_contiguous() and x.dtype in (torch.float32, torch.float64) and x.device.type == "cpu"
    if not (fast and _on_cpu(generator, x)):
        x.mul_(random_mask(x, density, generator=generator))
        return x.div_(density) if rescale else x
    stream, threshold = _bit_stream(generator), _keep_threshold(density)
    flat = x.detach().view(-1).numpy()  # shares memory with x
    for lo in range(0, flat.size, _MASK_CHUNK):  # _MASK_CHUNK is even: word boundaries line up
        s = flat[lo : lo + _MASK_CHUNK]
        np.multiply(s, _keep_bits(stream, s.size, threshold), out=s)
        if rescale:
            np.divide(s, density, out=s)
    return x


def breadcrumbs_mask(x: Tensor, density: float, gamma: float) -> Tensor:
    """Model Breadcrumbs mask: drop the top ``gamma`` outliers and everything below ``density``.

    With entries ranked by ``|x|`` descending, keep ranks ``[n_top, n_top + n_keep)`` where
    ``n_keep = floor(density*numel)`` and ``n_top = floor(gamma*numel)`` (reduced so that
    ``n_top + n_keep <= numel``), mergekit's ``magnitude_outliers`` counts. Ties at both
    boundaries are kept (mergekit keeps exactly ``n_keep``, breaking ties arbitrarily).
    ``n_top == 0`` keeps the top entries, as mergekit 0.1.5 does; older mergekit releases
    sliced ``indices[n_bot:-n_top]``, which is empty there and zeroed the whole tensor.

    Args:
        x: any shape.
        density: fraction kept, in [0, 1]; ``>= 1`` keeps everything (as mergekit).
        gamma: fraction of largest-magnitude entries dropped, in [0, 1].

    Returns:
        Bool tensor, same shape and device as ``x``.
    """
    # Davari & Belilovsky 2023 (arXiv 2312.06795), Sec. 3: mask both tails of |tau|
    numel = x.numel()
    n_keep = keep_count(numel, density, "floor")
    if n_keep >= numel:
        return torch.ones_like(x, dtype=torch.bool)
    if n_keep == 0:
        return torch.zeros_like(x, dtype=torch.bool)
    n_top = min(int(gamma * numel), numel - n_keep)
    mags = x.abs().float()
    flat = mags.reshape(-1)
    lo = float(torch.kthvalue(flat, numel - (n_top + n_keep) + 1).values)  # (n_top+n_keep)-th largest
    hi = float(torch.kthvalue(flat, numel - n_top).values)  # (n_top+1)-th largest
    return (mags >= lo) & (mags <= hi)


def task_vectors(base: Tensor, tensors: Sequence[Tensor]) -> Tensor:
    """Stack per-expert deltas tau_i = theta_i - theta_base.

    Args:
        base: shape S.
        tensors: N tensors of shape S.

    Returns:
        Tensor of shape (N, *S), float32, on ``base.device``.
    """
    base32 = base.float()
    out = torch.empty((len(tensors), *base.shape), dtype=torch.float32, device=base.device)
    for i, t in enumerate(tensors):  # written in place: no per-expert temporaries, no stack copy
        torch.sub(t.to(device=base.device, dtype=torch.float32), base32, out=out[i])
    return out


def weighted_sum(deltas: Tensor, weights: Tensor) -> Tensor:
    """sum_i w_i * delta_i.

    Args:
        deltas: (N, *S).
        weights: (N,), broadcast over the delta dims.

    Returns:
        Tensor of shape S, in the promoted dtype of the inputs.
    """
    # A GEMV over the expert axis: no (N, *S) temporary.
    flat = deltas.reshape(deltas.shape[0], -1)
    return (weights.to(flat.dtype) @ flat).reshape(deltas.shape[1:])


def sign_consensus_mask(deltas: Tensor, method: Literal["sum", "count"] = "sum") -> Tensor:
    """TIES "elect sign": which entries agree with the elected sign.

    gamma^p = sgn(sum_i delta_i^p) for ``"sum"`` (mass; the TIES paper), or the sign of the
    count of positive minus negative entries for ``"count"``; a zero vote elects ``+``
    (mergekit ``get_mask``, peft ``calculate_majority_sign_mask``).

    Args:
        deltas: (N, *S) (pass the *weighted* deltas to elect by weighted mass, as mergekit).

    Returns:
        Bool tensor (N, *S); zero entries never agree.
    """
    # Yadav et al. 2023 (TIES-Merging, arXiv 2306.01708), Sec. 3 step 2 "Elect"
    sign = deltas.sign()
    vote = deltas.sum(dim=0) if method == "sum" else sign.sum(dim=0)  # (*S,)
    elected = torch.where(vote >= 0, 1.0, -1.0).to(sign.dtype)
    return sign == elected


def disjoint_merge(deltas: Tensor, weights: Tensor, mask: Tensor, *, normalize: bool) -> Tensor:
    """TIES "disjoint mean" in mergekit's weighted form.

    mixed = sum_i w_i m_i delta_i, divided by sum_i w_i m_i when ``normalize`` (entries where
    that divisor is 0 are divided by 1). With unit weights this is Yadav et al.'s
    (1/|A^p|) sum_{i in A^p} delta_i^p.

    Args:
        deltas: (N, *S) unweighted.
        weights: (N,).
        mask: bool (N, *S), typically from :func:`sign_consensus_mask`.

    Returns:
        Tensor of shape S.
    """
    # Yadav et al. 2023, Sec. 3 step 3 "Disjoint Merge"
    w = weights.reshape(weights.shape + (1,) * (deltas.dim() - 1)).to(deltas.dtype)  # (N, 1, ..)
    m = mask.to(deltas.dtype)
    mixed = (deltas * w * m).sum(dim=0)
    if not normalize:
        return mixed
    divisor = (w * m).sum(dim=0)
    divisor[divisor == 0] = 1.0
    return mixed / divisor


def lerp(a: Tensor, b: Tensor, t: float) -> Tensor:
    """(1 - t) * a + t * b, in the promoted dtype of ``a`` and ``b``."""
    return (1.0 - t) * a + t * b


def slerp(a: Tensor, b: Tensor, t: float, *, eps: float = 1e-8, dot_threshold: float = 0.9995) -> Tensor:
    """Spherical interpolation of two whole tensors, treated as flat vectors (torch only).

    theta = arccos(<a/|a|, b/|b|>), result = sin((1-t) theta)/sin(theta) a + sin(t theta)/sin(theta) b.
    Falls back to :func:`lerp` when ``|cos theta| > dot_threshold`` (near-colinear), like
    mergekit's classic ``slerp``, which also treats the whole tensor as one vector (mergekit
    0.1.5 interpolates each output row separately instead). As in mergekit, a vector with
    norm <= ``eps`` is left unnormalised, so a zero tensor gives cos theta = 0 (theta = pi/2),
    not a lerp. Computed in float32.

    Args:
        a, b: same shape S; t in [0, 1] (0 gives ``a``, 1 gives ``b``).

    Returns:
        Tensor of shape S, float32.
    """
    # Shoemake 1985, "Animating rotation with quaternion curves" (slerp formula)
    a32, b32 = a.float(), b.float()
    na, nb = float(torch.linalg.vector_norm(a32)), float(torch.linalg.vector_norm(b32))
    dot = float((a32 * b32).sum())
    dot /= (na if na > eps else 1.0) * (nb if nb > eps else 1.0)
    if abs(dot) > dot_threshold:
        return lerp(a32, b32, t)
    theta = math.acos(max(-1.0, min(1.0, dot)))
    sin_theta = math.sin(theta)
    s0 = math.sin((1.0 - t) * theta) / sin_theta
    s1 = math.sin(t * theta) / sin_theta
    return s0 * a32 + s1 * b32
