"""The application factory. State is created in the lifespan and owned by the app.

Run with `mergegate serve`, or `uvicorn app.main:create_app --factory`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
from fastapi import FastAPI

from app.auth import Authenticator
from app.errors import install_error_handlers
from app.metrics import Metrics
from app.middleware import GatewayMiddleware
from app.openapi import install_openapi
from app.redaction import RedactionMiddleware, install_redaction
from app.routers import (
    admin_blackbox,
    admin_btm,
    admin_experts,
    admin_jobs,
    admin_lineage,
    admin_merges,
    admin_orphans,
    admin_remote,
    admin_searches,
    completions,
    console,
    health,
    merge_sessions,
    model_list,
)
from app.services.admin import AdminService
from app.services.blackbox import BlackBoxService
from app.services.btm import BTMService
from app.services.completions import CompletionService
from app.services.demo import DemoService
from app.services.ensemble_search import EnsembleSearchService
from app.services.merge_sessions import MergeSessionService
from app.services.merges import MergeService
from app.services.proxy import ProxyService
from app.services.remote_admin import RemoteAdminService
from app.services.searches import SearchService
from app.settings import Settings, resolve_admin_key
from experts.btm.operations import BTM
from experts.evo.sessions import MergeSessionManager
from experts.hf.engine.batch import Limits
from experts.remote.breaker import STATE_CODES
from experts.repository.jobs import JobService
from experts.repository.replicas import Heartbeat
from experts.repository.repo import ExpertRepository
from experts.runtime import Runtime, open_repository
from experts.training.ray_runner import RayRunner

log = logging.getLogger("mergegate")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights never come from a hub at run time
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DESCRIPTION = """A model-merging gateway: a repository of expert LMs served through the OpenAI API.

* `/v1/*` is OpenAI-compatible (use the official `openai` client with `base_url=http://HOST:PORT/v1`).
* `/admin/*` needs the admin key (`Authorization: Bearer <key>`).
* Errors always use the OpenAI envelope `{"error": {"message", "type", "param", "code"}}`.
"""


@dataclass
class Services:
    """Everything long-lived, built in the lifespan from the settings; routers get them through app.deps."""

    settings: Settings
    runtime: Runtime
    repo: ExpertRepository
    jobs: JobService
    auth: Authenticator
    completions: CompletionService
    admin: AdminService
    merges: MergeService
    btm: BTMService
    merge_sessions: MergeSessionService
    remote_admin: RemoteAdminService
    searches: SearchService
    blackbox: BlackBoxService
    heartbeat: Heartbeat
    demo: DemoService | None = None  # `mergegate demo`: builds the demo repository in the background

    def close(self) -> None:
        self.heartbeat.stop()
        self.jobs.shutdown()
        self.repo.close()
        self.runtime.close()


def build_services(settings: Settings, metrics: Metrics, http: httpx.AsyncClient) -> Services:
    """Construct every service from what it needs, in dependency order."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    admin_key, client_keys = resolve_admin_key(settings), [k.get_secret_value() for k in settings.api_keys]
    install_redaction(admin_key, *client_keys)  # before anything can log or answer
    limits = Limits(max_batch_size=settings.max_batch_size, max_batched_tokens=settings.max_batched_tokens,
                    max_queue=settings.max_queue, admit_window_s=settings.admit_window_ms / 1000,
                    gpt2_kernel=settings.gpt2_kernel)
    runtime = Runtime(limits=limits, observer=metrics, http=http, secrets_dir=settings.data_dir / "secrets",
                      engine_threads=settings.engine_threads or None)
    repo = open_repository(settings.data_dir, database_url=settings.db_url, runtime=runtime,
                           max_loaded_models=settings.max_loaded_models, max_loaded_bytes=settings.max_loaded_bytes,
                           default_dtype=settings.default_dtype, rebind=settings.rebind_registry)
    replica = repo.replica
    assert replica is not None
    jobs = JobService(repo.registry, owner=replica.id, workers=settings.job_workers, lease_s=settings.job_lease_s,
                      is_dead=replica.is_dead)
    jobs.recover()
    heartbeat = Heartbeat([jobs.heartbeat, jobs.reap, repo.sync], settings.heartbeat_s)  # started by the lifespan
    assert runtime.remote is not None
    admin = AdminService(repo, jobs, runtime, metrics, max_upload_bytes=settings.max_upload_bytes,
                         max_concurrent_uploads=settings.max_concurrent_uploads, fault_pause=settings.fault_pause)
    runner = RayRunner(settings.ray_address, workers=settings.ray_workers) if settings.runner == "ray" else None
    btm = BTM(repo, settings.data_dir, settings.corpus_bytes, runner=runner)
    manager = MergeSessionManager(repo, btm=btm, max_sessions=settings.max_merge_sessions)
    remote_admin = RemoteAdminService(repo, runtime.remote)
    blackbox = BlackBoxService(repo, runtime, metrics)
    completions = CompletionService(repo, runtime, metrics, proxy=ProxyService(repo, metrics), blackbox=blackbox,
                                    max_n=settings.max_n)
    return Services(
        settings=settings, runtime=runtime, repo=repo, jobs=jobs,
        auth=Authenticator(admin_key, client_keys, metrics=settings.metrics),
        completions=completions, admin=admin, merges=MergeService(admin), btm=BTMService(admin, btm),
        merge_sessions=MergeSessionService(admin, manager), remote_admin=remote_admin,
        searches=SearchService(admin, manager, remote_admin, EnsembleSearchService(admin, btm), runner=runner),
        blackbox=blackbox,
        heartbeat=heartbeat,
        demo=DemoService(admin, quick=settings.demo == "quick") if settings.demo != "off" else None)


