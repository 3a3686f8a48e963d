"""Black-box baselines of the Evo-Merging comparison, run by the same :class:`SearchRunner` as the searches
(same budgets, progress, stopping and :class:`SearchResult`), so a job or a bench can select them by name.

They are fixed candidates in the (alpha, beta) space of the Evo operator; the best by loss is returned:

* ``uniform``: alpha = 1, beta = 1/N (the plain average of the adapters' factors), 1 query;
* ``task_arithmetic``: alpha = 1, beta_i = lambda for every i, one query per lambda of a grid
  (Ilharco et al. 2023's scaling coefficient chosen on validation data);
* ``best_single``: alpha = 1, beta = e_i (adapter i alone), N queries.

TIES and DARE need the weights (trimming by magnitude, sign election across adapters), so they are
white-box: run them with the merge library (``/admin/merges``; ``bench/evo_repro.py`` compares them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import numpy as np

from merging.search.algorithms import SearchSettingsError, _check, _result, _versions
from merging.search.optimizers import FloatArray, StageOptimizer
from merging.search.result import Evaluator, SearchResult, Stage, Trial
from merging.search.runner import SearchRunner, StageSpec
from merging.search.settings import BASELINES, DEFAULT_LAMBDAS

__all__ = ["BASELINES", "DEFAULT_LAMBDAS", "baseline"]

Baseline = Literal["uniform", "task_arithmetic", "best_single"]
_STAGE = cast(Stage, "baseline")


@dataclass
class _Fixed:
    """An ask/tell 'optimiser' that proposes a fixed list of candidates, in order."""

    candidates: list[FloatArray]
    i: int = 0

    def ask(self) -> FloatArray:
        x = self.candidates[self.i]
        self.i += 1
        return x

    def tell(self, candidate: Any, value: float) -> None:
        pass


def candidates(name: str, n: int, lambdas: Sequence[float] = DEFAULT_LAMBDAS) -> list[FloatArray]:
    """The beta vectors baseline `name` evaluates (alpha is 1)."""
    if name == "uniform":
        return [np.full(n, 1.0 / n)]
    if name == "task_arithmetic":
        if not lambdas or not all(math.isfinite(x) and -1.5 <= x <= 1.5 for x in lambdas):
            raise SearchSettingsError("lambdas must be a non-empty list of numbers in [-1.5, 1.5]")
        return [np.full(n, float(x)) for x in lambdas]
    if name == "best_single":
        return [np.eye(n)[i] for i in range(n)]
    raise SearchSettingsError(f"unknown baseline {name!r}; known: {', '.join(BASELINES)}")


def baseline(
    evaluator: Evaluator,
    n: int,
    name: str,
    *,
    lambdas: Sequence[float] = DEFAULT_LAMBDAS,
    on_trial: Callable[[Trial], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> SearchResult:
    """Evaluate baseline `name`'s candidates (one population) and return the best by loss.

    Returns:
        A :class:`SearchResult` with method `name`, one stage ``"baseline"``, ``queries`` = the
        number of candidates evaluated (1, len(lambdas) or N) and no L1 term (objective = loss).
    """
    _check(evaluator, n, popsize=2, sigma0=1.0, l1=0.0, workers=1, early_stop=None)
    cands = candidates(name, n, lambdas)
    ones = np.ones(n)
    opt = StageOptimizer(_Fixed(cands), lambda x: np.asarray(x, dtype=np.float64), len(cands),
                         {"candidates": len(cands)})
    runner = SearchRunner(evaluator, on_trial=on_trial, should_stop=should_stop)
    stage = runner.run_stage(StageSpec(_STAGE, "beta", ones, len(cands), 0.0), opt, cands[0])
    settings: dict[str, Any] = {"method": name, "n": n, "budget": len(cands), **_versions()}
    if name == "task_arithmetic":
        settings["lambdas"] = [float(x) for x in lambdas]
    return _result(name, runner, [stage], (ones, cands[0]), settings)
