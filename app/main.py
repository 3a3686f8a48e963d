"""The application factory. State is created in the lifespan and owned by the app.

Run with `mergegate serve`, or `uvicorn app.main:create_app --factory`.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from fastapi import FastAPI

from app.auth import Authenticator
from app.errors import install_error_handlers
from app.metrics import Metrics
from app.middleware import GatewayMiddleware
from app.routers import (admin_btm, admin_experts, admin_jobs, admin_merges, admin_remote, completions, health,
                         model_list)
from app.routers import merge_sessions
from app.routers import admin_blackbox, admin_searches
from app.services.admin import AdminService
from app.services.blackbox import BlackBoxService
from app.services.completions import CompletionService
from app.services.btm import BTMService
from app.services.merges import MergeService
from app.services.searches import SearchService
from app.services.merge_sessions import MergeSessionService
from app.services.proxy import ProxyService
from app.services.remote_admin import RemoteAdminService
from app.settings import Settings, resolve_admin_key
from experts.remote.breaker import STATE_CODES
from experts.btm.operations import BTM
from experts.repository.jobs import JobService
from experts.evo.sessions import MergeSessionManager
from experts.repository.registry import Registry
from experts.repository.repo import ExpertRepository
from experts.remote.secrets import SecretStore
from experts.repository.store import ArtifactStore
from experts.remote.upstream import RemoteRuntime

log = logging.getLogger("mergegate")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights never come from a hub at run time
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DESCRIPTION = """A model-merging gateway: a repository of expert LMs served through the OpenAI API.

* `/v1/*` is OpenAI-compatible (use the official `openai` client with `base_url=http://HOST:PORT/v1`).
* `/admin/*` needs the admin key (`Authorization: Bearer <key>`).
* Errors always use the OpenAI envelope `{"error": {"message", "type", "param", "code"}}`.
"""


def instance_id(data_dir: Path) -> str:
    """A stable id for this gateway's data dir: owns the jobs it runs."""
    path = data_dir / "instance_id"
    if path.is_file():
        return path.read_text().strip()
    ident = "gw-" + uuid.uuid4().hex[:12]
    path.write_text(ident + "\n")
    return ident


def build_state(app: FastAPI, settings: Settings) -> None:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    registry = Registry(settings.db_url)
    repo = ExpertRepository(registry, ArtifactStore(settings.data_dir), max_loaded_models=settings.max_loaded_models,
                            max_loaded_bytes=settings.max_loaded_bytes, default_dtype=settings.default_dtype)
    repo.open()
    jobs = JobService(registry, owner=instance_id(settings.data_dir), workers=settings.job_workers)
    jobs.recover()
    metrics: Metrics = app.state.metrics

    def refresh() -> None:
        loaded = repo.cache.loaded()
        metrics.loaded_models.set(len(loaded))
        metrics.loaded_bytes.set(sum(loaded.values()))

    metrics.add_refresher(refresh)
    admin_key = resolve_admin_key(settings)
    app.state.settings = settings
    app.state.repo = repo
    app.state.jobs = jobs
    app.state.auth = Authenticator(admin_key, [k.get_secret_value() for k in settings.api_keys])
    app.state.completions = CompletionService(repo, metrics, workers=settings.generation_workers, max_n=settings.max_n)
    app.state.admin = AdminService(repo, jobs, metrics, max_upload_bytes=settings.max_upload_bytes,
                                   torch_executor=app.state.completions.executor)
    app.state.merges = MergeService(app.state.admin)
    app.state.btm = BTMService(app.state.admin, BTM(repo, settings.data_dir, settings.corpus_bytes))
    app.state.merge_sessions = MergeSessionService(app.state.admin, MergeSessionManager(
        repo, btm=app.state.btm.btm, max_sessions=getattr(settings, "max_merge_sessions", 8)))


def build_remote(app: FastAPI, settings: Settings, http: httpx.AsyncClient) -> None:
    """Remote experts: one pooled client for all upstreams, keys in <data_dir>/secrets."""
    runtime = RemoteRuntime(http, SecretStore(settings.data_dir / "secrets"))
    app.state.remote_admin = RemoteAdminService(app.state.repo, runtime)
    app.state.remote_admin.install()
    app.state.searches = SearchService(app.state.admin, app.state.merge_sessions.manager, app.state.remote_admin)
    app.state.completions.proxy = ProxyService(app.state.repo, app.state.metrics)
    metrics: Metrics = app.state.metrics

    def refresh() -> None:
        metrics.remote_breaker.clear()  # deleted experts drop out
        for expert_id, state in runtime.breaker_states().items():
            metrics.remote_breaker.labels(expert_id).set(STATE_CODES[state])

    metrics.add_refresher(refresh)


def build_blackbox(app: FastAPI) -> None:
    """Black-box ensembles (`ensemble` records with a `mode`): local and remote members together."""
    app.state.blackbox = BlackBoxService(app.state.repo, app.state.completions, app.state.metrics)
    app.state.blackbox.install()
    app.state.completions.blackbox = app.state.blackbox


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        build_state(app, settings)
        limits = httpx.Limits(max_connections=settings.remote_max_connections,
                              max_keepalive_connections=settings.remote_max_keepalive)
        http = httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(60.0, connect=5.0), follow_redirects=False)
        build_remote(app, settings, http)
        build_blackbox(app)
        log.info("MergeGate ready: data dir %s, registry %s", settings.data_dir, settings.db_url.split("://")[0])
        try:
            yield
        finally:
            await http.aclose()
            app.state.jobs.shutdown()
            app.state.completions.close()
            app.state.repo.close()

    app = FastAPI(title="MergeGate", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.metrics = Metrics()
    install_error_handlers(app)
    for r in (health.router, model_list.router, completions.router, admin_experts.router, admin_jobs.router,
              admin_merges.router, admin_remote.router, admin_btm.router, merge_sessions.router,
              merge_sessions.admin_router):
        app.include_router(r)
    app.include_router(admin_blackbox.router)
    app.include_router(admin_searches.router)
    app.add_middleware(GatewayMiddleware, metrics=app.state.metrics, max_body=settings.max_body_bytes,
                       max_upload=settings.max_upload_bytes)
    return app
