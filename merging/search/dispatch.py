"""Every search method by name, and :func:`run_method`: run the method a :class:`SearchSettings` names.

A job or a CLI holds one :class:`~merging.search.settings.SearchSettings`; this turns it into the
call of :func:`~merging.search.algorithms.evo_merging`, :func:`~merging.search.algorithms.lorahub`
or :func:`~merging.search.baselines.baseline` with :meth:`SearchSettings.arguments`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from merging.search.algorithms import evo_merging, lorahub
from merging.search.baselines import baseline
from merging.search.result import Evaluator, SearchResult, Trial
from merging.search.settings import BASELINES, SearchSettings

__all__ = ["METHOD_FUNCTIONS", "run_method"]

METHOD_FUNCTIONS: Final[dict[str, Callable[..., SearchResult]]] = {
    "evo_merging": evo_merging, "lorahub": lorahub, **dict.fromkeys(BASELINES, baseline)}


def run_method(evaluator: Evaluator, n: int, settings: SearchSettings, *,
               on_trial: Callable[[Trial], None] | None = None,
               should_stop: Callable[[], bool] | None = None) -> SearchResult:
    """Run `settings.method` on `n` adapters with the keywords `settings.arguments()`."""
    function: Any = METHOD_FUNCTIONS[settings.method]
    return function(evaluator, n, on_trial=on_trial, should_stop=should_stop, **settings.arguments())
