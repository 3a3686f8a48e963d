"""Search jobs (`POST /admin/searches`): Evo-Merging or LoraHub against this gateway's merge sessions
or any provider behind a URL; the winner is registered as a servable expert.

Checks that need no provider run before the job (4xx, nothing created): the expert id, and for the
local provider the base, the pool and the validation source. A provider behind a URL is only asked
inside the job; its refusals fail the job with the provider's message.

Registration: with the local provider, the winner is an `evo` merge of the pool registered as a
`lora` expert (lineage: recipe, session, search). With a URL provider the provider materialises it
(its own `materialize`), and this gateway registers a `remote` expert pointing at it, with the same
search lineage and the provider key in the SecretStore. A cancel that lands while the winner is being
registered rolls the local registration back; the job ends `cancelled`, nothing half-registered.
"""

from __future__ import annotations

from typing import Any

from app.protocol.searches import EnsembleSearchRequest, SearchRequest
from app.services.admin import AdminService
from app.services.ensemble_search import EnsembleSearchService
from app.services.remote_admin import RemoteAdminService
from experts.data.datasets import TASKS
from experts.errors import ExpertExistsError, InvalidExpertError, JobCancelledError
from experts.evo.ray_provider import RayProvider
from experts.evo.search_job import HttpProvider, LocalProvider, Progress, SearchSpec, run_search
from experts.evo.sessions import MergeSessionManager
from experts.hf.threads import run_sync
from experts.remote.upstream import RemoteSpec
from experts.repository.jobs import JobContext
from experts.repository.registry import ExpertRecord
from experts.repository.store import check_expert_id
from experts.training.ray_runner import RayRunner

Provider = LocalProvider | RayProvider | HttpProvider


