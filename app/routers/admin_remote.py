"""/admin/experts/remote (register an OpenAI-compatible upstream) and PATCH /admin/experts/{id}."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from app.deps import RemoteAdminDep, require_admin
from app.protocol.common import error_responses
from app.protocol.remote import PatchExpertRequest, RegisterRemoteRequest, RemoteExpertView

router = APIRouter(prefix="/admin/experts", tags=["admin: experts"], dependencies=[Depends(require_admin)])


@router.post("/remote", status_code=201, response_model=RemoteExpertView,
             responses=error_responses(400, 401, 403, 409, 502),
             summary="Register a remote (OpenAI-compatible) expert")
async def register_remote(body: RegisterRemoteRequest, service: RemoteAdminDep):
    """Checks the upstream unless `check` is false; the API key is stored apart and never returned."""
    return await service.register(body)


@router.patch("/{expert_id}", response_model=RemoteExpertView, responses=error_responses(400, 401, 403, 404, 502),
              summary="Change a remote expert (rotate its key, timeouts, fallbacks, tags)")
async def patch_expert(expert_id: str, body: PatchExpertRequest, service: RemoteAdminDep):
    """Fields left out keep their value; `"api_key": null` removes the key."""
    return await service.patch(expert_id, body)
