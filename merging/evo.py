"""Fast in-memory Evo-Merging candidates, for search loops that merge the same experts
thousands of times with different (alpha, beta).

:class:`EvoPlan` computes once what does not depend on the coefficients:

* the per-expert inputs (task vectors theta_i - base, or LoRA factors), float32, stacked
  contiguously: ``values`` of shape (N, P), every tensor a segment of P;
* per expert and tensor, its magnitudes sorted ascending (``sorted_mags``, same layout).
  S_k keeps |x| >= thr with thr the n_keep-th largest magnitude, so the threshold for any
  keep fraction is ``sorted_mags[i, off + numel - n_keep]``: a lookup, not a topk.

A candidate is then, per tensor segment and cache-sized chunk: start from the base (or
zero), and for each expert ``hardshrink`` the chunk at just below thr (|x| > lambd <=> |x| >=
thr for float32) into a scratch buffer and add it with weight beta_i. That is the reference's
arithmetic in the reference's order (:func:`merging.methods.merge_tensor` ``evo`` and
:func:`merging.lora.evo_lora`), so results match it exactly; main-memory traffic is one
read of the N stacks plus the output write. Results go straight into the caller's float32
contiguous tensors (e.g. a resident model's parameters), or through an internal buffer and
``copy_`` for other dtypes.

When the same alpha comes twice in a row (stage 2 of Evo-Merging fixes alpha), the second
call also stores the sparsified stack W = S_alpha(values), and from then on a candidate is
one ``addmv`` (base + W^T beta) per tensor, i.e. a single pass over the stacks (GEMV sums in
a different order: ~1e-7 relative to the reference). LoRA B factors (never sparsified unless
``sparsify_b``) always take that path. Buffers are allocated once; nothing touches disk.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from merging import ops
from merging.errors import IncompatibleExpertsError, InvalidRecipeError
from merging.lora import lora_modules

__all__ = ["EvoPlan"]

_CHUNK = 1 << 16  # floats per chunk: accumulator + scratch stay in L2


@dataclass(frozen=True, slots=True)
class _Segment:
    name: str
    shape: torch.Size
    off: int  # offset in the block's P axis
    numel: int


@dataclass
class _Block:
    """Segments laid out side by side: values (N, P), optional base (P,), output buffer (P,)."""

    segments: list[_Segment]
    values: Tensor  # (N, P) float32
    base: Tensor | None  # (P,) float32
    out: Tensor  # (P,) float32, used for targets that are not float32-contiguous
    sorted_mags: Tensor | None  # (N, P) ascending |values| per segment; None: never sparsified
    masked: Tensor | None = None  # (N, P) cached S_alpha(values)
    cached_alpha: tuple[float, ...] | None = None


class EvoPlan:
    """Precomputed Evo merge of N fixed experts; :meth:`apply` materialises one candidate.

    Build it with :meth:`full` (theta = base + sum_i beta_i S_{alpha_i}(theta_i - base)) or
    :meth:`lora` (A = sum_i beta_i S_{alpha_i}(A_i), B = sum_i beta_i B_i).
    """

    def __init__(self, blocks: list[_Block], passthrough: Mapping[str, Tensor], n_experts: int,
                 *, cache_masked: bool = True) -> None:
        self.blocks = blocks
        self.passthrough = dict(passthrough)
        self.n_experts = n_experts
        self.cache_masked = cache_masked
        self.device = blocks[0].values.device if blocks else torch.device("cpu")
        self._scratch = torch.empty(_CHUNK, dtype=torch.float32, device=self.device)
        self._last_alpha: tuple[float, ...] | None = None

    @classmethod
    def full(cls, base: Mapping[str, Tensor], experts: Sequence[Mapping[str, Tensor]], *,
             cache_masked: bool = True, device: torch.device | str | None = None) -> EvoPlan:
        """Plan for full experts sharing ``base``'s names and shapes (non-float tensors pass through).

        Args:
            base: name -> tensor of the base model (e.g. a state dict).
            experts: N such mappings with the same names and shapes.
            cache_masked: allow storing S_alpha(values) when alpha repeats (one more (N, P) stack).
            device: where the stacks live and candidates are computed (default: CPU).
        """
        dev = torch.device(device or "cpu")
        entries: dict[str, list[Tensor]] = {}
        bases: dict[str, Tensor] = {}
        passthrough: dict[str, Tensor] = {}
        for name, b in base.items():
            for i, e in enumerate(experts):
                if name not in e or e[name].shape != b.shape:
                    got = "missing" if name not in e else f"shape {list(e[name].shape)}"
                    raise IncompatibleExpertsError(f"expert {i}: tensor {name!r} is {got}, base has {list(b.shape)}")
            if not b.is_floating_point():
                passthrough[name] = b
                continue
            b32 = bases[name] = b.detach().to(dev, torch.float32)
            entries[name] = [e[name].detach().to(dev, torch.float32) - b32 for e in experts]
        block = _make_block(entries, bases, sparse=True, device=dev)
        return cls([block], passthrough, len(experts), cache_masked=cache_masked)

    @classmethod
    def lora(cls, adapters: Sequence[Mapping[str, Tensor]], *, sparsify_b: bool = False,
             cache_masked: bool = True, device: torch.device | str | None = None) -> EvoPlan:
        """Plan for N PEFT adapters; output names are the first adapter's factor keys.

        Modules absent from the first adapter are dropped; an adapter lacking a module
        contributes nothing to it (as in the authors' code).
        """
        dev = torch.device(device or "cpu")
        mods = [lora_modules(a.keys()) for a in adapters]
        a_entries: dict[str, list[Tensor]] = {}
        b_entries: dict[str, list[Tensor]] = {}
        for mid, (a0, b0) in mods[0].items():
            for key, pos, dest in ((a0, 0, a_entries), (b0, 1, b_entries)):
                ref = adapters[0][key]
                ts = []
                for i, mm in enumerate(mods):
                    t = adapters[i][mm[mid][pos]] if mid in mm else torch.zeros_like(ref)
                    if t.shape != ref.shape:
                        raise IncompatibleExpertsError(
                            f"adapter {i}: LoRA factor {key!r} has shape {list(t.shape)}, "
                            f"the first adapter's is {list(ref.shape)}"
                        )
                    ts.append(t.detach().to(dev, torch.float32))
                dest[key] = ts
        if sparsify_b:
            a_entries.update(b_entries)
            b_entries = {}
        blocks = [_make_block(a_entries, {}, sparse=True, device=dev)]
        if b_entries:
            blocks.append(_make_block(b_entries, {}, sparse=False, device=dev))
        return cls(blocks, {}, len(adapters), cache_masked=cache_masked)

    @property
    def names(self) -> list[str]:
        """All output names (merged tensors, then pass-through ones)."""
        return [s.name for b in self.blocks for s in b.segments] + list(self.passthrough)

    @property
    def nbytes(self) -> int:
        """Bytes held by the precomputed stacks and buffers."""
        ts = [t for b in self.blocks for t in (b.values, b.base, b.out, b.sorted_mags, b.masked) if t is not None]
        return sum(t.numel() * t.element_size() for t in ts)

    def allocate_targets(self) -> dict[str, Tensor]:
        """Float32 targets that are views of the plan's output buffers."""
        out = {s.name: b.out[s.off : s.off + s.numel].view(s.shape) for b in self.blocks for s in b.segments}
        out.update({k: v.clone() for k, v in self.passthrough.items()})
        return out

    def apply(self, alpha: Sequence[float], beta: Sequence[float], targets: Mapping[str, Tensor]) -> None:
        """Write the candidate for (alpha, beta) into ``targets`` in place.

        Args:
            alpha: N keep fractions in [0, 1]; beta: N scales.
            targets: name -> preallocated tensor of the right shape (any float dtype, e.g. a
                model's parameters); names not in ``targets`` are computed into the plan's
                own buffer only.
        """
        n_exp = self.n_experts
        if len(alpha) != n_exp or len(beta) != n_exp:
            raise InvalidRecipeError(f"need {n_exp} alpha and beta values, got {len(alpha)} and {len(beta)}")
        a = tuple(min(1.0, max(0.0, float(x))) for x in alpha)
        b = [float(x) for x in beta]
        repeat = self.cache_masked and a == self._last_alpha
        self._last_alpha = a
        beta_t = torch.tensor(b, dtype=torch.float32, device=self.device)
        with torch.no_grad():
            for block in self.blocks:
                if block.sorted_mags is None:
                    self._gemv_block(block, block.values, beta_t, targets)
                elif repeat and block.cached_alpha == a and block.masked is not None:
                    self._gemv_block(block, block.masked, beta_t, targets)
                else:
                    self._stream_block(block, a, b, targets, store=repeat)
            for name, t in self.passthrough.items():
                if name in targets and targets[name].data_ptr() != t.data_ptr():
                    targets[name].copy_(t)

    def _stream_block(self, block: _Block, alpha: tuple[float, ...], beta: list[float],
                      targets: Mapping[str, Tensor], *, store: bool) -> None:
        """base + sum_i beta_i S_{alpha_i}(V_i), per segment and chunk, in expert order."""
        assert block.sorted_mags is not None
        if store and block.masked is None:
            block.masked = torch.empty_like(block.values)
        lambdas = _shrink_lambdas(block, alpha)
        for j, seg in enumerate(block.segments):
            dest, direct = _dest(block, seg, targets)
            for lo in range(0, seg.numel, _CHUNK):
                hi = min(seg.numel, lo + _CHUNK)
                o = dest[lo:hi]
                if block.base is None:
                    o.zero_()
                else:
                    o.copy_(block.base[seg.off + lo : seg.off + hi])
                for i in range(self.n_experts):
                    src = block.values[i, seg.off + lo : seg.off + hi]
                    lam = lambdas[i][j]
                    if store:
                        w = block.masked[i, seg.off + lo : seg.off + hi]  # type: ignore[index]
                        if alpha[i] <= 0.0:
                            w.zero_()
                        elif lam is None:
                            w.copy_(src)
                        else:
                            torch.ops.aten.hardshrink.out(src, lam, out=w)
                        src = w
                    elif lam is not None and alpha[i] > 0.0 and beta[i] != 0.0:
                        src = torch.ops.aten.hardshrink.out(src, lam, out=self._scratch[: hi - lo])
                    if alpha[i] > 0.0 and beta[i] != 0.0:
                        o.add_(src, alpha=beta[i])
            _finish(seg, dest, direct, targets)
        block.cached_alpha = alpha if store else None

    def _gemv_block(self, block: _Block, stack: Tensor, beta_t: Tensor, targets: Mapping[str, Tensor]) -> None:
        """base + stack^T beta per segment (stack (N, P))."""
        for seg in block.segments:
            dest, direct = _dest(block, seg, targets)
            mat = stack[:, seg.off : seg.off + seg.numel].t()  # (numel, N)
            if block.base is None:
                torch.mv(mat, beta_t, out=dest)
            else:
                torch.addmv(block.base[seg.off : seg.off + seg.numel], mat, beta_t, out=dest)
            _finish(seg, dest, direct, targets)


def _dest(block: _Block, seg: _Segment, targets: Mapping[str, Tensor]) -> tuple[Tensor, bool]:
    """Where to accumulate a segment: the target itself when it is float32-contiguous here."""
    t = targets.get(seg.name)
    if t is not None and t.shape != seg.shape:
        raise IncompatibleExpertsError(f"target {seg.name!r} has shape {list(t.shape)}, expected {list(seg.shape)}")
    if t is not None and t.dtype == torch.float32 and t.is_contiguous() and t.device == block.out.device:
        return t.detach().view(-1), True
    return block.out[seg.off : seg.off + seg.numel], False


def _finish(seg: _Segment, dest: Tensor, direct: bool, targets: Mapping[str, Tensor]) -> None:
    t = targets.get(seg.name)
    if t is not None and not direct:
        t.copy_(dest.view(seg.shape))


def _shrink_lambdas(block: _Block, alpha: tuple[float, ...]) -> list[list[float | None]]:
    """Per expert and segment: hardshrink lambda just below S_alpha's threshold (None: keep all)."""
    assert block.sorted_mags is not None
    out: list[list[float | None]] = []
    for i, a in enumerate(alpha):
        if a <= 0.0 or a >= 1.0:
            out.append([None] * len(block.segments))
            continue
        idx = [s.off + s.numel - ops.keep_count(s.numel, a, "round") for s in block.segments]
        thr = block.sorted_mags[i, torch.tensor(idx, device=block.sorted_mags.device)].tolist()
        # |x| > nextafter(thr, 0) <=> |x| >= thr for float32 x; thr == 0 keeps everything
        out.append([None if t <= 0.0 else float(np.nextafter(np.float32(t), np.float32(0))) for t in thr])
    return out


def _make_block(entries: Mapping[str, list[Tensor]], bases: Mapping[str, Tensor], *, sparse: bool,
                device: torch.device) -> _Block:
    """Stack entries (name -> N float32 tensors) side by side; sort magnitudes when ``sparse``."""
    n = len(next(iter(entries.values()))) if entries else 0
    segments, off = [], 0
    for name, ts in entries.items():
        segments.append(_Segment(name, ts[0].shape, off, ts[0].numel()))
        off += ts[0].numel()
    values = torch.empty((n, off), dtype=torch.float32, device=device)  # (N, P)
    mags = torch.empty((n, off), dtype=torch.float32, device=device) if sparse else None
    base = torch.empty(off, dtype=torch.float32, device=device) if bases else None
    for seg in segments:
        sl = slice(seg.off, seg.off + seg.numel)
        for i, t in enumerate(entries[seg.name]):
            values[i, sl] = t.reshape(-1)
            if mags is not None:
                mags[i, sl] = _sorted_abs(t)
        if base is not None:
            base[sl] = bases[seg.name].reshape(-1)
    out = torch.empty(off, dtype=torch.float32, device=device)
    return _Block(segments, values, base, out, mags)


def _sorted_abs(t: Tensor) -> Tensor:
    """|t| flattened, ascending (numpy's sort is several times faster than torch's on CPU)."""
    flat = t.detach().reshape(-1).abs()
    if flat.device.type == "cpu":
        return torch.from_numpy(np.sort(flat.numpy()))
    return torch.sort(flat).values
