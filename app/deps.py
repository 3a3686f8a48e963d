"""FastAPI dependencies: the services built in the app's lifespan (`app.main.Services`), handed to routers.

All are `async def`: they do no I/O, and a sync dependency would cost a thread-pool hop per request."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, Request

from app.metrics import Metrics
from app.services.admin import AdminService
from app.services.blackbox import BlackBoxService
from app.services.btm import BTMService
from app.services.completions import CompletionService
from app.services.merge_sessions import MergeSessionService
from app.services.merges import MergeService
from app.services.remote_admin import RemoteAdminService
from app.services.searches import SearchService
from experts.repository.repo import ExpertRepository


def _service(name: str) -> Callable[[Request], Awaitable[Any]]:
    async def dependency(request: Request) -> Any:
        return getattr(request.app.state.services, name)

    dependency.__name__ = f"get_{name}"
    return dependency


async def _metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def require_client(request: Request) -> None:
    request.app.state.services.auth.require_client(request)


async def require_admin(request: Request) -> None:
    request.app.state.services.auth.require_admin(request)


CompletionsDep = Annotated[CompletionService, Depends(_service("completions"))]
AdminDep = Annotated[AdminService, Depends(_service("admin"))]
RemoteAdminDep = Annotated[RemoteAdminService, Depends(_service("remote_admin"))]
BlackBoxDep = Annotated[BlackBoxService, Depends(_service("blackbox"))]
BTMDep = Annotated[BTMService, Depends(_service("btm"))]
MergesDep = Annotated[MergeService, Depends(_service("merges"))]
MergeSessionsDep = Annotated[MergeSessionService, Depends(_service("merge_sessions"))]
SearchesDep = Annotated[SearchService, Depends(_service("searches"))]
RepoDep = Annotated[ExpertRepository, Depends(_service("repo"))]
MetricsDep = Annotated[Metrics, Depends(_metrics)]
