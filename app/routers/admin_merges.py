"""/admin/merges: run weight-space merges of registered experts as jobs, or preview them."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Response

from app.deps import MergesDep, require_admin
from app.protocol.admin import ExpertView
from app.protocol.common import error_responses
from app.protocol.merges import MergeRequest, MethodView, PreviewRequest, PreviewView
from app.routers.respond import ExpertOrJob, expert_or_job

router = APIRouter(prefix="/admin/merges", tags=["admin: merges"], dependencies=[Depends(require_admin)])



@router.get("/methods", response_model=list[MethodView], summary="Merge methods and their parameters")
async def list_methods(service: MergesDep):
    return service.methods()


@router.post("/preview", response_model=PreviewView, responses=error_responses(400, 401, 403, 404, 409),
             summary="Validate a recipe and estimate its memory and output size, without merging")
async def preview_merge(body: PreviewRequest, service: MergesDep):
    return await service.preview(body.recipe, body.id, body.mergekit_config)


@router.post("", status_code=202, response_model=ExpertOrJob, responses={**error_responses(400, 401, 403, 404, 409),
                                             201: {"model": ExpertView, "description": "Merged (background=false)"}},
             summary="Merge experts into a new expert (a job)")
async def create_merge(body: MergeRequest, response: Response, service: MergesDep,
                       background: bool = Query(True, description="false: wait and answer 201 with the expert")):
    """Takes a MergeGate `recipe` or a mergekit config (`mergekit_config`: the YAML text or its JSON
    object). Checks everything first (recipe, experts, shapes, tokenizers, output id) and answers 4xx
    before any work; then merges tensor by tensor in a job (progress per tensor) and registers the
    result with the recipe as its lineage. Follow it at `/admin/jobs/{id}/events`."""
    status, payload = await service.start(body.id, body.recipe, tags=body.tags, domain=body.domain,
                                          background=background, mergekit_config=body.mergekit_config)
    return expert_or_job(response, (status, payload))
