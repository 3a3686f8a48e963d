"""Liveness, readiness and metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from app.deps import MetricsDep, RepoDep
from app.errors import ApiError
from app.protocol.common import error_responses
from experts.hf.threads import run_sync

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


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                             "description": "Prometheus text format"},
                       **error_responses(401, 403, 404)})
async def metrics(metrics: MetricsDep, request: Request) -> Response:
    """Exposure follows `MERGEGATE_METRICS`: `admin` (default: the admin key), `open`, or `off` (404)."""
    if request.app.state.services.settings.metrics == "off":
        raise ApiError(404, "metrics are turned off (MERGEGATE_METRICS=off)", code="not_found")
    return Response(metrics.render(), media_type="text/plain; version=0.0.4")
