"""`POST /admin/searches` with `"method": "ensemble_weights"`: a black-box ensemble's weights, searched
through API calls only (:mod:`experts.blackbox.weight_search`), as a job of the same kind as merge searches.

Before the job (4xx, nothing started): the ensemble exists and is a black-box ensemble, the objective fits
its mode, the validation examples load. In the job: every member call happens once (`collect`, on the
gateway's event loop, where the remote members' pooled client lives), then the search runs on numbers
only, with the same live `detail` as merge searches. The weights found are saved on the ensemble (one
registry write) if they beat its current weights on the objective (`apply`), so a search never makes an
ensemble worse on its own validation data.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
from typing import Any

from app.protocol.searches import EnsembleSearchRequest
from app.services.admin import AdminService
from experts.blackbox.spec import BlackBoxSpec, is_blackbox, update_blackbox
from experts.blackbox.weight_search import (
    DEFAULT_OBJECTIVE,
    OBJECTIVES,
    collect,
    new_weights,
    ordered_weights,
    search_ensemble_weights,
)
from experts.btm.operations import BTM
from experts.data.datasets import TASKS, load_task
from experts.errors import InvalidExpertError, JobCancelledError
from experts.evo.search_job import Progress
from experts.hf.threads import run_sync
from experts.repository.jobs import JobContext

DEFAULT_TASK_EXAMPLES = 32


def _examples(svc: EnsembleSearchService, req: EnsembleSearchRequest) -> tuple[str, list[dict[str, Any]]]:
    """(the ensemble's mode, the validation examples); raises the 4xx errors."""
    record = svc.repo.record(req.ensemble)  # 404
    if not is_blackbox(record):
        raise InvalidExpertError(f"expert {req.ensemble!r} is not a black-box ensemble (an ensemble with a mode)")
    mode = BlackBoxSpec.from_dict(record.spec).mode
    objective = req.objective or DEFAULT_OBJECTIVE[mode]
    if objective not in OBJECTIVES[mode]:
        raise InvalidExpertError(f"objective {objective!r} does not apply to a {mode} ensemble; use one of "
                                 f"{', '.join(OBJECTIVES[mode])}")
    v = req.validation
    if v.examples is not None:
        examples = [e.model_dump(exclude_none=True) for e in v.examples][:v.max_examples]
    else:
        task = str(v.task)
        if task not in TASKS:
            raise InvalidExpertError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
        btm = svc.btm
        btm.ensure_corpus(TASKS[task].domain)
        examples = load_task(btm, task, v.split, v.max_examples or DEFAULT_TASK_EXAMPLES)
    if not examples:
        raise InvalidExpertError("no validation examples")
    return mode, examples


class EnsembleSearchService:
    def __init__(self, admin: AdminService, btm: BTM) -> None:
        self.admin = admin
        self.repo = admin.repo
        self.btm = btm  # builds the corpora of task validation sets

    async def start(self, req: EnsembleSearchRequest, background: bool) -> tuple[int, dict[str, Any]]:
        mode, examples = await run_sync(_examples, self, req)
        params = req.model_dump(mode="json")
        params["mode"] = mode
        loop = asyncio.get_running_loop()

        def run(ctx: JobContext) -> dict[str, Any]:
            return _run(ctx, self, req, examples, loop)

        job = self.admin.submit("search.ensemble_weights", params, run)
        return await self.admin.finish(job, background)


def _collect(ctx: JobContext, svc: EnsembleSearchService, req: EnsembleSearchRequest, examples: list[dict[str, Any]],
             loop: asyncio.AbstractEventLoop) -> Any:
    """Run `collect` on the gateway's loop; a cancel stops it (in-flight calls are cancelled)."""
    ensemble = svc.repo.get(req.ensemble)
    future = asyncio.run_coroutine_threadsafe(
        collect(ensemble, examples, objective=req.objective, max_tokens=req.max_tokens, stop=tuple(req.stop)), loop)
    while True:
        try:
            return future.result(timeout=0.25)
        except concurrent.futures.TimeoutError:
            if ctx.cancelled:
                future.cancel()
                raise JobCancelledError(f"job {ctx.job_id} was cancelled") from None


def _num(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _run(ctx: JobContext, svc: EnsembleSearchService, req: EnsembleSearchRequest, examples: list[dict[str, Any]],
         loop: asyncio.AbstractEventLoop) -> dict[str, Any]:
    ctx.progress(0.0, f"collecting member scores on {len(examples)} examples", force=True)
    table = _collect(ctx, svc, req, examples, loop)
    progress = Progress(req.budget)
    progress.session = {"ensemble": req.ensemble, "members": list(table.members), "calls": table.calls}

    def on_trial(t: Any) -> None:
        first = progress.stage is None
        progress.add(t)
        ctx.progress(0.05 + 0.9 * progress.fraction, progress.message(), force=first, detail=progress.detail())

    result = search_ensemble_weights(table, objective=req.objective, method=req.optimizer, budget=req.budget,
                                     seed=req.seed, popsize=req.popsize, sigma0=req.sigma0, l1=req.l1,
                                     start=req.start, early_stop=req.early_stop, on_trial=on_trial,
                                     should_stop=lambda: ctx.cancelled)
    if result.stopped or ctx.cancelled:
        raise JobCancelledError(f"job {ctx.job_id} was cancelled")
    weights = new_weights(result, table)
    baseline = result.settings["baseline_loss"]
    better = result.loss < baseline["current"]
    applied = req.apply == "always" or (req.apply == "if_better" and better)
    ctx.progress(0.97, f"best {table.objective} {result.loss:.4f} (current weights: {baseline['current']:.4f})",
                 force=True, detail=progress.detail())
    if applied:
        spec = BlackBoxSpec.from_dict(svc.repo.record(req.ensemble).spec)
        update_blackbox(svc.repo, req.ensemble, weights=ordered_weights(spec, weights))
    summary = result.to_dict()
    summary.pop("history")
    return {"expert": req.ensemble, "weights": weights, "objective": table.objective, "loss": _num(result.loss),
            "baseline_loss": {k: _num(v) for k, v in baseline.items()}, "improved": better, "applied": applied,
            "calls": table.calls, "usage": table.usage, "search": summary}
