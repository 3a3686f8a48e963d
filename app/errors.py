"""One shape for every error on the wire: the OpenAI envelope {"error": {message, type, param, code}}.

Domain exceptions (experts.errors, merging.errors) are mapped here; routers never catch them.
"""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from experts import errors as xe
from experts.evo import sessions as xs

log = logging.getLogger("mergegate.errors")

TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
         405: "invalid_request_error", 409: "conflict_error", 413: "invalid_request_error", 429: "rate_limit_error"}


class ApiError(Exception):
    """An error raised by the HTTP layer itself (auth, limits, request shape)."""

    def __init__(self, status: int, message: str, *, type: str | None = None, code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.type = type or TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def to_api_error(exc: BaseException) -> ApiError:
    """Map any exception to the ApiError the client should see (never a traceback)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, xe.ExpertNotFoundError):
        return ApiError(404, str(exc), code="model_not_found", param="model")
    if isinstance(exc, xe.JobNotFoundError):
        return ApiError(404, str(exc), code="job_not_found")
    if isinstance(exc, xe.OrphanNotFoundError):
        return ApiError(404, str(exc), code="orphan_not_found", param="name")
    if isinstance(exc, (xe.ExpertExistsError, xe.ExpertInUseError, xe.JobStateError)):
        return ApiError(409, str(exc), code=type(exc).__name__.removesuffix("Error").lower())
    if isinstance(exc, xe.GenerationInputError):
        return ApiError(400, str(exc), code=exc.code, param=exc.param)
    if isinstance(exc, xe.UpstreamError):
        return _upstream_error(exc)
    if isinstance(exc, xe.EngineOverloadedError):
        return ApiError(429, str(exc), code="engine_overloaded",
                        headers={"retry-after": str(max(1, math.ceil(exc.retry_after)))})
    if isinstance(exc, xs.SessionNotFoundError):
        return ApiError(404, str(exc), code="session_not_found")
    if isinstance(exc, xs.BudgetExhaustedError):
        return ApiError(429, str(exc), code="query_budget_exhausted", headers={"x-should-retry": "false"})
    if isinstance(exc, xs.SessionLimitError):
        return ApiError(429, str(exc), code="session_limit_reached")
    if isinstance(exc, xs.InvalidCandidateError):
        return ApiError(400, str(exc), code="invalid_candidate", param=exc.param)
    if isinstance(exc, xe.ExpertBuildingError):
        return ApiError(503, str(exc), type="server_error", code="model_building", param="model",
                        headers={"retry-after": "10"})
    if isinstance(exc, xe.ExpertUnavailableError):
        return ApiError(503, str(exc), type="server_error", code="model_unavailable")
    if isinstance(exc, ValueError) and _is_domain(exc):  # InvalidExpertError, merging errors, corpus errors
        return ApiError(400, str(exc), code=type(exc).__name__)
    log.exception("unhandled error", exc_info=exc)
    return ApiError(500, "internal server error; see the gateway log", type="server_error")


def _upstream_error(exc: xe.UpstreamError) -> ApiError:
    """The upstream's 4xx keeps its status; failures are 502/503/504. After the gateway's own retries,
    `x-should-retry: false` stops the openai client from multiplying them; 429 and an open breaker
    say when to come back."""
    headers = {"x-should-retry": "false"} if exc.status in (502, 504) else {}
    if exc.retry_after is not None:
        headers["retry-after"] = str(max(1, math.ceil(exc.retry_after)))
    return ApiError(exc.status, str(exc), type=exc.type, code=exc.code, param=exc.param, headers=headers or None)


DOMAIN_ERRORS: list[type[Exception]] = [xe.ExpertError, ValueError]


def _is_domain(exc: BaseException) -> bool:
    return type(exc).__module__.split(".")[0] in ("experts", "merging")


def error_body(err: ApiError) -> dict:
    return {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(error_body(err), status_code=err.status, headers=err.headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None, str | None]:
    """(message, param, code) of a request that failed validation: code `invalid_combination` for a rule
    between fields (app.protocol.common.combination_error), else None."""
    errs = exc.errors()
    if not errs:
        return "invalid request", None, None
    first = errs[0]
    # union tags ("as text", ...; app/protocol) contain a space, field names and indices do not
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path") and " " not in str(p)]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None, None
    code = "invalid_combination" if first.get("type") == "invalid_combination" else None
    more = f" (and {len(errs) - 1} more problem(s))" if len(errs) > 1 else ""
    return (f"{param}: {msg}" if param else msg) + more, param, code


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """Every method some route of `app` answers on `path` (Starlette's own 405 names one route's only)."""
    allowed = []
    for method in ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT"):
        scope = {"type": "http", "path": path, "method": method, "root_path": "", "headers": []}
        if any(route.matches(scope)[0] == Match.FULL for route in app.router.routes):
            allowed.append(method)
    return allowed


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        msg, param, code = _validation_message(exc)
        return error_response(ApiError(400, msg, param=param, code=code))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        headers = getattr(exc, "headers", None)
        if exc.status_code == 404 and message == "Not Found":
            message = "no such endpoint"
        if exc.status_code == 405:
            allow = allowed_methods(request.app, request.url.path)
            message = f"{request.method} is not allowed here; allowed: {', '.join(allow)}"
            headers = {**{k: v for k, v in (headers or {}).items() if k.lower() != "allow"}, "allow": ", ".join(allow)}
        return error_response(ApiError(exc.status_code, message, headers=headers))

    async def _domain(_: Request, exc: Exception) -> JSONResponse:
        return error_response(to_api_error(exc))

    # Domain errors are handled inside the app (so middleware sees the status); `Exception` is the
    # last resort, answered by Starlette's outermost middleware.
    for exc_type in DOMAIN_ERRORS:
        app.add_exception_handler(exc_type, _domain)
    app.add_exception_handler(Exception, _domain)