class SearchService:
    def __init__(self, admin: AdminService, manager: MergeSessionManager, remote: RemoteAdminService | None,
                 ensembles: EnsembleSearchService, runner: RayRunner | None = None) -> None:
        self.admin = admin
        self.manager = manager
        self.remote = remote  # registers the winner of a URL provider (None: this gateway cannot)
        self.ensembles = ensembles  # method "ensemble_weights"
        self.repo = admin.repo
        self.runner = runner  # MERGEGATE_RUNNER=ray: local searches evaluate their generations on Ray actors

    def _precheck(self, req: SearchRequest) -> None:
        if req.name is not None:
            check_expert_id(req.name)
            if self.repo.registry.has_expert(req.name):
                raise ExpertExistsError(req.name)
        if req.provider.url is not None:
            if req.name is not None and self.remote is None:
                raise InvalidExpertError("this gateway cannot register remote experts")
            return
        self.manager.resolve_pool(req.base, req.pool if isinstance(req.pool, list) else req.pool.model_dump())
        v = req.validation
        if v.task is not None:
            if v.task not in TASKS:
                raise InvalidExpertError(f"unknown task {v.task!r}; known: {', '.join(TASKS)}")
            self.manager.btm.ensure_corpus(TASKS[v.task].domain)
        elif v.corpus is not None:
            self.manager.btm.ensure_corpus(v.corpus)

    def _provider(self, req: SearchRequest) -> Provider:
        p = req.provider
        if p.url is None and self.runner is not None:
            return RayProvider(self.manager, self.runner)
        if p.url is None:
            return LocalProvider(self.manager, self.admin.runtime.torch)
        key = p.api_key.get_secret_value() if p.api_key is not None else None
        admin_key = p.admin_key.get_secret_value() if p.admin_key is not None else None
        return HttpProvider(p.url, key, admin_key=admin_key, timeout=p.timeout_s, retries=p.retries)

    async def start(self, req: SearchRequest | EnsembleSearchRequest, background: bool) -> tuple[int, dict[str, Any]]:
        if isinstance(req, EnsembleSearchRequest):
            return await self.ensembles.start(req, background)
        await run_sync(self._precheck, req)
        session_body = req.model_dump(include={"base", "pool", "validation", "loss"}, exclude_none=True)
        spec = SearchSpec(session=session_body, settings=req.settings())
        provider = self._provider(req)
        params = req.model_dump(mode="json", exclude={"provider"})
        params["provider"] = {"url": req.provider.url or "local", "timeout_s": req.provider.timeout_s,
                              "retries": req.provider.retries}  # never the key

        def run(ctx: JobContext) -> dict[str, Any]:
            return self._run(ctx, req, spec, provider, params["provider"]["url"])

        job = self.admin.submit(f"search.{req.method}", params, run)
        return await self.admin.finish(job, background)

    def _run(self, ctx: JobContext, req: SearchRequest, spec: SearchSpec, provider: Provider,
             provider_name: str) -> dict[str, Any]:
        last: list[Progress] = []

        def report(p: Progress, force: bool) -> None:
            last[:] = [p]
            ctx.progress(0.97 * p.fraction, p.message(), force=force, detail=p.detail())

        result, view = run_search(provider, spec, on_progress=report, should_stop=lambda: ctx.cancelled)
        session_id = str(view.get("id"))
        try:
            if result.stopped or ctx.cancelled:
                raise JobCancelledError(f"job {ctx.job_id} was cancelled")
            summary = {"job": ctx.job_id, "provider": provider_name, "method": result.method,
                       "alpha": list(result.alpha), "beta": list(result.beta), "loss": result.loss,
                       "objective": result.objective, "queries": result.queries,
                       "stages": list(result.to_dict()["stages"]), "settings": result.settings,
                       "session": {"id": session_id, "n": view.get("n"), "experts": view.get("experts"),
                                   "validation": view.get("validation"), "loss": view.get("loss")}}
            if last:
                ctx.progress(0.97, f"search done: best loss {result.loss:.4f} after {result.queries} queries",
                             force=True, detail=last[0].detail())
            out: dict[str, Any] = {"search": summary}
            if req.name is not None:
                ctx.progress(0.98, f"registering {req.name}", force=True)
                out["expert"] = self._register(ctx, req, provider, session_id, summary)
            return out
        finally:
            provider.close(session_id)

    def _register(self, ctx: JobContext, req: SearchRequest, provider: Provider,
                  session_id: str, summary: dict[str, Any]) -> str:
        name = str(req.name)
        lineage = {"search": summary}
        if isinstance(provider, LocalProvider | RayProvider):
            provider.materialize(session_id, summary["alpha"], summary["beta"], name, tags=req.tags,
                                 domain=req.domain, extra_lineage=lineage)
        else:
            made = provider.materialize(session_id, summary["alpha"], summary["beta"], name, tags=req.tags,
                                        domain=req.domain)
            self._register_remote(name, provider, made, req, lineage)
        if ctx.cancelled:  # cancelled while registering: roll back, leave the repository as it was
            self.repo.delete(name)
            raise JobCancelledError(f"job {ctx.job_id} was cancelled")
        return name

    def _register_remote(self, name: str, provider: HttpProvider, made: dict[str, Any], req: SearchRequest,
                         lineage: dict[str, Any]) -> None:
        """A `remote` expert for the provider's new expert; the key first, then the row (as RemoteAdminService)."""
        assert self.remote is not None  # checked before the job started
        runtime = self.remote.runtime
        spec = RemoteSpec.from_dict({"base_url": provider.url + "/v1", "model": str(made.get("id", name))})
        full = {"op": "search", "provider": provider.url, "provider_expert": made.get("id", name),
                "provider_lineage": made.get("lineage"), **lineage}
        record = ExpertRecord(id=name, kind="remote", status="ready", tags=list(req.tags), domain=req.domain,
                              spec=spec.to_dict(), lineage=full)
        if provider.api_key:
            runtime.secrets.set(name, provider.api_key)
        try:
            self.repo.insert_record(record)
        except BaseException:
            runtime.secrets.delete(name)
            raise
        runtime.reset(name)
