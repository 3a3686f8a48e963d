"""/admin/orphans: artifacts without a registry row, quarantined at start-up: list, adopt, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request, Response

from app.deps import require_admin
from app.protocol.common import error_responses
from app.protocol.orphans import AdoptOrphanRequest, OrphanDeletedView, OrphanList
from app.routers.respond import ExpertOrJob, expert_or_job
from app.services.orphans import OrphanService

router = APIRouter(prefix="/admin/orphans", tags=["admin: orphans"], dependencies=[Depends(require_admin)])
NAME = Path(..., description="The orphan's directory name under <data dir>/orphans", max_length=255)


async def _orphans(request: Request) -> OrphanService:
    return OrphanService(request.app.state.services.admin)


OrphansDep = Annotated[OrphanService, Depends(_orphans)]


@router.get("", response_model=OrphanList, responses=error_responses(401, 403),
            summary="List quarantined artifacts (no registry row)")
async def list_orphans(orphans: OrphansDep):
    """Artifact directories found at start-up without a registry row (a crash between the artifact's commit
    and its row, a registry restored from an older backup, a re-bound registry). They are never deleted
    on a guess: adopt or delete each explicitly."""
    return {"object": "list", "data": await orphans.list()}


@router.post("/{name}/adopt", status_code=201, response_model=ExpertOrJob,
             responses={**error_responses(400, 401, 403, 404, 409), 202: {"description": "Job accepted"}},
             summary="Register a quarantined artifact as an expert")
async def adopt_orphan(orphans: OrphansDep, body: AdoptOrphanRequest, response: Response, name: str = NAME,
                       background: bool = Query(False, description="Return 202 with the job at once")):
    """Validated (and smoke-tested) like any registration; a refusal leaves the orphan in place. On
    success the orphan is gone from the list and the expert is registered."""
    return expert_or_job(response, await orphans.adopt(name, body, background))


@router.delete("/{name}", response_model=OrphanDeletedView, responses=error_responses(401, 403, 404),
               summary="Delete a quarantined artifact for good")
async def delete_orphan(orphans: OrphansDep, name: str = NAME):
    return await orphans.delete(name)
