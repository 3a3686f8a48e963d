"""The settings of a black-box merge search, declared once.

:class:`SearchSettings` holds every setting of the searches (Evo-Merging, LoraHub) and of the
black-box baselines: its name, type, default, bounds, a one-line help and the methods that use it
(with the method's keyword for it, when that differs from the setting's name). Everything else is
derived from this declaration:

* the algorithms' keyword defaults (:func:`~merging.search.algorithms.evo_merging`,
  :func:`~merging.search.algorithms.lorahub`, :func:`~merging.search.baselines.baseline` read
  :data:`DEFAULTS`) and :meth:`SearchSettings.arguments` (the keywords of the chosen method);
* the API's request model (``app.protocol.searches``: one pydantic field per setting, with the
  default, the bounds as constraints and the help as description);
* the ``mergegate search`` flags (``app.cli_search``: ``--budget-stage1``, ``--no-denoise``, ...).

This module imports nothing from the rest of the package, so every other module can import it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Final, Literal

__all__ = ["BASELINES", "BETA_BOUND", "DEFAULTS", "DEFAULT_LAMBDAS", "MAX_QUERIES", "METHODS", "SEARCHES",
           "LossTerm", "Method", "SearchSettings", "Selection"]

Method = Literal["evo_merging", "lorahub", "uniform", "task_arithmetic", "best_single"]
Selection = Literal["shared", "last_stage"]
LossTerm = Literal["per_example", "token_mean"]
SEARCHES: Final = ("evo_merging", "lorahub")
BASELINES: Final = ("uniform", "task_arithmetic", "best_single")
METHODS: Final = SEARCHES + BASELINES
MAX_QUERIES: Final = 20_000  # cap on any search budget (evaluations)
DEFAULT_LAMBDAS: Final[tuple[float, ...]] = (0.05, 0.1, 0.3, 0.5, 0.7, 1.0)
BETA_BOUND: Final = 1.5  # beta's box [-1.5, 1.5]: the merge sessions' range, not a setting

_EVO, _HUB = ("evo_merging",), ("lorahub",)


def _setting(default: Any, doc: str, methods: tuple[str, ...], *, keyword: Mapping[str, str] | None = None,
             **bounds: Any) -> Any:
    """A field of :class:`SearchSettings`: its default, and as metadata (what the API and CLI read):

    * ``help``: one line for the API description and the CLI help;
    * ``methods``: the methods whose function takes the setting;
    * ``keyword``: method -> the function's keyword, where it is not the setting's name;
    * ``bounds``: pydantic-style constraints (ge, gt, le, min_length, max_length), checked at the API
      (the algorithms check what they need themselves).
    """
    meta = {"help": doc, "methods": methods, "keyword": dict(keyword or {}), "bounds": bounds}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class SearchSettings:
    """How to search: the method and its settings (each documented by the `help` of its metadata).

    Details of the Evo-Merging settings (see :func:`~merging.search.algorithms.evo_merging`):

    * budgets: evaluations per stage (paper: 400, 800); a skipped stage spends nothing, so give an
      ablation the whole budget through the stage it keeps;
    * popsize: a CMA generation, evaluated as one population; sigma0: CMA's initial step in value
      units (see :mod:`merging.search.optimizers`); seed: seeds each stage's CMA (the authors use 42
      for both), same seed, same result;
    * l1: weight of ``mean(|x|)`` of the stage's vector in the objective;
    * early_stop: end a stage after this many generations (LoraHub: evaluations) without an
      improvement of its best objective by more than early_stop_min_delta (None: budgets only);
    * selection: ``"shared"`` (the authors' code): one best-ever candidate by objective across both
      stages, so a stage-2 candidate replaces stage 1's best only if its objective is lower, else
      beta stays 1/N; ``"last_stage"``: the best of the last stage that ran, unconditionally;
    * stage1_beta: beta during stage 1 (None: 1/N, the paper's uniform weights; a number: an
      ablation that gives stage 1 a merged update large enough to move the loss).

    LoraHub's loss term (``lorahub_loss``): LoraHub's ``default_get_loss`` sums the batch-mean CE of
    its batches and divides by the number of examples, i.e. (mean CE) / batch size for equal batches
    (its few-shot set is 5 examples in one batch: CE / 5), so its L1 term weighs batch-size times more
    against the loss than in Evo-Merging. ``"per_example"`` (default, LoraHub's code) optimises
    ``CE / lorahub_batch_size + l1 * mean(|beta|)``; ``"token_mean"`` optimises ``CE + l1 *
    mean(|beta|)`` as Evo-Merging does. The reported loss is the session's CE either way.
    """

    method: Method = _setting(
        "evo_merging", "evo_merging or lorahub (searches), or a black-box baseline: uniform (beta = 1/N), "
        "task_arithmetic (beta = lambda for all, best lambda of `lambdas`), best_single (the best adapter "
        "alone)", BASELINES, keyword=dict.fromkeys(BASELINES, "name"))
    seed: int | None = _setting(42, "Seeds the optimisers: same request and seed, same result", SEARCHES)
    budget_stage1: int = _setting(400, "Evo stage 1 (alpha) evaluations", _EVO, ge=0, le=MAX_QUERIES)
    budget_stage2: int = _setting(800, "Evo stage 2 (beta) evaluations", _EVO, ge=0, le=MAX_QUERIES)
    budget: int = _setting(40, "LoraHub evaluations", _HUB, ge=1, le=MAX_QUERIES)
    popsize: int = _setting(20, "CMA-ES population (a generation)", _EVO, ge=2, le=1000)
    sigma0: float = _setting(0.05, "CMA-ES initial step, in value units", _EVO, gt=0, le=10)
    l1: float = _setting(0.05, "Weight of mean(|x|) in the objective", SEARCHES, ge=0, le=100)
    early_stop: int | None = _setting(
        None, "End a stage after this many generations without improvement", SEARCHES, ge=1)
    early_stop_min_delta: float = _setting(
        0.0, "Improvement of the best objective that resets the early_stop count", SEARCHES, ge=0)
    denoise: bool = _setting(True, "Run stage 1 (False: alpha = 1; ablation)", _EVO)
    scale: bool = _setting(True, "Run stage 2 (False: beta = 1/N; ablation)", _EVO)
    negative: bool = _setting(True, "Allow beta < 0 (False: beta in [0, 1.5]; ablation)", _EVO)
    selection: Selection = _setting(
        "shared", "shared: best-ever candidate across stages (authors' code); last_stage: the last stage's "
        "best", _EVO)
    stage1_beta: float | None = _setting(
        None, "Evo stage 1's fixed beta (None: 1/N, the paper; ablation)", _EVO, ge=-1.5, le=1.5)
    optimizer: str = _setting("NGOpt", "LoraHub's nevergrad optimizer", _HUB)
    lorahub_loss: LossTerm = _setting(
        "per_example", "LoraHub's loss term: per_example (its code: CE / lorahub_batch_size) or token_mean "
        "(CE, as Evo-Merging)", _HUB)
    lorahub_batch_size: int = _setting(
        5, "Examples per batch in LoraHub's per_example loss (its few-shot batch: 5)", _HUB, ge=1, le=100_000)
    lambdas: tuple[float, ...] = _setting(
        DEFAULT_LAMBDAS, "task_arithmetic: the lambdas tried (each in [-1.5, 1.5])", BASELINES,
        min_length=1, max_length=100)

    def arguments(self) -> dict[str, Any]:
        """Keyword arguments of the method's function (everything but the evaluator, n and callbacks)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if self.method in f.metadata["methods"]:
                out[f.metadata["keyword"].get(self.method, f.name)] = getattr(self, f.name)
        return out

    def queries(self, n: int) -> int:
        """Evaluations the method may spend on a pool of `n` adapters (a skipped Evo stage spends none)."""
        if self.method == "uniform":
            return 1
        if self.method == "task_arithmetic":
            return len(self.lambdas)
        if self.method == "best_single":
            return n
        if self.method == "lorahub":
            return self.budget
        return self.budget_stage1 * self.denoise + self.budget_stage2 * self.scale


DEFAULTS: Final = SearchSettings()

