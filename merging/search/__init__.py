"""Black-box merge search: the optimiser side of Evo-Merging (and the LoraHub baseline).

The search only ever sees an :class:`Evaluator` (a loss per (alpha, beta) candidate): the
in-process provider or :class:`experts.evo.http.HttpEvaluator` to any MergeGate-style
provider. No weights, no I/O here.

Modules: :mod:`~merging.search.result` (Evaluator, Trial, SearchResult),
:mod:`~merging.search.optimizers` (the nevergrad parametrisations, and why),
:mod:`~merging.search.runner` (ask/evaluate/tell, budgets, stopping, incumbent),
:mod:`~merging.search.algorithms` (:func:`evo_merging`, :func:`lorahub`),
:mod:`~merging.search.weights` (:func:`weight_search`: ensemble weights in [0, 1]^N),
:mod:`~merging.search.baselines` (:func:`baseline`: uniform, task arithmetic, best single adapter),
:mod:`~merging.search.settings` (:class:`SearchSettings`: every setting of the searches and baselines,
declared once; the API and the CLI derive theirs from it),
:mod:`~merging.search.dispatch` (:func:`run_method`: run the method a :class:`SearchSettings` names).

Example::

    result = evo_merging(evaluator, n=20, budget_stage1=400, budget_stage2=800, seed=42)
    result.alpha, result.beta, result.loss, result.queries
"""

from merging.search.algorithms import SearchSettingsError, evo_merging, lorahub
from merging.search.baselines import BASELINES, baseline
from merging.search.dispatch import METHOD_FUNCTIONS, run_method
from merging.search.result import Evaluator, HistoryPoint, SearchResult, StageResult, Trial
from merging.search.settings import DEFAULTS, MAX_QUERIES, SearchSettings
from merging.search.weights import weight_search

__all__ = [
    "BASELINES",
    "DEFAULTS",
    "MAX_QUERIES",
    "METHOD_FUNCTIONS",
    "Evaluator",
    "HistoryPoint",
    "SearchResult",
    "SearchSettings",
    "SearchSettingsError",
    "StageResult",
    "Trial",
    "baseline",
    "evo_merging",
    "lorahub",
    "run_method",
    "weight_search",
]