def _install_refreshers(metrics: Metrics, services: Services) -> None:
    repo, remote = services.repo, services.runtime.remote

    def refresh() -> None:
        loaded = repo.cache.loaded()
        metrics.loaded_models.set(len(loaded))
        metrics.loaded_bytes.set(sum(loaded.values()))
        metrics.set_adapter_cache(repo.adapters.stats())
        metrics.remote_breaker.clear()  # deleted experts drop out
        if remote is not None:
            for expert_id, state in remote.breaker_states().items():
                metrics.remote_breaker.labels(expert_id).set(STATE_CODES[state])

    metrics.add_refresher(refresh)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        limits = httpx.Limits(max_connections=settings.remote_max_connections,
                              max_keepalive_connections=settings.remote_max_keepalive)
        http = httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(60.0, connect=5.0), follow_redirects=False)
        services = build_services(settings, app.state.metrics, http)
        services.heartbeat.start()
        _install_refreshers(app.state.metrics, services)
        app.state.services = services
        if services.demo is not None:
            services.demo.start()
        log.info("MergeGate ready: data dir %s, registry %s", settings.data_dir, settings.db_url.split("://")[0])
        try:
            yield
        finally:
            await http.aclose()
            services.close()

    app = FastAPI(title="MergeGate", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.metrics = Metrics()
    install_error_handlers(app)
    install_openapi(app, settings)
    for r in (health.router, model_list.router, completions.router, admin_experts.router, admin_jobs.router,
              admin_merges.router, admin_remote.router, admin_btm.router, merge_sessions.router,
              merge_sessions.admin_router, admin_blackbox.router, admin_searches.router, admin_orphans.router,
              admin_lineage.router, console.router):
        app.include_router(r)
    app.add_middleware(GatewayMiddleware, metrics=app.state.metrics, max_body=settings.max_body_bytes,
                       max_upload=settings.max_upload_bytes, body_timeout_s=settings.body_timeout_s,
                       auth=lambda: getattr(getattr(app.state, "services", None), "auth", None))
    app.add_middleware(RedactionMiddleware)  # added last: the outermost, it sees every response byte
    return app
