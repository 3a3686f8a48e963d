"""Values of the black-box search: the :class:`Evaluator` seam, per-query :class:`Trial` records
and the final :class:`SearchResult`.

Conventions shared by every search in :mod:`merging.search`:

* a *query* is one call for one candidate (``evaluate``) or one candidate inside an
  ``evaluate_many`` population; ``index`` counts queries from 0 across all stages;
* ``loss`` is what the evaluator returned (validation CE, lower is better), ``objective`` is
  what the optimiser minimised: ``loss_scale * loss + l1 * mean(|x|)`` with x the vector searched in that
  stage (alpha in ``"denoise"``, beta in ``"scale"`` and ``"lorahub"``);
* the *incumbent* is the best-ever candidate by objective (see ``selection`` in
  :func:`merging.search.evo_merging`); ``best_loss`` / ``best_objective`` are the incumbent's,
  so ``best_objective`` never increases while ``best_loss`` may (a lower objective can carry a
  slightly higher raw loss when its vector is sparser).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

__all__ = ["Evaluator", "HistoryPoint", "SearchResult", "Stage", "StageResult", "Trial"]

Stage = Literal["denoise", "scale", "lorahub", "weights", "baseline"]
Vector = tuple[float, ...]


@runtime_checkable
class Evaluator(Protocol):
    """A black-box merge provider: one loss per (alpha, beta) candidate.

    Attributes:
        n: number of adapters N; every alpha and beta has length N.

    ``evaluate(alpha, beta)`` returns the loss (lower is better) of the model merged with keep
    fractions ``alpha`` (in [0, 1]) and weights ``beta``. Both arrive as lists of Python floats
    already inside the stage's bounds. An exception aborts the search (retries belong to the
    evaluator, e.g. :class:`experts.evo.http.HttpEvaluator`).

    An evaluator may also define ``evaluate_many(candidates: list[tuple[list[float],
    list[float]]]) -> list[float]`` (same order); the search then hands it a whole CMA
    generation in one call instead of calling ``evaluate`` per candidate.
    """

    n: int

    def evaluate(self, alpha: Sequence[float], beta: Sequence[float]) -> float: ...


@dataclass(frozen=True, slots=True)
class Trial:
    """One evaluated candidate, as passed to ``on_trial`` (after the optimiser was told).

    Args:
        index: query index (0-based, across stages).
        stage: ``"denoise"`` (alpha searched), ``"scale"`` (beta searched) or ``"lorahub"``.
        alpha, beta: the evaluated vectors (length N, inside the bounds).
        loss: the evaluator's loss for them.
        objective: ``loss + l1 * mean(|x|)`` (what the optimiser was told).
        best_loss, best_objective: the incumbent's after this query.
        best_alpha, best_beta: the incumbent's vectors.
    """

    index: int
    stage: Stage
    alpha: Vector
    beta: Vector
    loss: float
    objective: float
    best_loss: float
    best_objective: float
    best_alpha: Vector
    best_beta: Vector


@dataclass(frozen=True, slots=True)
class HistoryPoint:
    """One row of the loss-vs-queries series (``SearchResult.history``)."""

    index: int
    stage: Stage
    loss: float
    objective: float
    best_loss: float
    best_objective: float


@dataclass(frozen=True, slots=True)
class StageResult:
    """The best candidate of one stage, by that stage's objective.

    Args:
        stage: stage name.
        alpha, beta: best vectors (the stage's start point if nothing was evaluated).
        loss, objective: their loss and objective (``nan`` / ``inf`` if nothing was evaluated).
        queries: evaluations spent in the stage.
        generations: optimiser generations completed (a CMA generation is ``popsize`` queries,
            the last one may be shorter when the budget is not a multiple of it).
        stop_reason: ``"budget"``, ``"plateau"`` (``early_stop``), ``"should_stop"`` or
            ``"cma_stop:<conditions>"`` (pycma's own termination, as ``while not es.stop()``
            in the authors' loop).
    """

    stage: Stage
    alpha: Vector
    beta: Vector
    loss: float
    objective: float
    queries: int
    generations: int
    stop_reason: str


@dataclass(frozen=True, slots=True)
class SearchResult:
    """Outcome of a search.

    Args:
        method: ``"evo_merging"`` or ``"lorahub"``.
        alpha, beta: the incumbent (best-ever candidate by objective, see ``selection``).
        loss, objective: its loss and objective (``nan`` / ``inf`` if nothing was evaluated).
        queries: evaluations used, all stages together.
        stages: per-stage bests, in run order (skipped stages are absent).
        history: one :class:`HistoryPoint` per query.
        stopped: True if ``should_stop`` ended the search.
        settings: everything needed to rerun it (method arguments, seed, optimiser and its
            parametrisation, library versions); JSON-serialisable.
    """

    method: str
    alpha: Vector
    beta: Vector
    loss: float
    objective: float
    queries: int
    stages: tuple[StageResult, ...]
    history: tuple[HistoryPoint, ...]
    stopped: bool
    settings: dict[str, Any] = field(default_factory=dict)

    def stage(self, name: Stage) -> StageResult | None:
        """The result of stage ``name``, or None if it did not run."""
        return next((s for s in self.stages if s.stage == name), None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (non-finite floats become None)."""
        return _json_safe(asdict(self))


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj
