"""Dependencies: everything long-lived lives on app.state (created in the lifespan) and is reached here."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.services.admin import AdminService
from app.services.completions import CompletionService
from app.services.remote_admin import RemoteAdminService


def _completions(request: Request) -> CompletionService:
    return request.app.state.completions


def _admin(request: Request) -> AdminService:
    return request.app.state.admin


def _remote_admin(request: Request) -> RemoteAdminService:
    return request.app.state.remote_admin


def require_client(request: Request) -> None:
    request.app.state.auth.require_client(request)


def require_admin(request: Request) -> None:
    request.app.state.auth.require_admin(request)


CompletionsDep = Annotated[CompletionService, Depends(_completions)]
AdminDep = Annotated[AdminService, Depends(_admin)]
RemoteAdminDep = Annotated[RemoteAdminService, Depends(_remote_admin)]
