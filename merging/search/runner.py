"""The ask/evaluate/tell loop shared by every search: budgets, populations, stopping, the
incumbent and the history.

One :class:`SearchRunner` serves a whole search (both Evo-Merging stages): it counts queries
across stages, keeps the incumbent and calls ``on_trial``. A stage asks a generation of
``popsize`` candidates (fewer for the last one if the budget is not a multiple), evaluates
them as a population, tells every evaluated one, then checks the stopping rules:

* the stage budget is exact: never more evaluations than ``budget``;
* ``should_stop()`` is polled before every generation and, when candidates are evaluated one
  by one or in the thread pool, before each evaluation starts (in-flight ones finish and are
  recorded); an ``evaluate_many`` population is one call and is not interrupted;
* ``early_stop``: the stage ends when its best objective has not improved by more than
  ``early_stop_min_delta`` for that many consecutive generations;
* pycma's own termination ends a CMA stage, as in the authors' ``while not es.stop()``.

Populations go to ``evaluator.evaluate_many`` when it exists, else to a thread pool of
``workers`` threads when ``workers > 1``, else one by one. Losses are told in candidate order
whatever the evaluation order, so results do not depend on ``workers``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import numpy as np

from merging.search.optimizers import FloatArray, StageOptimizer, cma_stop_reason, release
from merging.search.result import Evaluator, HistoryPoint, Stage, StageResult, Trial, Vector

__all__ = ["SearchRunner", "StageSpec"]

# Told to the optimiser for a non-finite loss: ranks the candidate last, keeps inf/nan out of
# CMA's arithmetic, and stays below nevergrad's 5e20 clip (which warns).
_BAD_OBJECTIVE = 1e20

Pair = tuple[list[float], list[float]]


@dataclass(frozen=True, slots=True)
class StageSpec:
    """What one stage searches.

    Args:
        stage: its name.
        searched: ``"alpha"`` or ``"beta"``: which vector the optimiser proposes.
        fixed: the other vector (N,), held constant during the stage.
        budget: evaluations allowed.
        l1: penalty weight on ``mean(|x|)`` of the searched vector.
        loss_scale: the loss's weight in the objective ``loss_scale * loss + l1 * mean(|x|)``
            (LoraHub's per-example loss: 1 / batch size).
    """

    stage: Stage
    searched: str
    fixed: FloatArray
    budget: int
    l1: float
    loss_scale: float = 1.0

    def pair(self, x: FloatArray) -> Pair:
        """(alpha, beta) lists for the evaluator."""
        if self.searched == "alpha":
            return x.tolist(), self.fixed.tolist()
        return self.fixed.tolist(), x.tolist()


@dataclass(frozen=True, slots=True)
class _Best:
    alpha: Vector
    beta: Vector
    loss: float
    objective: float


class SearchRunner:
    """Runs stages against one evaluator; see the module docstring for the rules."""

    def __init__(
        self,
        evaluator: Evaluator,
        *,
        on_trial: Callable[[Trial], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        workers: int = 1,
        early_stop: int | None = None,
        early_stop_min_delta: float = 0.0,
    ) -> None:
        self.evaluator = evaluator
        self.on_trial = on_trial
        self.should_stop = should_stop or (lambda: False)
        self.workers = workers
        self.early_stop = early_stop
        self.early_stop_min_delta = early_stop_min_delta
        self.queries = 0
        self.stopped = False
        self.history: list[HistoryPoint] = []
        self.incumbent: _Best | None = None
        self._many = getattr(evaluator, "evaluate_many", None)

    def reset_incumbent(self) -> None:
        """Forget the incumbent (``selection="last_stage"``: the next stage's best wins)."""
        self.incumbent = None

    def run_stage(self, spec: StageSpec, opt: StageOptimizer, x0: FloatArray) -> StageResult:
        """Spend up to ``spec.budget`` evaluations on ``opt``; returns the stage's best.

        Args:
            spec: the stage.
            opt: a fresh optimiser for it.
            x0: the stage's start point (reported as its best if nothing gets evaluated).
        """
        a0, b0 = spec.pair(x0)
        best = _Best(tuple(a0), tuple(b0), math.nan, math.inf)
        used = generations = stale = 0
        reason = "budget"
        pool = ThreadPoolExecutor(self.workers) if self.workers > 1 and self._many is None else None
        try:
            while used < spec.budget:
                if self.should_stop():
                    reason = "should_stop"
                    break
                count = min(opt.popsize, spec.budget - used)
                candidates = [opt.optimizer.ask() for _ in range(count)]
                xs = [opt.decode(c) for c in candidates]
                losses = self._evaluate([spec.pair(x) for x in xs], pool)
                previous = best.objective
                for candidate, x, loss in zip(candidates, xs, losses, strict=False):
                    best = self._record(spec, opt, candidate, x, loss, best)
                used += len(losses)
                if len(losses) < count:
                    reason = "should_stop"
                    break
                generations += 1
                stale = 0 if best.objective < previous - self.early_stop_min_delta else stale + 1
                if self.early_stop is not None and stale >= self.early_stop:
                    reason = "plateau"
                    break
                cma = cma_stop_reason(opt.optimizer)
                if cma is not None and used < spec.budget:
                    reason = f"cma_stop:{cma}"
                    break
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            release(opt.optimizer)
        if reason == "should_stop":
            self.stopped = True
        return StageResult(
            spec.stage, best.alpha, best.beta, best.loss, best.objective, used, generations, reason
        )

    def _record(
        self, spec: StageSpec, opt: StageOptimizer, candidate: Any, x: FloatArray, loss: float, best: _Best
    ) -> _Best:
        """Tell the optimiser, update stage best / incumbent / history, call ``on_trial``."""
        penalty = spec.l1 * float(np.mean(np.abs(x)))
        objective = spec.loss_scale * loss + penalty if math.isfinite(loss) else math.inf
        opt.optimizer.tell(candidate, objective if math.isfinite(objective) else _BAD_OBJECTIVE)
        alpha, beta = (tuple(v) for v in spec.pair(x))
        point = _Best(alpha, beta, loss, objective)
        if objective < best.objective:
            best = point
        if objective < (self.incumbent.objective if self.incumbent is not None else math.inf):
            self.incumbent = point
        inc = self.incumbent or point  # nothing finite yet
        index = self.queries
        self.queries += 1
        self.history.append(HistoryPoint(index, spec.stage, loss, objective, inc.loss, inc.objective))
        if self.on_trial is not None:
            trial = Trial(index, spec.stage, alpha, beta, loss, objective,
                          inc.loss, inc.objective, inc.alpha, inc.beta)
            self.on_trial(trial)
        return best

    def _evaluate(self, pairs: Sequence[Pair], pool: ThreadPoolExecutor | None) -> list[float]:
        """Losses for ``pairs`` in order; shorter than ``pairs`` only if ``should_stop`` fired."""
        if self._many is not None and len(pairs) > 1:
            losses = [float(v) for v in self._many(list(pairs))]
            if len(losses) != len(pairs):
                raise RuntimeError(f"evaluate_many returned {len(losses)} losses for {len(pairs)} candidates")
            return losses
        if pool is None or len(pairs) == 1:
            out: list[float] = []
            for i, (alpha, beta) in enumerate(pairs):
                if i and self.should_stop():
                    break
                out.append(float(self.evaluator.evaluate(alpha, beta)))
            return out
        return self._evaluate_pool(pairs, pool)

    def _evaluate_pool(self, pairs: Sequence[Pair], pool: ThreadPoolExecutor) -> list[float]:
        """At most ``workers`` evaluations in flight; none started once ``should_stop`` fires."""
        futures: list[Future[float]] = []
        pending: set[Future[float]] = set()
        stop = False
        for alpha, beta in pairs:
            while len(pending) >= self.workers:
                _, pending = wait(pending, return_when=FIRST_COMPLETED)
                stop = self.should_stop()
                if stop:
                    break
            if stop:
                break
            future = pool.submit(self.evaluator.evaluate, alpha, beta)
            futures.append(future)
            pending.add(future)
        wait(pending)
        # an exception from any evaluation aborts the search (re-raised by result())
        return [float(f.result()) for f in futures]
