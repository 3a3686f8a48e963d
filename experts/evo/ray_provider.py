"""Search generations split across Ray actors: the merge-session provider of search jobs when
``MERGEGATE_RUNNER=ray`` (docs/scaling.md).

Opening a session starts ``workers`` actors (:class:`experts.training.ray_runner.RayRunner`); each loads
the base and the pool once into its own :class:`~experts.evo.session.MergeSession`, built by the same
:func:`~experts.evo.sessions.load_session` as a local session, from the artifact dirs of the shared data
dir. The validation examples are resolved once here (the gateway's corpora and tasks) and sent to every
actor. A generation (``evaluate_many``: the search runner hands it a whole population) is cut into one
contiguous slice per actor; the slices are evaluated in parallel and the losses come back in candidate
order. A query's loss is a pure function of (alpha, beta), so the losses are those of a local session
(up to float summation order: single-threaded actors against a multi-threaded gateway, well under 1e-5).

The query budget is counted here, as a local session counts it. Cancelling is the search's own: the
runner polls ``should_stop`` between generations. Materialising the winner runs in the gateway (an
``evo`` recipe through :class:`~experts.repository.merges.MergeRunner`, the lineage of a local session's);
closing the session kills its actors.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from experts.evo.options import BudgetExhaustedError, LossOptions, ValidationSpec
from experts.evo.search_job import session_args
from experts.evo.sessions import MergeSessionManager, load_session
from experts.repository.merges import MergeRunner
from experts.training.ray_runner import ActorGroup, RayRunner
from merging.recipe import load_recipe

__all__ = ["RayEvaluator", "RayProvider", "SessionWorker", "split"]

ACTOR_BUDGET = 1 << 40  # the actors' sessions never refuse: the budget is counted by RayEvaluator


class SessionWorker:
    """What one actor holds: a merge session over the pool, loaded once."""

    def __init__(self, session_id: str, base: str, base_dir: str, experts: list[str], adapter_dirs: list[str],
                 examples: list[dict[str, Any]], validation: ValidationSpec, loss: LossOptions, mode: str) -> None:
        self.session = load_session(session_id, base, Path(base_dir), experts, [Path(d) for d in adapter_dirs],
                                    examples, validation=validation, loss=loss, budget=ACTOR_BUDGET, mode=mode)

    def losses(self, pairs: Sequence[tuple[Sequence[float], Sequence[float]]]) -> list[float]:
        """The loss of every (alpha, beta), in order (each checked as a local session checks it)."""
        return [self.session.loss_of(*self.session.check_vectors(a, b)) for a, b in pairs]

    def view(self, _: Any = None) -> dict[str, Any]:
        return self.session.view()


def split(items: Sequence[Any], k: int) -> list[list[Any]]:
    """`items` in `k` contiguous slices of sizes differing by at most one (none empty if k <= len)."""
    q, r = divmod(len(items), k)
    out, start = [], 0
    for i in range(k):
        end = start + q + (1 if i < r else 0)
        out.append(list(items[start:end]))
        start = end
    return out


class RayEvaluator:
    """An Evaluator whose populations are split across the actors of one session."""

    def __init__(self, group: ActorGroup, session_id: str, n: int, budget: int) -> None:
        self.group, self.session_id, self.n, self.budget, self.used = group, session_id, n, budget, 0

    def evaluate(self, alpha: Sequence[float], beta: Sequence[float]) -> float:
        return self.evaluate_many([(alpha, beta)])[0]

    def evaluate_many(self, pairs: Sequence[tuple[Sequence[float], Sequence[float]]]) -> list[float]:
        if self.used + len(pairs) > self.budget:
            raise BudgetExhaustedError(self.session_id, self.budget, self.used, len(pairs))
        slices = split([([float(x) for x in a], [float(x) for x in b]) for a, b in pairs],
                       min(len(self.group), len(pairs)))
        losses = [float(x) for part in self.group.call("losses", slices) for x in part]
        self.used += len(pairs)
        return losses


@dataclass
class _Open:
    base: str
    experts: list[str]
    validation: ValidationSpec
    evaluator: RayEvaluator


class RayProvider:
    """Merge sessions held by Ray actors (see the module docstring)."""

    name = "ray"

    def __init__(self, manager: MergeSessionManager, runner: RayRunner, workers: int | None = None) -> None:
        self.manager, self.runner, self.workers = manager, runner, workers
        self._open: dict[str, _Open] = {}

    def open(self, body: Mapping[str, Any]) -> tuple[RayEvaluator, dict[str, Any]]:
        from transformers import AutoTokenizer  # heavy: on first use

        base, pool, validation, loss, budget = session_args(body)
        validation.check()
        repo = self.manager.repo
        records = self.manager.resolve_pool(base, pool)
        base_dir = repo.artifact_dir(repo.record(base))
        examples = self.manager.examples(validation, AutoTokenizer.from_pretrained(base_dir, local_files_only=True),
                                         loss)
        sid, ids = f"rsess-{uuid.uuid4().hex[:20]}", [r.id for r in records]
        args = (sid, base, str(base_dir), ids, [str(repo.artifact_dir(r)) for r in records], examples, validation,
                loss, self.manager.mode)
        group = self.runner.group(SessionWorker, args, self.workers or self.runner.workers)
        try:
            view = group.call("view", [None])[0]
        except BaseException:
            group.close()
            raise
        view.update(budget=budget, used=0, remaining=budget, runner={"name": "ray", "actors": len(group)})
        evaluator = RayEvaluator(group, sid, len(ids), budget)
        self._open[sid] = _Open(base, ids, validation, evaluator)
        return evaluator, view

    def close(self, session_id: str) -> None:
        found = self._open.pop(session_id, None)
        if found is not None:
            found.evaluator.group.close()

    def materialize(self, session_id: str, alpha: Sequence[float], beta: Sequence[float], name: str, *,
                    tags: Sequence[str] = (), domain: str | None = None,
                    extra_lineage: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Register the merge for (alpha, beta) as a `lora` expert, as a local session does (one query)."""
        s = self._open[session_id]
        experts = [{"id": e, "alpha": float(x), "beta": float(y)}
                   for e, x, y in zip(s.experts, alpha, beta, strict=True)]
        recipe = load_recipe({"method": "evo", "base": s.base, "experts": experts})
        extra = {"session": {"id": session_id, "queries_used": s.evaluator.used + 1,
                             "validation": s.validation.describe()}, **(extra_lineage or {})}
        record = MergeRunner(self.manager.repo).run(recipe, name, tags=list(tags), domain=domain,
                                                    extra_lineage=extra)
        return {"id": record.id, "kind": record.kind, "lineage": record.lineage}
