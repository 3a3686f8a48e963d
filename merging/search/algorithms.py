"""Evo-Merging's two-stage search and the LoraHub baseline, as released by their authors.

Evo-Merging (Chen et al. 2025, code ``Chansl-Lucky/Black-Box-Merging``), spec
``evo-merging.md`` sections 4-7:

1. *denoise*: CMA-ES over alpha in [0, 1]^N with beta = 1/N, from alpha = 1, objective
   ``loss + l1 * mean(alpha)``;
2. *scale*: CMA-ES over beta in [-1.5, 1.5]^N with alpha fixed at stage 1's best, from
   beta = 1/N, objective ``loss + l1 * mean(|beta|)``;

popsize 20, sigma0 0.05 in value units, budgets 400 and 800 evaluations, seed 42 for both
stages. Ablations: ``denoise=False`` (alpha = 1, stage 2 only), ``scale=False`` (beta = 1/N,
stage 1 only), ``negative=False`` (beta in [0, 1.5]). White-box recipes (uniform average,
task arithmetic, TIES, DARE) need no search and are evaluated by the caller.

LoraHub (Huang et al. 2023, ``sail-sg/lorahub``, spec section 11.1): one weight per adapter
(beta; alpha = 1), ``ng.p.Array(init=0, lower=-1.5, upper=1.5)``, ``NGOpt``, budget 40,
objective ``loss / batch_size + 0.05 * mean(|beta|)`` (its ``default_get_loss`` divides the summed
batch-mean CE by the number of examples; ``lorahub_loss="token_mean"`` drops the division, as in
Evo-Merging's objective). LoraHub returns nevergrad's recommendation; we return the best
evaluated candidate, which needs no extra query and is what its recommendation is for a
deterministic loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from importlib.metadata import version
from typing import Any

import nevergrad as ng
import numpy as np

from merging.errors import MergeError
from merging.search.optimizers import FloatArray, make_cma, make_ngopt
from merging.search.result import Evaluator, SearchResult, StageResult, Trial
from merging.search.runner import SearchRunner, StageSpec
from merging.search.settings import BETA_BOUND, DEFAULTS, LossTerm, Selection

__all__ = ["SearchSettingsError", "evo_merging", "lorahub"]


class SearchSettingsError(MergeError):
    """Search arguments that cannot work (bad budget, popsize, bounds, N mismatch, ...)."""


def evo_merging(
    evaluator: Evaluator, n: int, *,
    budget_stage1: int = DEFAULTS.budget_stage1, budget_stage2: int = DEFAULTS.budget_stage2,
    popsize: int = DEFAULTS.popsize, sigma0: float = DEFAULTS.sigma0, l1: float = DEFAULTS.l1,
    seed: int | None = DEFAULTS.seed, early_stop: int | None = DEFAULTS.early_stop,
    early_stop_min_delta: float = DEFAULTS.early_stop_min_delta,
    on_trial: Callable[[Trial], None] | None = None, should_stop: Callable[[], bool] | None = None,
    workers: int = 1, denoise: bool = DEFAULTS.denoise, scale: bool = DEFAULTS.scale,
    negative: bool = DEFAULTS.negative, beta_bound: float = BETA_BOUND,
    selection: Selection = DEFAULTS.selection, stage1_beta: float | None = DEFAULTS.stage1_beta,
) -> SearchResult:
    """Two-stage Evo-Merging search (CMA-ES via nevergrad ask/tell): stage 1 (denoise) searches alpha,
    stage 2 (scale) beta with alpha fixed at stage 1's best. Returns a :class:`SearchResult` with
    stages ``"denoise"`` and/or ``"scale"``.

    The settings (budgets, popsize, sigma0, l1, seed, early stopping, the ablations ``denoise``,
    ``scale``, ``negative``, and ``selection``) are documented once, with their defaults, in
    :class:`merging.search.settings.SearchSettings`. `evaluator`: the black-box provider (loss per
    (alpha, beta)); `n`: the number of adapters N; `on_trial(Trial)`: after each evaluation;
    `should_stop()`: polled between evaluations (True ends the search with what it has,
    ``SearchResult.stopped``); `workers`: concurrent ``evaluate`` calls when the evaluator has no
    ``evaluate_many``; `beta_bound`: beta's box is [-beta_bound, beta_bound] ([0, beta_bound]
    without ``negative``); `stage1_beta`: beta during stage 1 (None: 1/N).
    """
    _check(evaluator, n, popsize=popsize, sigma0=sigma0, l1=l1, workers=workers, early_stop=early_stop)
    _check_evo(budget_stage1, budget_stage2, denoise, scale, beta_bound)
    if stage1_beta is not None and not (math.isfinite(stage1_beta) and abs(stage1_beta) <= beta_bound):
        raise SearchSettingsError(f"stage1_beta must be a number in [-{beta_bound}, {beta_bound}]")
    # spec section 4: stage 1 holds beta at the uniform weights w_i = 1/N
    fixed_beta = np.full(n, 1.0 / n if stage1_beta is None else float(stage1_beta))
    runner = SearchRunner(evaluator, on_trial=on_trial, should_stop=should_stop, workers=workers,
                          early_stop=early_stop, early_stop_min_delta=early_stop_min_delta)
    cma = {"popsize": popsize, "sigma0": sigma0, "seed": seed}
    stages: list[StageResult] = []
    described: dict[str, Any] = {}
    alpha = np.ones(n)
    if denoise:
        alpha = _denoise_stage(runner, fixed_beta, budget_stage1, l1, cma, stages, described)
    if scale and not runner.stopped:
        if selection == "last_stage" and budget_stage2 > 0:
            runner.reset_incumbent()
        lower = -beta_bound if negative else 0.0
        _scale_stage(runner, alpha, (lower, beta_bound), budget_stage2, l1, cma, stages, described)
    settings = {
        "method": "evo_merging", "n": n, "budget_stage1": budget_stage1, "budget_stage2": budget_stage2,
        "popsize": popsize, "sigma0": sigma0, "l1": l1, "seed": seed, "early_stop": early_stop,
        "early_stop_min_delta": early_stop_min_delta, "denoise": denoise, "scale": scale,
        "negative": negative, "beta_bound": beta_bound, "selection": selection, "stage1_beta": stage1_beta,
        "stages": described, **_versions(),
    }
    return _result("evo_merging", runner, stages, (alpha, fixed_beta), settings)


def _check_evo(budget_stage1: int, budget_stage2: int, denoise: bool, scale: bool, beta_bound: float) -> None:
    """SearchSettingsError for Evo-Merging settings that cannot work."""
    if budget_stage1 < 0 or budget_stage2 < 0:
        raise SearchSettingsError("budgets must be >= 0")
    if not (denoise or scale):
        raise SearchSettingsError("nothing to search: denoise and scale are both off")
    if not (math.isfinite(beta_bound) and beta_bound > 0):
        raise SearchSettingsError("beta_bound must be a positive number")


def _denoise_stage(runner: SearchRunner, beta: FloatArray, budget: int, l1: float, cma: dict[str, Any],
                   stages: list[StageResult], described: dict[str, Any]) -> FloatArray:
    """Stage 1: CMA-ES over alpha in [0, 1]^N from alpha = 1, beta fixed (1/N); returns the stage's best
    alpha."""
    n = len(beta)
    ones = np.ones(n)
    # spec section 4: f1(alpha) = CE + l1 * mean(alpha), alpha in [0, 1]^N from alpha = 1
    spec = StageSpec("denoise", "alpha", beta, budget, l1)
    opt = make_cma(ones, np.zeros(n), ones, budget=max(budget, 1), **cma)
    described["denoise"] = opt.describe
    stages.append(runner.run_stage(spec, opt, ones))
    return np.asarray(stages[-1].alpha, dtype=np.float64)


def _scale_stage(runner: SearchRunner, alpha: FloatArray, box: tuple[float, float], budget: int, l1: float,
                 cma: dict[str, Any], stages: list[StageResult], described: dict[str, Any]) -> None:
    """Stage 2: CMA-ES over beta in the box from beta = 1/N, alpha fixed."""
    n = len(alpha)
    uniform = np.full(n, 1.0 / n)
    # spec section 5: f2(beta) = CE + l1 * mean(|beta|), beta in [-1.5, 1.5]^N from beta = 1/N
    spec = StageSpec("scale", "beta", alpha, budget, l1)
    opt = make_cma(uniform, np.full(n, box[0]), np.full(n, box[1]), budget=max(budget, 1), **cma)
    described["scale"] = opt.describe
    stages.append(runner.run_stage(spec, opt, uniform))


def lorahub(
    evaluator: Evaluator,
    n: int,
    *,
    budget: int = DEFAULTS.budget,
    l1: float = DEFAULTS.l1,
    bound: float = BETA_BOUND,
    optimizer: str = DEFAULTS.optimizer,
    seed: int | None = DEFAULTS.seed,
    early_stop: int | None = DEFAULTS.early_stop,
    early_stop_min_delta: float = DEFAULTS.early_stop_min_delta,
    lorahub_loss: LossTerm = DEFAULTS.lorahub_loss,
    lorahub_batch_size: int = DEFAULTS.lorahub_batch_size,
    on_trial: Callable[[Trial], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> SearchResult:
    """LoraHub's search: beta in [-bound, bound]^N from 0, alpha = 1, one candidate at a time.

    Args:
        evaluator, n: as in :func:`evo_merging`.
        budget: evaluations (LoraHub: 40).
        l1: weight of ``mean(|beta|)`` (LoraHub: 0.05).
        bound: the box (LoraHub: 1.5).
        optimizer: a nevergrad registry name (LoraHub: ``"NGOpt"``), run on LoraHub's bounded
            Array with one worker.
        seed: seeds nevergrad's RandomState.
        early_stop: plateau patience, in evaluations here (one candidate per step).
        lorahub_loss: ``"per_example"`` (LoraHub's code: the objective's loss is CE /
            ``lorahub_batch_size``) or ``"token_mean"`` (CE itself, as Evo-Merging).
        lorahub_batch_size: LoraHub's examples per batch (5).
        on_trial, should_stop: as in :func:`evo_merging`.

    Returns:
        A :class:`SearchResult` with one stage, ``"lorahub"``.
    """
    _check(evaluator, n, popsize=2, sigma0=1.0, l1=l1, workers=1, early_stop=early_stop)
    if budget < 0:
        raise SearchSettingsError("budget must be >= 0")
    if optimizer not in ng.optimizers.registry:
        raise SearchSettingsError(f"unknown nevergrad optimizer {optimizer!r}")
    if not (math.isfinite(bound) and bound > 0):
        raise SearchSettingsError("bound must be a positive number")
    if lorahub_loss not in ("per_example", "token_mean") or lorahub_batch_size < 1:
        raise SearchSettingsError("lorahub_loss must be per_example or token_mean, lorahub_batch_size >= 1")
    runner = SearchRunner(evaluator, on_trial=on_trial, should_stop=should_stop,
                          early_stop=early_stop, early_stop_min_delta=early_stop_min_delta)
    zeros, ones = np.zeros(n), np.ones(n)
    opt = make_ngopt(zeros, np.full(n, -bound), np.full(n, bound), budget=max(budget, 1), seed=seed,
                     name=optimizer)
    # LoraHub default_get_loss: sum of batch-mean CEs / number of examples = CE / batch size
    scale = 1.0 / lorahub_batch_size if lorahub_loss == "per_example" else 1.0
    stage = runner.run_stage(StageSpec("lorahub", "beta", ones, budget, l1, scale), opt, zeros)
    settings = {
        "method": "lorahub", "n": n, "budget": budget, "l1": l1, "bound": bound, "optimizer": optimizer,
        "seed": seed, "early_stop": early_stop, "early_stop_min_delta": early_stop_min_delta,
        "lorahub_loss": lorahub_loss, "lorahub_batch_size": lorahub_batch_size, "loss_scale": scale,
        "stages": {"lorahub": opt.describe}, **_versions(),
    }
    return _result("lorahub", runner, [stage], (ones, zeros), settings)


def _check(
    evaluator: Evaluator,
    n: int,
    *,
    popsize: int,
    sigma0: float,
    l1: float,
    workers: int,
    early_stop: int | None,
) -> None:
    if not isinstance(n, int) or n < 1:
        raise SearchSettingsError(f"n must be a positive integer, got {n!r}")
    declared = getattr(evaluator, "n", None)
    if declared is not None and declared != n:
        raise SearchSettingsError(f"the evaluator has n={declared} adapters but n={n} was given")
    if popsize < 2:
        raise SearchSettingsError("popsize must be >= 2")
    if not (math.isfinite(sigma0) and sigma0 > 0):
        raise SearchSettingsError("sigma0 must be a positive number")
    if not (math.isfinite(l1) and l1 >= 0):
        raise SearchSettingsError("l1 must be >= 0")
    if workers < 1:
        raise SearchSettingsError("workers must be >= 1")
    if early_stop is not None and early_stop < 1:
        raise SearchSettingsError("early_stop must be >= 1 (generations) or None")


def _versions() -> dict[str, Any]:
    return {"versions": {name: version(name) for name in ("nevergrad", "cma", "numpy")}}


def _result(
    method: str,
    runner: SearchRunner,
    stages: list[StageResult],
    start: tuple[FloatArray, FloatArray],
    settings: dict[str, Any],
) -> SearchResult:
    inc = runner.incumbent
    if inc is None:  # nothing evaluated (stopped at once, or zero budgets)
        alpha, beta, loss, objective = tuple(start[0].tolist()), tuple(start[1].tolist()), math.nan, math.inf
    else:
        alpha, beta, loss, objective = inc.alpha, inc.beta, inc.loss, inc.objective
    return SearchResult(method, alpha, beta, loss, objective, runner.queries, tuple(stages),
                        tuple(runner.history), runner.stopped, settings)
