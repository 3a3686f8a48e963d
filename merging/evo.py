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
thr for float32) into a scratch buffer and add it with weight beta_i. For large tensors that
is the reference's arithmetic in the reference's order (:func:`merging.methods.merge_tensor`
``evo``, :func:`merging.lora.evo_lora`), so they match it bit for bit; main-memory traffic is
one read of the N stacks plus the output write. Small tensors (numel <= ``packed_max``: LoRA
factors, biases, norms) form a separate "packed" block, ordered by size, whose entries are also
stored sorted by magnitude (:mod:`merging.evo_sorted`): there a candidate is ONE GEMV over the
experts with alpha >= 1/2 plus, per expert and tensor size, one ``index_add_`` that subtracts
the dropped entries (or, for alpha < 1/2, adds the kept ones), about 40 ops for 20 LoRA
adapters instead of one hardshrink per (adapter, module). Sums run in another order than the
reference's (~1e-7 relative). The plain GEMV paths (stage 2, LoRA B) run one GEMV over each
run of consecutive small tensors (one long stream instead of many short ones). Results go
straight into the caller's float32 contiguous tensors (e.g. a resident model's parameters),
or through the plan's buffer and ``copy_``.

When the same alpha comes twice in a row (stage 2 of Evo-Merging fixes alpha), the second
call also stores the sparsified stack W = S_alpha(values), and from then on a candidate is
one ``addmv`` (base + W^T beta) per tensor, i.e. a single pass over the stacks. LoRA B
factors (never sparsified unless ``sparsify_b``) always take that path. Buffers are
allocated once; nothing touches disk. On a CPU shared with other processes, prefer
``torch.set_num_threads(1)``: many short OpenMP regions stall when a core is busy elsewhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from merging.errors import IncompatibleExpertsError, InvalidRecipeError
from merging.evo_layout import (
    Block,
    accumulate,
    destination,
    finish,
    gemv,
    hardshrink,
    make_block,
    shrink_lambdas,
    shrink_rows,
    write_back,
)
from merging.evo_sorted import fill_masked, scatter_expert
from merging.lora import lora_modules

__all__ = ["EvoPlan"]

_CHUNK = 1 << 17  # floats per chunk (512 KiB): accumulator + scratch stay in L2
_PACKED_MAX = 1 << 16  # tensors up to this size go to the packed block


def _split(entries: dict[str, list[Tensor]], packed_max: int) -> list[tuple[dict[str, list[Tensor]], bool]]:
    """[(small entries, True), (large entries, False)], empty groups left out."""
    small = {k: v for k, v in entries.items() if v[0].numel() <= packed_max}
    large = {k: v for k, v in entries.items() if k not in small}
    return [(g, packed) for g, packed in ((small, True), (large, False)) if g]


