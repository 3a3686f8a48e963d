"""A merge session's population evaluated in steps: :class:`Population` (checked, counted, refunded) and
:class:`BatchedRun` (rows = candidates x validation examples, one batched forward per step).

Split from :mod:`experts.evo.session`, which creates both (``MergeSession.population``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from experts.evo.session import MergeSession

__all__ = ["BatchedRun", "Population"]

_LOGITS_BUDGET = 256 << 20  # bytes of full-vocabulary logits per batched forward (models without the fast head)


class Population:
    """A checked, counted population evaluated in steps, one torch hop each (the caller picks the thread).

    Creating it checks every vector and reserves one query per candidate (BudgetExhaustedError, nothing
    counted, if they do not all fit). Steps: the batched forwards of a :class:`BatchedRun`, or one
    candidate each on the per-candidate path (a single candidate, a session without the batched path,
    or ``batched=False``). Leaving the ``with`` block refunds the queries whose losses were not all
    computed (an error, a cancelled request).
    """

    def __init__(self, session: MergeSession, candidates: Sequence[tuple[Sequence[float], Sequence[float]]], *,
                 batched: bool | None = None) -> None:
        self.session = session
        self.checked = session.check_candidates(candidates)
        session.reserve(len(self.checked))
        try:
            self.run = session.batched_run(self.checked) if batched is not False else None
        except BaseException:
            session.refund(len(self.checked))
            raise
        self._losses: list[float] = []
        self._closed = False

    def __enter__(self) -> Population:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def done(self) -> bool:
        return self.run.done if self.run is not None else len(self._losses) == len(self.checked)

    @property
    def evaluated(self) -> int:
        """Candidates whose losses are complete."""
        return self.run.evaluated if self.run is not None else len(self._losses)

    def step(self) -> None:
        if self.run is not None:
            self.run.step()
        else:
            alpha, beta = self.checked[len(self._losses)]
            self._losses.append(self.session.loss_of(alpha, beta))

    def losses(self) -> list[float]:
        return self.run.losses() if self.run is not None else list(self._losses)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.session.refund(len(self.checked) - self.evaluated)


class BatchedRun:
    """One population's losses from batched forwards: rows = candidates x validation examples.

    Candidates are split into groups of G (at most ``session.forward_tokens`` padded tokens per forward;
    for models without the fast head also at most 256 MiB of logits; group sizes differ by at most one).
    A step is one group on one validation batch: the batch's ids repeated G times, candidate k's rows
    [k*B, (k+1)*B) getting its own Evo-merged LoRA delta through
    :meth:`experts.hf.multilora.MultiLora.segments` on the base's own weights (W0 x + s B_k A_k x; nothing
    merged). A group's factors are written when it starts (``MergeSession.factor_stacks``: the session's
    :class:`merging.evo.EvoPlan`, the operator the per-candidate path uses, bit for bit). Per candidate,
    the masked cross-entropy sums of the batches are added in float64 in the batches' order and divided
    by the scored tokens, as the per-candidate path does, so the losses agree with it to float rounding
    (the delta is applied unmerged: ~1e-6 relative). Each step holds the session's lock, so a caller may
    run the steps one per hop of an executor (the gateway does: completions wait at most one forward).
    Steps run in order: group by group, all batches of a group.
    """

    def __init__(self, session: MergeSession, checked: Sequence[tuple[list[float], list[float]]]) -> None:
        self.session = session
        self.checked = list(checked)
        n = len(self.checked)
        widest = max(b.ids.numel() for b in session.batches)
        g = max(1, session.forward_tokens // widest)
        if not session._fast:
            vocab = int(getattr(session._model.config, "vocab_size", 0) or 1)
            g = min(g, max(1, _LOGITS_BUDGET // (widest * vocab * 4)))
        n_groups = -(-n // min(g, n))
        size, extra = divmod(n, n_groups)  # balanced: group sizes differ by at most one
        self.groups: list[range] = []
        start = 0
        for i in range(n_groups):
            stop = start + size + (1 if i < extra else 0)
            self.groups.append(range(start, stop))
            start = stop
        self._steps = [(gi, bi) for gi in range(len(self.groups)) for bi in range(len(session.batches))]
        self._next = 0
        self._sums = torch.zeros(n, dtype=torch.float64)
        self._stacks: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._stacks_group = -1
        self.evaluated = 0  # candidates whose every batch is scored

    def __len__(self) -> int:
        return len(self._steps)

    @property
    def done(self) -> bool:
        return self._next >= len(self._steps)

    def step(self) -> None:
        """Run the next step (one batched forward); the session's lock is held while it runs."""
        if self.done:
            raise RuntimeError("this batched run is complete")
        gi, bi = self._steps[self._next]
        s = self.session
        group = self.groups[gi]
        with s._lock:
            if self._stacks_group != gi:
                self._stacks = s.factor_stacks([self.checked[c] for c in group])
                self._stacks_group = gi
            assert self._stacks is not None
            self._sums[group.start:group.stop] += s.batched_sums(self._stacks, s.batches[bi])
            s.last_used_at = time.time()
        self._next += 1
        if bi == len(s.batches) - 1:
            self.evaluated = group.stop
            self._stacks, self._stacks_group = None, -1

    def losses(self) -> list[float]:
        """Mean token cross-entropy per candidate, in order (after the last step)."""
        if not self.done:
            raise RuntimeError(f"{len(self) - self._next} steps of this batched run have not run")
        return [float(x / self.session.n_tokens) for x in self._sums.tolist()]
