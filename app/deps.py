"""Dependencies: everything long-lived lives on app.state (created in the lifespan) and is reached here.

All are `async def`: they do no I/O, and a sync dependency would cost a thread-pool hop per request."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.services.admin import AdminService
from app.services.completions import CompletionService
from app.services.remote_admin import RemoteAdminService


async def _completions(request: Request) -> CompletionService:
    return request.app.state.completions


async def _admin(request: Request) -> AdminService:
    return request.app.state.admin


async def _remote_admin(request: Request) -> RemoteAdminService:
    return request.app.state.remote_admin


async def require_client(request: Request) -> None:
    request.app.state.auth.require_client(request)


async def require_admin(request: Request) -> None:
    request.app.state.auth.require_admin(request)


CompletionsDep = Annotated[CompletionService, Depends(_completions)]
AdminDep = Annotated[AdminService, Depends(_admin)]
RemoteAdminDep = Annotated[RemoteAdminService, Depends(_remote_admin)]
