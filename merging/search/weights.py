"""Ensemble-weight search: nonnegative weights w in [0, 1]^N, one per ensemble member.

The same :class:`~merging.search.runner.SearchRunner` as Evo-Merging and LoraHub, one stage
named ``"weights"``: the searched vector is beta (the weights), alpha is fixed at ones, so an
:class:`~merging.search.result.Evaluator` written for merges reads the weights from ``beta``.
The evaluator decides what the weights mean (an ensemble normalises them to sum 1, so the
loss is usually scale-invariant; see :mod:`experts.blackbox.weight_search`).

The search starts from uniform weights (1/N each, or ``start``). ``optimizer="CMA"`` is
:func:`~merging.search.optimizers.make_cma` (pycma with ``sigma0`` in value units and the box
folded by pycma's BoundTransform); any other name is taken from nevergrad's registry
(``"NGOpt"``, ``"TwoPointsDE"``, ...) and run by :func:`~merging.search.optimizers.make_ngopt`
on a bounded Array, one candidate at a time. With a scale-invariant loss, ``l1`` (weight of
``mean(w)``, default 0) only pulls every weight toward 0, so members that do not matter end
at 0; keep it 0 unless you want that.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import cast

import nevergrad as ng
import numpy as np

from merging.search.algorithms import SearchSettingsError, _check, _result, _versions
from merging.search.optimizers import FloatArray, make_cma, make_ngopt
from merging.search.result import Evaluator, SearchResult, Stage, Trial
from merging.search.runner import SearchRunner, StageSpec

__all__ = ["WEIGHTS_STAGE", "weight_search"]

# result.Stage lists the merge stages only; the runner treats the name as a label.
WEIGHTS_STAGE = cast(Stage, "weights")


def weight_search(
    evaluator: Evaluator,
    n: int,
    *,
    budget: int = 100,
    optimizer: str = "CMA",
    popsize: int = 10,
    sigma0: float = 0.1,
    l1: float = 0.0,
    seed: int | None = 42,
    start: Sequence[float] | None = None,
    early_stop: int | None = None,
    early_stop_min_delta: float = 0.0,
    on_trial: Callable[[Trial], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    workers: int = 1,
) -> SearchResult:
    """Search ensemble weights w in [0, 1]^N (beta; alpha = 1) that minimise the evaluator's loss.

    Args:
        evaluator: loss per (alpha, beta); beta holds the N weights.
        n: number of members N.
        budget: evaluations allowed.
        optimizer: ``"CMA"`` (pycma-faithful CMA-ES) or a nevergrad registry name.
        popsize: CMA population (ignored by other optimisers, which ask one at a time).
        sigma0: CMA initial step in weight units (ignored by other optimisers).
        l1: weight of ``mean(w)`` in the objective (default 0).
        seed: seeds the optimiser; same seed and evaluator, same result.
        start: the start point (N,) inside [0, 1] (default: uniform 1/N).
        early_stop: end after this many generations (CMA) or evaluations (others) without
            improvement by more than ``early_stop_min_delta``.
        on_trial, should_stop, workers: as in :func:`merging.search.evo_merging`.

    Returns:
        A :class:`SearchResult` with ``method="ensemble_weights"`` and one stage,
        ``"weights"``; ``beta`` is the best raw weight vector (not normalised), ``alpha``
        ones. ``settings`` holds every argument above (except the callbacks), the
        optimiser's parametrisation and library versions.
    """
    _check(evaluator, n, popsize=popsize, sigma0=sigma0, l1=l1, workers=workers, early_stop=early_stop)
    if budget < 0:
        raise SearchSettingsError("budget must be >= 0")
    if optimizer != "CMA" and optimizer not in ng.optimizers.registry:
        raise SearchSettingsError(f"unknown optimizer {optimizer!r}: 'CMA' or a nevergrad registry name")
    x0 = _start(start, n)
    zeros, ones = np.zeros(n), np.ones(n)
    runner = SearchRunner(evaluator, on_trial=on_trial, should_stop=should_stop, workers=workers,
                          early_stop=early_stop, early_stop_min_delta=early_stop_min_delta)
    if optimizer == "CMA":
        opt = make_cma(x0, zeros, ones, budget=max(budget, 1), popsize=popsize, sigma0=sigma0, seed=seed)
    else:
        opt = make_ngopt(x0, zeros, ones, budget=max(budget, 1), seed=seed, name=optimizer)
    stage = runner.run_stage(StageSpec(WEIGHTS_STAGE, "beta", ones, budget, l1), opt, x0)
    settings = {
        "method": "ensemble_weights", "n": n, "budget": budget, "optimizer": optimizer, "popsize": popsize,
        "sigma0": sigma0, "l1": l1, "seed": seed, "start": x0.tolist(), "early_stop": early_stop,
        "early_stop_min_delta": early_stop_min_delta, "workers": workers,
        "stages": {"weights": opt.describe}, **_versions(),
    }
    return _result("ensemble_weights", runner, [stage], (ones, x0), settings)


def _start(start: Sequence[float] | None, n: int) -> FloatArray:
    if start is None:
        return np.full(n, 1.0 / n)
    x0 = np.asarray([float(v) for v in start], dtype=np.float64)
    if x0.shape != (n,):
        raise SearchSettingsError(f"start has {x0.shape[0] if x0.ndim == 1 else x0.shape} values, n={n}")
    if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in x0.tolist()):
        raise SearchSettingsError("start must lie in [0, 1]^n")
    return x0