class EvoPlan:
    """Precomputed Evo merge of N fixed experts; :meth:`apply` materialises one candidate.

    Build it with :meth:`full` (theta = base + sum_i beta_i S_{alpha_i}(theta_i - base)) or
    :meth:`lora` (A = sum_i beta_i S_{alpha_i}(A_i), B = sum_i beta_i B_i).
    """

    def __init__(
        self,
        blocks: list[Block],
        passthrough: Mapping[str, Tensor],
        n_experts: int,
        *,
        cache_masked: bool = True,
        chunk_size: int = _CHUNK,
    ) -> None:
        self.blocks = blocks
        self.passthrough = dict(passthrough)
        self.n_experts = n_experts
        self.cache_masked = cache_masked
        self.device = blocks[0].values.device if blocks else torch.device("cpu")
        self.chunk_size = chunk_size
        self._scratch = torch.empty(chunk_size, dtype=torch.float32, device=self.device)
        self._rows: dict[tuple[int, int], tuple[Tensor, list[Tensor]]] = {}
        for block in blocks:
            block.build_views(chunk_size)
        self._last_alpha: tuple[float, ...] | None = None

    @classmethod
    def full(
        cls,
        base: Mapping[str, Tensor],
        experts: Sequence[Mapping[str, Tensor]],
        *,
        cache_masked: bool = True,
        device: torch.device | str | None = None,
        chunk_size: int = _CHUNK,
        packed_max: int = _PACKED_MAX,
    ) -> EvoPlan:
        """Plan for full experts sharing ``base``'s names and shapes (non-float tensors pass through).

        Args:
            base: name -> tensor of the base model (e.g. a state dict).
            experts: N such mappings with the same names and shapes.
            cache_masked: allow storing S_alpha(values) when alpha repeats (one more (N, P) stack).
            device: where the stacks live and candidates are computed (default: CPU).
            chunk_size: floats per streamed chunk (keep accumulator + scratch in cache).
            packed_max: tensors with at most this many entries go to the packed block (0: none).
        """
        if not experts:
            raise InvalidRecipeError("an Evo plan needs at least one expert")
        dev = torch.device(device or "cpu")
        entries: dict[str, list[Tensor]] = {}
        bases: dict[str, Tensor] = {}
        passthrough: dict[str, Tensor] = {}
        for name, b in base.items():
            for i, e in enumerate(experts):
                if name not in e or e[name].shape != b.shape:
                    got = "missing" if name not in e else f"shape {list(e[name].shape)}"
                    raise IncompatibleExpertsError(
                        f"expert {i}: tensor {name!r} is {got}, base has {list(b.shape)}"
                    )
            if not b.is_floating_point():
                passthrough[name] = b
                continue
            b32 = bases[name] = b.detach().to(dev, torch.float32)
            entries[name] = [e[name].detach().to(dev, torch.float32) - b32 for e in experts]
        blocks = [
            make_block(group, {k: bases[k] for k in group}, sparse=True, device=dev, packed=packed)
            for group, packed in _split(entries, packed_max)
        ]
        return cls(blocks, passthrough, len(experts), cache_masked=cache_masked, chunk_size=chunk_size)

    @classmethod
    def lora(
        cls,
        adapters: Sequence[Mapping[str, Tensor]],
        *,
        sparsify_b: bool = False,
        cache_masked: bool = True,
        device: torch.device | str | None = None,
        chunk_size: int = _CHUNK,
        packed_max: int = _PACKED_MAX,
    ) -> EvoPlan:
        """Plan for N PEFT adapters; output names are the first adapter's factor keys.

        Modules absent from the first adapter are dropped; an adapter lacking a module
        contributes nothing to it (as in the authors' code). Other arguments as :meth:`full`.
        """
        if not adapters:
            raise InvalidRecipeError("an Evo plan needs at least one adapter")
        dev = torch.device(device or "cpu")
        mods = [lora_modules(a.keys()) for a in adapters]
        if not mods[0]:
            raise IncompatibleExpertsError("the first adapter has no LoRA A/B factor pairs")
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
        groups = _split(a_entries, packed_max)
        blocks = [make_block(g, {}, sparse=True, device=dev, packed=pk) for g, pk in groups]
        if b_entries:
            blocks.append(make_block(b_entries, {}, sparse=False, device=dev))
        return cls(blocks, {}, len(adapters), cache_masked=cache_masked, chunk_size=chunk_size)

    @property
    def names(self) -> list[str]:
        """All output names (merged tensors, then pass-through ones)."""
        return [s.name for b in self.blocks for s in b.segments] + list(self.passthrough)

    @property
    def nbytes(self) -> int:
        """Bytes held by the precomputed stacks and buffers."""
        ts = [
            t
            for b in self.blocks
            for t in (b.values, b.base, b.out, b.sorted_mags, b.masked)
            + ((b.packed.svals, b.packed.sidx) if b.packed is not None else ())
            if t is not None
        ]
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
                if block.sorted_mags is None and block.packed is None:
                    self._gemv_block(block, block.values, beta_t, targets)
                elif repeat and block.cached_alpha == a and block.masked is not None:
                    self._gemv_block(block, block.masked, beta_t, targets)
                elif block.packed is not None:
                    self._packed_block(block, a, b, beta_t, targets, store=repeat)
                else:
                    self._stream_block(block, a, b, targets, store=repeat)
            for name, t in self.passthrough.items():
                if name in targets and targets[name].data_ptr() != t.data_ptr():
                    targets[name].copy_(t)

    def _stream_block(
        self,
        block: Block,
        alpha: tuple[float, ...],
        beta: list[float],
        targets: Mapping[str, Tensor],
        *,
        store: bool,
    ) -> None:
        """base + sum_i beta_i S_{alpha_i}(V_i), per segment and chunk.

        Large segments: for each expert in order, hardshrink into an L2 scratch and add_ (the
        reference's arithmetic). Small ones (all active experts fit in the scratch): hardshrink
        into the rows of a scratch matrix and one (add)mv, to save per-op overhead.
        """
        lambdas = shrink_lambdas(block, alpha)
        masked = block.ensure_masked() if store else None
        active = [i for i in range(self.n_experts) if alpha[i] > 0.0 and beta[i] != 0.0]
        beta_act = torch.tensor([beta[i] for i in active], dtype=torch.float32, device=self.device)
        for j, seg in enumerate(block.segments):
            dest, direct = destination(block, seg, targets)
            lams = [row[j] for row in lambdas]
            for c, (lo, hi, srcs, base) in enumerate(block.chunks[j]):
                o = dest if hi - lo == seg.numel else dest[lo:hi]
                if masked is not None:  # store S_alpha(V_i) for the following same-alpha calls
                    shrink_rows(masked[j][c], srcs, lams, alpha)
                    accumulate(o, base, [masked[j][c][i] for i in active], [beta[i] for i in active])
                elif len(active) * (hi - lo) <= self.chunk_size and active:
                    mat, rows = self._matrix(len(active), hi - lo)
                    shrink_rows(
                        rows,
                        [srcs[i] for i in active],
                        [lams[i] for i in active],
                        [alpha[i] for i in active],
                    )
                    gemv(mat, beta_act, base, o)
                else:
                    scratch = self._scratch[: hi - lo]
                    # a generator: each term is added before the next overwrites the scratch
                    shrunk = (hardshrink(srcs[i], lams[i], scratch) for i in active)
                    accumulate(o, base, shrunk, [beta[i] for i in active])
            finish(seg, dest, direct, targets)
        block.cached_alpha = alpha if store else None

    def _packed_block(
        self,
        block: Block,
        alpha: tuple[float, ...],
        beta: list[float],
        beta_t: Tensor,
        targets: Mapping[str, Tensor],
        *,
        store: bool,
    ) -> None:
        """base + sum_i beta_i S_{alpha_i}(V_i) on the sorted layout: one GEMV over the experts
        with alpha >= 1/2, then per expert one scatter per tensor size (merging.evo_sorted)."""
        layout = block.packed
        assert layout is not None
        if store:  # S_alpha(V) into the cached stack, for the following same-alpha calls
            block.ensure_masked()
            assert block.masked is not None
            fill_masked(block.masked, block.values, layout, alpha)
            gemv(block.masked, beta_t, block.base, block.out)
        else:
            active = [i for i in range(self.n_experts) if alpha[i] > 0.0 and beta[i] != 0.0]
            # experts in the "drop" form (alpha >= 1/2) enter the GEMV whole
            in_gemv = [b_i if a_i >= 0.5 else 0.0 for a_i, b_i in zip(alpha, beta, strict=True)]
            if any(in_gemv):
                coefs = torch.tensor(in_gemv, dtype=torch.float32, device=self.device)
                gemv(block.values, coefs, block.base, block.out)
            elif block.base is not None:
                block.out.copy_(block.base)
            else:
                block.out.zero_()
            for i in active:
                scatter_expert(block.group_out, layout, i, alpha[i], beta[i])
        write_back(block.views, targets)
        block.cached_alpha = alpha if store else None

    def _matrix(self, k: int, width: int) -> tuple[Tensor, list[Tensor]]:
        """A (k, width) view of the scratch buffer and its rows (cached: views cost µs each)."""
        key = (k, width)
        if key not in self._rows:
            mat = self._scratch[: k * width].view(k, width)
            self._rows[key] = (mat, list(mat.unbind(0)))
        return self._rows[key]

    def _gemv_block(self, block: Block, stack: Tensor, beta_t: Tensor, targets: Mapping[str, Tensor]) -> None:
        """base + stack^T beta per GEMV run (stack (N, P)); runs of small segments go through
        the plan's buffer (one long GEMV, then copies)."""
        for lo, hi, j in block.runs:
            base = None if block.base is None else block.base[lo:hi]
            if j is None:
                gemv(stack[:, lo:hi], beta_t, base, block.out[lo:hi])
                continue
            seg = block.segments[j]
            dest, direct = destination(block, seg, targets)
            gemv(stack[:, lo:hi], beta_t, base, dest)
            finish(seg, dest, direct, targets)
        write_back(block.short, targets)
