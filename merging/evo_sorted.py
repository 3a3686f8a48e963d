"""Sorted layout for S_k on many small tensors: a GEMV plus one scatter per expert and size.

For a block of small tensors (LoRA factors, biases, norms) laid out side by side and grouped by
size K (M tensors of each size, contiguous), every expert's entries are also stored sorted by
magnitude, position-major: row p of a group holds the p-th smallest entry of each of its M
tensors (``svals``) and where it sits in the group (``sidx``). S_k keeps |x| >= s[c], s = |x|
ascending and c = K - n_keep, where n_keep depends only on K and k: so for one expert the
dropped entries of ALL M tensors of a group are the first c rows, one contiguous slice, and the
kept ones the rest. A candidate is then (drop form) one GEMV of every expert with k >= 1/2,
minus, per such expert and group, one ``index_add_`` of its dropped slice, and (keep form) for
experts with k < 1/2 one ``index_add_`` of the kept slice; each expert touches at most half of
its entries besides the GEMV. Entries tied with s[c] are kept (S_k keeps ties): where a run
of equal |x| straddles row c of a tensor (a repeated magnitude at the cut; more frequent with
low-precision weights) those entries are added back per tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from merging.ops import keep_count

__all__ = ["SortedLayout", "build_sorted", "fill_masked", "scatter_expert"]


@dataclass
class SortedLayout:
    """Per expert, sorted copies of a block's values, group by group (see the module docstring)."""

    groups: list[tuple[int, int, int]]  # (K, M, off): M tensors of K entries at columns [off, off + K*M)
    svals: Tensor  # (N, P) float32: per group, (K, M) position-major sorted values
    sidx: Tensor  # (N, P) int32: per group, (K, M) positions in the group's columns
    tied: np.ndarray  # (N, sum K) bool: row p of a group repeats a magnitude of row p - 1
    tie_offsets: list[int]  # start of each group in ``tied``'s second axis


def build_sorted(values: Tensor, groups: list[tuple[int, int, int]]) -> SortedLayout:
    """Sort every (expert, tensor) of ``values`` by magnitude, ascending (the order among equal
    magnitudes does not matter: ties at the cut are resolved by value in :func:`_ties_at_cut`).

    Args:
        values: (N, P) float32, tensors of each group side by side in [off, off + K*M).
        groups: (K, M, off) per group.

    Returns:
        The layout, its tensors on ``values.device``.
    """
    n, width = values.shape
    svals = np.empty((n, width), dtype=np.float32)
    sidx = np.empty((n, width), dtype=np.int32)
    tie_offsets = [sum(k for k, _, _ in groups[:g]) for g in range(len(groups))]
    tied = np.zeros((n, sum(k for k, _, _ in groups)), dtype=bool)
    v_all = values.detach().cpu().numpy()
    for (k, m, off), q in zip(groups, tie_offsets, strict=True):
        v = v_all[:, off : off + k * m].reshape(n, m, k)  # (N, M, K)
        order = np.argsort(np.abs(v), axis=2)  # (N, M, K)
        s = np.take_along_axis(v, order, axis=2)
        svals[:, off : off + k * m] = s.transpose(0, 2, 1).reshape(n, -1)  # (N, K, M) position-major
        pos = order + (np.arange(m, dtype=np.int64) * k)[None, :, None]
        sidx[:, off : off + k * m] = pos.transpose(0, 2, 1).reshape(n, -1)
        mags = np.abs(s)
        tied[:, q + 1 : q + k] = (mags[:, :, 1:] == mags[:, :, :-1]).any(axis=1)
    dev = values.device
    vals_t, idx_t = torch.from_numpy(svals).to(dev), torch.from_numpy(sidx).to(dev)
    return SortedLayout(groups, vals_t, idx_t, tied, tie_offsets)


def _cut(k: int, alpha: float) -> int:
    """Rows of a group that S_alpha drops (before ties): K - n_keep."""
    # Black-box Model Merging for LMaaS (2509.12951), Sec. 3: S_k keeps the top max(1, round(k*numel))
    return k - keep_count(k, alpha, "round")


def _ties_at_cut(layout: SortedLayout, i: int, g: int, c: int) -> tuple[Tensor, Tensor] | None:
    """(positions, values) of expert i's entries in rows [c_m, c) of group g that tie with row c
    of their tensor m (so S keeps them although they sit before the cut), or None."""
    if not 0 < c or not layout.tied[i, layout.tie_offsets[g] + c]:
        return None
    k, m, off = layout.groups[g]
    sv = layout.svals[i, off : off + k * m].view(k, m).cpu().numpy()  # (K, M)
    si = layout.sidx[i, off : off + k * m].view(k, m).cpu().numpy()
    mag = np.abs(sv[c])
    idx, val = [], []
    for t in np.nonzero(np.abs(sv[c - 1]) == mag)[0]:
        start = int(np.searchsorted(np.abs(sv[:c, t]), mag[t], side="left"))
        idx.append(si[start:c, t])
        val.append(sv[start:c, t])
    dev = layout.svals.device
    return torch.from_numpy(np.concatenate(idx)).to(dev), torch.from_numpy(np.concatenate(val)).to(dev)


def scatter_expert(out: Sequence[Tensor], layout: SortedLayout, i: int, alpha: float, beta: float) -> None:
    """Add expert i's sparse part to the group outputs ``out`` (one (K*M,) view per group).

    alpha >= 1/2 ("drop" form, the caller's GEMV already added beta_i V_i): subtract the dropped
    rows; alpha < 1/2 ("keep" form, not in the GEMV): add the kept rows. Either way ties at the
    cut end up kept.
    """
    drop = alpha >= 0.5
    for g, ((k, m, off), o) in enumerate(zip(layout.groups, out, strict=True)):
        c = _cut(k, alpha)
        lo, hi = (off, off + c * m) if drop else (off + c * m, off + k * m)
        if hi > lo:
            o.index_add_(0, layout.sidx[i, lo:hi], layout.svals[i, lo:hi], alpha=-beta if drop else beta)
        fix = _ties_at_cut(layout, i, g, c)
        if fix is not None:
            o.index_add_(0, fix[0], fix[1], alpha=beta)


def fill_masked(masked: Tensor, values: Tensor, layout: SortedLayout, alpha: Sequence[float]) -> None:
    """masked[i] = S_{alpha_i}(values[i]) tensor by tensor (zeros for alpha_i <= 0)."""
    masked.copy_(values)
    for i, a in enumerate(alpha):
        if a <= 0.0:
            masked[i].zero_()
            continue
        for g, (k, m, off) in enumerate(layout.groups):
            c = _cut(k, a)
            row = masked[i, off : off + k * m]
            if c:
                row[layout.sidx[i, off : off + c * m].long()] = 0.0
            fix = _ties_at_cut(layout, i, g, c)
            if fix is not None:
                row[fix[0].long()] = fix[1]
