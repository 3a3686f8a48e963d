"""Merge-session and LoRA-training use-cases. Checks run before any work, so bad input is a 4xx.

Session work is torch work: it runs on the gateway's torch thread(s) (`Runtime.run_torch`, the
generation executor), one hop per batched forward of a population (or per candidate where a session
has no batched path), so a long population does not hold completions back for more than one forward
pass, and no second OpenMP team fights the first.
"""

from __future__ import annotations

from typing import Any

from app.protocol.merge_sessions import LoraTrainRequest, SessionCreateRequest
from app.services.admin import AdminService
from experts.data.datasets import TASKS
from experts.errors import ExpertExistsError, InvalidExpertError
from experts.evo.sessions import LossOptions, MergeSession, MergeSessionManager, ValidationSpec
from experts.hf.threads import run_sync
from experts.repository.jobs import JobContext
from experts.repository.store import check_expert_id
from experts.training.config import TrainConfig
from experts.training.lora import LoraData, LoraSpec, train_lora


def _examples(examples: list[Any] | None) -> tuple[dict[str, Any], ...] | None:
    return None if examples is None else tuple(e.model_dump(exclude_none=True) for e in examples)


class MergeSessionService:
    def __init__(self, admin: AdminService, manager: MergeSessionManager) -> None:
        self.admin = admin
        self.manager = manager
        self.repo = admin.repo

    # -- sessions -----------------------------------------------------------------------------
    async def create(self, req: SessionCreateRequest) -> dict[str, Any]:
        v = req.validation
        spec = ValidationSpec(examples=_examples(v.examples), corpus=v.corpus, task=v.task, split=v.split,
                              max_examples=v.max_examples)
        loss = LossOptions(max_examples=req.loss.max_examples,
                           max_tokens_per_example=req.loss.max_tokens_per_example, append_eos=req.loss.append_eos)
        pool = req.pool.model_dump() if not isinstance(req.pool, list) else req.pool
        session = await self.admin.runtime.run_torch(lambda: self.manager.create(req.base, pool, spec, loss=loss,
                                                                      budget=req.budget))
        return session.view()

    def get(self, session_id: str) -> dict[str, Any]:
        return self.manager.get(session_id).view()

    def delete(self, session_id: str) -> dict[str, Any]:
        self.manager.delete(session_id)
        return {"id": session_id, "object": "merge.session", "deleted": True}

    async def _losses(self, session_id: str,
                      candidates: list[tuple[list[float], list[float]]]) -> tuple[MergeSession, list[float]]:
        """Check every vector, count the queries (429 if they do not all fit), then evaluate: a population
        as one batched run (rows = candidates x examples), one batched forward per torch hop; a single
        candidate (or a session without the batched path) one candidate per hop. Queries not evaluated (an
        error, a client gone) are refunded."""
        s = self.manager.get(session_id)
        with s.population(candidates) as pop:
            while not pop.done:
                await self.admin.runtime.run_torch(pop.step)
            losses = pop.losses()
        return s, losses

    async def evaluate(self, session_id: str, alpha: list[float], beta: list[float]) -> dict[str, Any]:
        s, losses = await self._losses(session_id, [(alpha, beta)])
        return {"loss": losses[0], "queries_used": s.used, "queries_left": s.remaining}

    async def evaluate_batch(self, session_id: str,
                             candidates: list[tuple[list[float], list[float]]]) -> dict[str, Any]:
        s, losses = await self._losses(session_id, candidates)
        return {"losses": losses, "queries_used": s.used, "queries_left": s.remaining}

    async def materialize(self, session_id: str, alpha: list[float], beta: list[float], name: str,
                          tags: list[str], domain: str | None) -> dict[str, Any]:
        s = self.manager.get(session_id)
        s.check_vectors(alpha, beta)
        check_expert_id(name)
        if self.repo.registry.has_expert(name):
            raise ExpertExistsError(name)
        record = await self.admin.runtime.run_torch(lambda: self.manager.materialize(session_id, alpha, beta, name,
                                                                          tags=tags, domain=domain))
        return self.admin.describe(record.id)

    # -- LoRA training ------------------------------------------------------------------------
    async def train_lora(self, req: LoraTrainRequest, background: bool) -> tuple[int, dict[str, Any]]:
        check_expert_id(req.id)
        if self.repo.registry.has_expert(req.id):
            raise ExpertExistsError(req.id)
        base = self.repo.record(req.base)  # 404 before the job
        if base.kind != "local":
            raise InvalidExpertError(f"the base of a LoRA adapter must be a local expert; {req.base!r} is "
                                     f"{base.kind}")
        d = req.data
        data = LoraData(corpus=d.corpus, part=tuple(d.part) if d.part else None, task=d.task,
                        examples=_examples(d.examples), validation=_examples(d.validation))
        data.check()
        btm = self.manager.btm
        if d.corpus is not None:
            await run_sync(btm.ensure_corpus, d.corpus)  # unknown / unavailable corpus -> 400 now
        if d.task is not None:
            await run_sync(btm.ensure_corpus, TASKS[d.task].domain)
        targets = tuple(req.lora.target_modules) if req.lora.target_modules else None
        lora = LoraSpec(req.lora.r, req.lora.lora_alpha, targets)
        budget = req.budget.config(TrainConfig.lora)

        def run(ctx: JobContext) -> dict[str, Any]:
            r = train_lora(self.repo, req.id, req.base, data, lora=lora, budget=budget, btm=btm,
                           tags=req.tags, domain=req.domain, progress=ctx.progress,
                           should_stop=lambda: ctx.cancelled)
            t = r.lineage["train"]
            return {"expert": r.id, "initial_val_loss": t["initial_val_loss"],
                    "final_val_loss": t["final_val_loss"]}

        params = req.model_dump(exclude={"data"})
        params["data"] = data.describe()
        job = self.admin.submit("lora.train", params, run)
        return await self.admin.finish(job, background)
