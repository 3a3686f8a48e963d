"""/admin/jobs: list, inspect, cancel, and follow background jobs."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query
from fastapi.responses import StreamingResponse

from app.deps import AdminDep, require_admin
from app.protocol.admin import JobList, JobView
from app.protocol.common import error_responses
from experts.hf.threads import run_sync

router = APIRouter(prefix="/admin/jobs", tags=["admin: jobs"], dependencies=[Depends(require_admin)])


@router.get("", response_model=JobList, responses=error_responses(401, 403), summary="List jobs, newest first")
async def list_jobs(admin: AdminDep, status: str | None = Query(None), kind: str | None = Query(None),
                    limit: int = Query(100, ge=1, le=1000)):
    jobs = await run_sync(lambda: admin.jobs.list(status=status, kind=kind, limit=limit))
    return {"object": "list", "data": [j.to_dict() for j in jobs]}


@router.get("/{job_id}", response_model=JobView, responses=error_responses(401, 403, 404), summary="Inspect a job")
async def get_job(job_id: str, admin: AdminDep):
    return (await run_sync(admin.jobs.get, job_id)).to_dict()


@router.post("/{job_id}/cancel", response_model=JobView, responses=error_responses(401, 403, 404, 409),
             summary="Cancel a queued or running job")
async def cancel_job(job_id: str, admin: AdminDep):
    return (await run_sync(admin.jobs.cancel, job_id)).to_dict()


@router.get("/{job_id}/events", responses={**error_responses(401, 403, 404),
                                           200: {"content": {"text/event-stream": {}}}},
            summary="Follow a job: SSE events with the job each time it changes, then [DONE]")
async def job_events(job_id: str, admin: AdminDep) -> StreamingResponse:
    await run_sync(admin.jobs.get, job_id)  # 404 before the stream starts
    return StreamingResponse(admin.job_events(job_id), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})
