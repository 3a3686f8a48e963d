"""Data layout and small kernels behind :class:`merging.evo.EvoPlan`.

A :class:`Block` lays the tensors ("segments") of N experts side by side: ``values`` (N, P)
float32, an optional ``base`` (P,), per-expert magnitudes sorted ascending per segment
(``sorted_mags``, same layout) so that the S_k threshold is a lookup, and precomputed chunk
views so that a candidate does no per-call slicing of the stacks. A "packed" block of small
tensors is ordered by size and carries a :class:`merging.evo_sorted.SortedLayout` instead.
:func:`gemv_runs` packs runs of small segments for the plain GEMV paths (one long stream
instead of many short ones).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from merging.errors import IncompatibleExpertsError
from merging.evo_sorted import SortedLayout, build_sorted

__all__ = [
    "Block",
    "Segment",
    "accumulate",
    "destination",
    "finish",
    "gemv",
    "hardshrink",
    "make_block",
    "shrink_lambdas",
    "shrink_rows",
    "sorted_abs",
    "write_back",
]

_PACK = 1 << 16  # segments smaller than this share GEMV runs (see Block.runs)


@dataclass(frozen=True, slots=True)
class Segment:
    """One tensor of the block: its name, shape and place on the P axis."""

    name: str
    shape: torch.Size
    off: int  # offset in the block's P axis
    numel: int


@dataclass
class Block:
    """Segments laid out side by side: values (N, P), optional base (P,), output buffer (P,)."""

    segments: list[Segment]
    values: Tensor  # (N, P) float32
    base: Tensor | None  # (P,) float32
    out: Tensor  # (P,) float32, used for targets that are not float32-contiguous
    sorted_mags: Tensor | None  # (N, P) ascending |values| per segment; None: never sparsified
    masked: Tensor | None = None  # (N, P) cached S_alpha(values)
    cached_alpha: tuple[float, ...] | None = None
    # per segment: [(lo, hi, per-expert value views, base view)], built once by EvoPlan
    chunks: list[list[tuple[int, int, list[Tensor], Tensor | None]]] = field(default_factory=list)
    masked_chunks: list[list[list[Tensor]]] = field(default_factory=list)
    numels: Tensor | None = None  # (T,) float64 segment sizes
    offsets: Tensor | None = None  # (T,) int64 segment offsets
    packed: SortedLayout | None = None  # small tensors sorted by size (EvoPlan._packed_block)
    group_out: list[Tensor] = field(default_factory=list)  # packed: out view per size group
    short: list[tuple[Segment, Tensor]] = field(default_factory=list)  # in packed GEMV runs, + out view
    views: list[tuple[Segment, Tensor]] = field(default_factory=list)  # every segment + its out view
    runs: list[tuple[int, int, int | None]] = field(default_factory=list)  # GEMV runs (lo, hi, segment)

    def build_views(self, chunk: int) -> None:
        """Precompute views once, so a candidate does no per-call slicing of the stacks."""
        n = self.values.shape[0]
        self.chunks = []
        self.runs = gemv_runs(self.segments)
        self.views = [(s, self.out[s.off : s.off + s.numel].view(s.shape)) for s in self.segments]
        self.short = [(s, v) for s, v in self.views if s.numel < _PACK]
        self.numels = torch.tensor([s.numel for s in self.segments], dtype=torch.float64)
        self.offsets = torch.tensor([s.off for s in self.segments], dtype=torch.int64)
        if self.packed is not None:
            self.group_out = [self.out[off : off + k * m] for k, m, off in self.packed.groups]
            return
        for seg in self.segments:
            spans = [(lo, min(seg.numel, lo + chunk)) for lo in range(0, seg.numel, chunk)]
            self.chunks.append(
                [
                    (
                        lo,
                        hi,
                        [self.values[i, seg.off + lo : seg.off + hi] for i in range(n)],
                        None if self.base is None else self.base[seg.off + lo : seg.off + hi],
                    )
                    for lo, hi in spans
                ]
            )

    def ensure_masked(self) -> list[list[list[Tensor]]]:
        """Allocate the cached masked stack (and its chunk views) on first use."""
        if self.masked is None:
            self.masked = torch.empty_like(self.values)
            n = self.values.shape[0]
            self.masked_chunks = [
                [[self.masked[i, seg.off + lo : seg.off + hi] for i in range(n)] for lo, hi, _, _ in chunks]
                for seg, chunks in zip(self.segments, self.chunks, strict=False)  # no chunks if packed
            ]
        return self.masked_chunks


def gemv_runs(segments: Sequence[Segment]) -> list[tuple[int, int, int | None]]:
    """GEMV runs over the P axis: (lo, hi, j) for a segment j of >= _PACK entries (written
    straight into its target), (lo, hi, None) for a run of consecutive smaller ones (one GEMV
    into the plan's buffer, then copied: a long stream instead of many short ones)."""
    runs: list[tuple[int, int, int | None]] = []
    for j, seg in enumerate(segments):
        if seg.numel >= _PACK:
            runs.append((seg.off, seg.off + seg.numel, j))
        elif runs and runs[-1][2] is None and runs[-1][1] == seg.off:
            runs[-1] = (runs[-1][0], seg.off + seg.numel, None)
        else:
            runs.append((seg.off, seg.off + seg.numel, None))
    return runs


def hardshrink(src: Tensor, lam: float | None, out: Tensor) -> Tensor:
    """S via hardshrink: keep |x| > lam (lam just below the threshold) into ``out``.

    ``lam is None`` means everything is kept: ``src`` itself is returned, nothing is written.
    """
    if lam is None:
        return src
    result: Tensor = torch.hardshrink(src, lam, out=out)
    return result


def shrink_rows(
    rows: Sequence[Tensor], srcs: Sequence[Tensor], lams: Sequence[float | None], alpha: Sequence[float]
) -> None:
    """rows[i] = S_{alpha_i}(srcs[i]) (zeros for alpha <= 0, a copy when everything is kept)."""
    for w, src, lam, a in zip(rows, srcs, lams, alpha, strict=True):
        if a <= 0.0:
            w.zero_()
        elif lam is None:
            w.copy_(src)
        else:
            hardshrink(src, lam, w)


def accumulate(o: Tensor, base: Tensor | None, terms: Iterable[Tensor], coefs: Sequence[float]) -> None:
    """o = base (or 0) + sum_k coefs_k terms_k, added one by one in order (the reference's order).

    ``terms`` may be a generator whose items share one scratch buffer: each is added before
    the next is produced.
    """
    first = True
    for t, c in zip(terms, coefs, strict=True):
        if not first:
            o.add_(t, alpha=c)
        elif base is None:  # 0 + c t, without a separate zeroing pass
            torch.mul(t, c, out=o)
        else:  # base + c t, without a separate copy pass
            torch.add(base, t, alpha=c, out=o)
        first = False
    if first and base is None:
        o.zero_()
    elif first and base is not None:
        o.copy_(base)


def gemv(mat: Tensor, vec: Tensor, base: Tensor | None, out: Tensor) -> None:
    """out = base + mat^T vec  (mat (K, C), vec (K,), base/out (C,))."""
    if base is None:
        torch.mv(mat.t(), vec, out=out)
    else:
        torch.addmv(base, mat.t(), vec, out=out)


def destination(block: Block, seg: Segment, targets: Mapping[str, Tensor]) -> tuple[Tensor, bool]:
    """Where to accumulate a segment: the target itself when it is float32-contiguous here."""
    t = targets.get(seg.name)
    if t is not None and t.shape != seg.shape:
        raise IncompatibleExpertsError(
            f"target {seg.name!r} has shape {list(t.shape)}, expected {list(seg.shape)}"
        )
    if t is not None and t.dtype == torch.float32 and t.is_contiguous() and t.device == block.out.device:
        return t.detach().view(-1), True
    return block.out[seg.off : seg.off + seg.numel], False


def finish(seg: Segment, dest: Tensor, direct: bool, targets: Mapping[str, Tensor]) -> None:
    """Copy a segment computed in the plan's buffer into its target (cast to its dtype)."""
    t = targets.get(seg.name)
    if t is not None and not direct:
        t.copy_(dest.view(seg.shape))


def write_back(segments: Iterable[tuple[Segment, Tensor]], targets: Mapping[str, Tensor]) -> None:
    """Copy (segment, view of the plan's buffer) pairs into their targets, unless a target is
    that very view (targets from ``EvoPlan.allocate_targets``)."""
    for seg, src in segments:
        t = targets.get(seg.name)
        if t is None:
            continue
        if t.shape != seg.shape:
            raise IncompatibleExpertsError(
                f"target {seg.name!r} has shape {list(t.shape)}, expected {list(seg.shape)}"
            )
        if not (t.data_ptr() == src.data_ptr() and t.dtype == src.dtype and t.stride() == src.stride()):
            t.copy_(src)


def shrink_lambdas(block: Block, alpha: tuple[float, ...]) -> list[list[float | None]]:
    """Per expert and segment: hardshrink lambda just below S_alpha's threshold (None: keep all).

    n_keep = min(numel, max(1, round(numel * alpha))) as :func:`merging.ops.keep_count`
    (float64 product, round half to even), thr = sorted_mags[off + numel - n_keep].
    """
    assert block.sorted_mags is not None and block.numels is not None and block.offsets is not None
    n_exp, width = block.sorted_mags.shape
    a = torch.tensor(alpha, dtype=torch.float64)[:, None]  # (N, 1)
    n_keep = torch.minimum(torch.round(block.numels[None, :] * a).clamp_(min=1.0), block.numels[None, :])
    idx = block.offsets[None, :] + block.numels.long()[None, :] - n_keep.long()  # (N, T)
    idx += torch.arange(n_exp, dtype=torch.int64)[:, None] * width
    thr = block.sorted_mags.reshape(-1)[idx.to(block.sorted_mags.device)].cpu().numpy()  # (N, T)
    # |x| > nextafter(thr, 0) <=> |x| >= thr for float32 x; thr == 0 keeps everything
    lam = np.nextafter(thr, np.float32(0)).tolist()
    pos = (thr > 0).tolist()
    return [
        [None] * len(block.segments)
        if a_i <= 0.0 or a_i >= 1.0
        else [lam_ij if ok else None for lam_ij, ok in zip(lam[i], pos[i], strict=True)]
        for i, a_i in enumerate(alpha)
    ]


def make_block(
    entries: Mapping[str, list[Tensor]],
    bases: Mapping[str, Tensor],
    *,
    sparse: bool,
    device: torch.device,
    packed: bool = False,
) -> Block:
    """Stack entries (name -> N float32 tensors) side by side; sort magnitudes when ``sparse``.

    ``packed``: a block of small sparse tensors, ordered by size (stable), with a
    :class:`merging.evo_sorted.SortedLayout` instead of per-segment sorted magnitudes.
    """
    n = len(next(iter(entries.values()))) if entries else 0
    items = sorted(entries.items(), key=lambda kv: kv[1][0].numel()) if packed else list(entries.items())
    segments, off = [], 0
    for name, ts in items:
        segments.append(Segment(name, ts[0].shape, off, ts[0].numel()))
        off += ts[0].numel()
    values = torch.empty((n, off), dtype=torch.float32, device=device)  # (N, P)
    mags = torch.empty((n, off), dtype=torch.float32, device=device) if sparse and not packed else None
    base = torch.empty(off, dtype=torch.float32, device=device) if bases else None
    for seg in segments:
        sl = slice(seg.off, seg.off + seg.numel)
        for i, t in enumerate(entries[seg.name]):
            values[i, sl] = t.reshape(-1)
            if mags is not None:
                mags[i, sl] = sorted_abs(t)
        if base is not None:
            base[sl] = bases[seg.name].reshape(-1)
    out = torch.empty(off, dtype=torch.float32, device=device)
    layout = build_sorted(values, _size_groups(segments)) if packed else None
    return Block(segments, values, base, out, mags, packed=layout)


def _size_groups(segments: Sequence[Segment]) -> list[tuple[int, int, int]]:
    """(K, M, off) for each run of consecutive non-empty segments of the same size K."""
    groups: list[tuple[int, int, int]] = []
    for seg in segments:
        if not seg.numel:
            continue
        if groups and groups[-1][0] == seg.numel and groups[-1][2] + groups[-1][0] * groups[-1][1] == seg.off:
            k, m, off = groups[-1]
            groups[-1] = (k, m + 1, off)
        else:
            groups.append((seg.numel, 1, seg.off))
    return groups


def sorted_abs(t: Tensor) -> Tensor:
    """|t| flattened, ascending (numpy's sort is several times faster than torch's on CPU)."""
    flat = t.detach().reshape(-1).abs()
    if flat.device.type == "cpu":
        return torch.from_numpy(np.sort(flat.numpy()))
    return torch.sort(flat).values
