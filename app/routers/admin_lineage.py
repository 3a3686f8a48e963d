"""/admin/lineage: the registry's lineage as one graph (what the console draws)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from app.deps import AdminDep, require_admin
from app.protocol.common import error_responses
from app.protocol.lineage import EXAMPLE, LineageGraph
from experts.hf.threads import run_sync

router = APIRouter(prefix="/admin/lineage", tags=["admin: experts"], dependencies=[Depends(require_admin)])


@router.get("", response_model=LineageGraph,
            responses={**error_responses(401, 403),
                       200: {"content": {"application/json": {"example": EXAMPLE}}}},
            summary="The lineage of every expert as nodes and edges")
async def lineage(admin: AdminDep):
    """One node per expert (kind, status, how it was made) and one edge per recorded ancestry: a merge's
    parents with their weights, a LoRA adapter's base, the forest an average collapsed. BTM seed ->
    branches -> forest -> average, merge recipes and search winners all read from the registry rows;
    an ancestor that is no longer registered appears with status `absent`."""
    return await run_sync(admin.lineage)
