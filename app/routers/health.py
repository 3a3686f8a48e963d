"""Liveness, readiness and metrics."""

from __future__ import annotations

from anyio.to_thread import run_sync
from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from app.deps import MetricsDep, RepoDep
from app.errors import ApiError

router = APIRouter(tags=["health"])


@router.get("/health", summary="Liveness: the process answers")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready", summary="Readiness: the registry database is reachable",
            responses={503: {"description": "Registry unreachable"}})
async def ready(repo: RepoDep) -> JSONResponse:
    try:
        await run_sync(repo.registry.ping)
    except Exception as e:
        raise ApiError(503, f"registry unreachable: {type(e).__name__}", type="server_error",
                       code="not_ready") from None
    return JSONResponse({"status": "ready"})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(metrics: MetricsDep) -> Response:
    return Response(metrics.render(), media_type="text/plain; version=0.0.4")
