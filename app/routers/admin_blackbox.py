"""/admin/ensembles: black-box ensembles of local and remote experts (score_select, token_mix)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from app.deps import BlackBoxDep, require_admin
from app.protocol.admin import ExpertView
from app.protocol.blackbox import EnsembleList, PatchEnsembleRequest, RegisterEnsembleRequest
from app.protocol.common import error_responses

router = APIRouter(prefix="/admin/ensembles", tags=["admin: ensembles"], dependencies=[Depends(require_admin)])



@router.post("", status_code=201, response_model=ExpertView, responses=error_responses(400, 401, 403, 409),
             summary="Register a black-box ensemble (local and remote members)")
async def register_ensemble(body: RegisterEnsembleRequest, svc: BlackBoxDep):
    """Members must exist (400 otherwise); token_mix needs the local members to share a tokenizer
    fingerprint (remote members are trusted to share it: the gateway cannot see their tokenizer)."""
    return await svc.register(body)


@router.get("", response_model=EnsembleList, responses=error_responses(401, 403),
            summary="List black-box ensembles")
async def list_ensembles(svc: BlackBoxDep):
    return {"object": "list", "data": svc.list()}


@router.patch("/{expert_id}", response_model=ExpertView, responses=error_responses(400, 401, 403, 404),
              summary="Set a black-box ensemble's weights (or candidates, or top_logprobs) by hand")
async def patch_ensemble(expert_id: str, body: PatchEnsembleRequest, svc: BlackBoxDep):
    return await svc.patch(expert_id, body)
