"""The nevergrad optimisers behind the searches, parametrised so that they behave as the
released code intends.

**CMA-ES (Evo-Merging).** The authors run pycma ``CMAEvolutionStrategy(x0, sigma0=0.05,
{"popsize": 20, "bounds": [lo, hi]})``. nevergrad's bounded ``ng.p.Array(lower=, upper=)``
would silently shrink that step (``ParametrizedCMA`` multiplies ``scale`` by 0.3, or 0.15
from dimension 18, for fully bounded parametrisations, and by the Array's own sigma
(hi - lo) / 6: a first-generation spread of ~0.001 instead of 0.05). So :func:`make_cma`
uses:

* an **unbounded** ``ng.p.Array(shape=(dim,)).set_mutation(sigma=1.0)`` that holds the
  *displacement* d from x0 (its init is 0), so nevergrad's standardized space is d itself and
  ``ParametrizedCMA`` adds no multiplier: ``scale=sigma0`` is pycma's sigma0 in value units;
* the bounds handed to pycma itself (``inopts["bounds"] = [lo - x0, hi - x0]``), i.e. pycma's
  default ``BoundTransform``, as in the authors' code. Samples are mapped into the box by
  pycma's linear-quadratic fold, not clipped, and pycma keeps the unfolded genotype for its
  update;
* the evaluated point is ``clip(x0 + d, lo, hi)``; the clip only absorbs rounding (d is
  already inside ``[lo - x0, hi - x0]``), so the evaluated point is the point told.

Keeping init at 0 makes nevergrad's round trip value -> standardized data exact, so pycma
finds each told solution in its archive and updates with the genotype it sampled (with
``init=x0`` the round trip is off by an ulp and pycma falls back to inverting the fold).

At x0 = 1 on alpha's upper bound, half of each first-generation coordinate's samples fall
beyond the bound and are folded back: keep fractions lie in about [0.86, 1) with mean ~0.989
and per-coordinate spread ~0.015, exactly pycma's behaviour for the authors' settings; the
interior start of stage 2 (beta = 1/N) shows the full 0.05 spread. pycma's margin widths
depend on |lo| and |hi|, so shifting by x0 leaves them unchanged for alpha in [0, 1] and moves
them by at most 0.05/N for beta's +-1.5 box (irrelevant away from the edges).

nevergrad switches one-dimensional CMA to fcmaes (not a dependency), so N = 1 is searched in
two dimensions whose second coordinate is ignored.

**NGOpt (LoraHub).** Exactly LoraHub's ``ng.p.Array(init=0, lower=-b, upper=b)`` with
``ng.optimizers.NGOpt`` and one worker; note that in nevergrad 1.0.12 NGOpt picks Cobyla
here, not CMA-ES.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import nevergrad as ng
import numpy as np
import numpy.typing as npt

with warnings.catch_warnings():  # nevergrad imports pycma lazily; pycma warns about matplotlib once
    warnings.simplefilter("ignore")
    import cma  # noqa: F401

__all__ = ["StageOptimizer", "cma_stop_reason", "make_cma", "make_ngopt", "release"]

FloatArray = npt.NDArray[np.float64]


@dataclass(slots=True)
class StageOptimizer:
    """A nevergrad optimiser with the map from its candidates to evaluated vectors.

    Args:
        optimizer: the nevergrad optimiser (ask/tell).
        decode: candidate -> the vector to evaluate (length N, inside the bounds).
        popsize: candidates asked before telling (one generation).
        describe: JSON-able description for ``SearchResult.settings``.
    """

    optimizer: Any
    decode: Callable[[Any], FloatArray]
    popsize: int
    describe: dict[str, Any]


def _random_state(seed: int | None) -> np.random.RandomState:
    return np.random.RandomState(seed)


def make_cma(
    x0: FloatArray,
    lower: FloatArray,
    upper: FloatArray,
    *,
    budget: int,
    popsize: int = 20,
    sigma0: float = 0.05,
    seed: int | None = None,
) -> StageOptimizer:
    """CMA-ES that behaves like ``cma.CMAEvolutionStrategy(x0, sigma0, {popsize, bounds})``.

    Args:
        x0: start point (N,), inside ``[lower, upper]`` (may sit on a bound).
        lower, upper: box bounds (N,).
        budget: evaluations allowed (nevergrad's budget).
        popsize: CMA population (candidates per generation).
        sigma0: initial step in value units.
        seed: seeds nevergrad's RandomState, whose ``randn`` pycma samples with.

    Returns:
        A :class:`StageOptimizer` whose ``decode`` gives ``clip(x0 + d, lower, upper)``.
    """
    n = x0.shape[0]
    dim = max(n, 2)  # nevergrad runs dimension 1 through fcmaes
    pad = np.zeros(dim - n)
    lo = np.concatenate([lower - x0, pad - 1.0])
    hi = np.concatenate([upper - x0, pad + 1.0])
    param = ng.p.Array(shape=(dim,)).set_mutation(sigma=1.0)
    param.random_state = _random_state(seed)
    bounds = [lo.tolist(), hi.tolist()]
    config = ng.optimizers.ParametrizedCMA(popsize=popsize, scale=sigma0, inopts={"bounds": bounds})
    opt = config(parametrization=param, budget=budget, num_workers=1)

    def decode(candidate: Any) -> FloatArray:
        d = np.asarray(candidate.value, dtype=np.float64)[:n]
        return np.clip(x0 + d, lower, upper)

    describe = {
        "optimizer": "ParametrizedCMA",
        "popsize": popsize,
        "sigma0": sigma0,
        "parametrization": "Array(shape=(dim,)).set_mutation(sigma=1.0) holding x - x0",
        "bounds": "pycma BoundTransform via inopts, [lower - x0, upper - x0]",
        "x0": x0.tolist(),
        "lower": lower.tolist(),
        "upper": upper.tolist(),
        "dimension": dim,
    }
    return StageOptimizer(opt, decode, popsize, describe)


def make_ngopt(
    x0: FloatArray,
    lower: FloatArray,
    upper: FloatArray,
    *,
    budget: int,
    seed: int | None = None,
    name: str = "NGOpt",
) -> StageOptimizer:
    """LoraHub's optimiser: NGOpt on a bounded Array, one candidate at a time.

    Args:
        x0: init (N,) (LoraHub: zeros).
        lower, upper: bounds (N,) (LoraHub: -1.5, 1.5), handled by nevergrad's bounded Array.
        budget: evaluations (LoraHub: 40); NGOpt picks its algorithm from it.
        seed: seeds nevergrad's RandomState.
        name: nevergrad registry name of the optimiser (LoraHub: ``"NGOpt"``).
    """
    param = ng.p.Array(init=x0.copy(), lower=lower.copy(), upper=upper.copy())
    param.random_state = _random_state(seed)
    opt = ng.optimizers.registry[name](parametrization=param, budget=budget, num_workers=1)

    def decode(candidate: Any) -> FloatArray:
        return np.clip(np.asarray(candidate.value, dtype=np.float64), lower, upper)

    inner = getattr(opt, "optim", None)  # what NGOpt-style meta-optimisers pick
    describe = {
        "optimizer": name,
        "selected": getattr(inner, "name", name),
        "parametrization": "Array(init=x0, lower, upper)",
        "x0": x0.tolist(),
        "lower": lower.tolist(),
        "upper": upper.tolist(),
    }
    return StageOptimizer(opt, decode, 1, describe)


def cma_stop_reason(optimizer: Any) -> str | None:
    """pycma's termination conditions if they fired, else None.

    nevergrad would silently restart CMA from x0 on its next ``ask``; the authors' loop
    (``while not es.stop()``) ends the stage instead, and so do we. Reads nevergrad's private
    ``_es`` (the pycma instance), if there is one.
    """
    es = getattr(optimizer, "_es", None)
    if es is None:
        return None
    conditions = es.stop()
    return ",".join(sorted(conditions)) if conditions else None


def release(optimizer: Any) -> None:
    """Stop the helper thread of nevergrad's recast optimisers (Cobyla, SQP, ...).

    Those optimisers run scipy in a thread that blocks waiting for the next ``tell``; one left
    waiting (budget not used up, search stopped) keeps the interpreter from exiting.
    """
    seen: set[int] = set()
    todo = [optimizer]
    while todo:
        opt = todo.pop()
        if opt is None or id(opt) in seen:
            continue
        seen.add(id(opt))
        thread = getattr(opt, "_messaging_thread", None)
        if thread is not None:
            thread.stop()
        todo.append(getattr(opt, "_optim", None))
        todo.extend(getattr(opt, "optimizers", None) or [])
