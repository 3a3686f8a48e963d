"""/admin/searches: black-box merge searches (Evo-Merging, LoraHub) as jobs."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Response

from app.deps import SearchesDep, require_admin
from app.protocol.admin import ExpertView, JobView
from app.protocol.common import error_responses
from app.protocol.searches import AnySearchRequest
from app.routers.respond import ExpertOrJob, expert_or_job

router = APIRouter(prefix="/admin/searches", tags=["admin: searches"], dependencies=[Depends(require_admin)])



@router.post("", status_code=202, response_model=ExpertOrJob,
             responses={**error_responses(400, 401, 403, 404, 409),
                        202: {"model": JobView, "description": "The search job (background=true)"},
                        201: {"model": ExpertView, "description": "The registered winner (background=false, "
                              "with a name)"}},
             summary="Run a search as a job: Evo-Merging / LoraHub merge coefficients, or ensemble weights")
async def start_search(body: AnySearchRequest, response: Response, svc: SearchesDep,
                       background: bool = Query(True, description="false: wait for the search to finish")):
    """The provider is this gateway (default) or any server with the merge-sessions contract
    (`provider.url`, `provider.api_key`): only coefficients go out and only losses come back.

    Follow the job at `GET /admin/jobs/{id}` or `GET /admin/jobs/{id}/events` (SSE): `detail` holds the
    stage, queries used, best loss and coefficients so far and the loss-vs-queries series. Cancel with
    `POST /admin/jobs/{id}/cancel` (nothing is registered). The result holds alpha, beta, the loss, the
    queries and the settings; with `name` the winner is registered (its lineage holds all of it). The same
    request and seed give the same result.

    `"method": "ensemble_weights"` searches the weights of a black-box ensemble instead: every member is
    called once per validation example, then the weights are searched on those numbers alone and saved on
    the ensemble if they beat its current ones (`apply`)."""
    status, payload = await svc.start(body, background)
    return expert_or_job(response, (status, payload))
