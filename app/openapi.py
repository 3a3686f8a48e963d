"""The OpenAPI document, made to say what the server does (tests/test_fuzz.py holds it to that).

FastAPI's generated document is post-processed once, with the gateway's settings:

* request errors are 400 in the error envelope, never FastAPI's 422 (`app/errors.py` maps them);
* every operation lists the statuses the layers around it can send: 401/403 where a key is needed
  (app/auth.py), 400/408/413 where a body is read (app/middleware.py);
* `n` carries the configured `MERGEGATE_MAX_N` as its maximum;
* multipart fields are optional, never null (a form cannot send a null);
* the bearer keys are declared as security schemes, per operation.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from app.auth import ADMIN_PATHS, CLIENT_PATHS
from app.settings import Settings

ERROR = {"$ref": "#/components/schemas/ErrorResponse"}
DESCRIPTIONS = {400: "Bad request (invalid parameters, JSON or combination)", 401: "Missing or wrong key",
                403: "Not allowed with this key", 404: "Not found", 408: "The request body stalled",
                409: "Conflict", 413: "Body too large", 429: "Rate limited (queue full, budget spent)",
                502: "Upstream error (remote experts)", 503: "Unavailable", 504: "Upstream timeout (remote experts)"}
SECURITY = {
    "adminKey": {"type": "http", "scheme": "bearer", "description": "The admin key (MERGEGATE_ADMIN_KEY or "
                 "<data dir>/admin.key)"},
    "clientKey": {"type": "http", "scheme": "bearer", "description": "A client key (MERGEGATE_API_KEYS) or the "
                  "admin key; /v1 is open when no client keys are configured"},
}
# operations that proxy to remote experts or queue on the engine, and those that call a remote upstream
SERVING = {"/v1/completions", "/v1/chat/completions"}
UPSTREAM = {("post", "/admin/experts/remote"), ("patch", "/admin/experts/{expert_id}")}


def _role(path: str, settings: Settings) -> str | None:
    if ADMIN_PATHS.match(path) or (path == "/metrics" and settings.metrics == "admin"):
        return "admin"
    return "client" if CLIENT_PATHS.match(path) else None


def _add(responses: dict[str, Any], *codes: int) -> None:
    for code in codes:
        responses.setdefault(str(code), {"description": DESCRIPTIONS[code],
                                         "content": {"application/json": {"schema": ERROR}}})


def _multipart_without_nulls(op: dict[str, Any], schemas: dict[str, Any]) -> None:
    """A multipart field cannot be null, only left out: optional form fields lose FastAPI's `null` branch."""
    ref = op.get("requestBody", {}).get("content", {}).get("multipart/form-data", {}).get("schema", {}).get("$ref")
    body = schemas.get(str(ref).rpartition("/")[2], {}) if ref else {}
    for prop in body.get("properties", {}).values():
        branches = prop.get("anyOf")
        if branches and {"type": "null"} in branches:
            rest = [b for b in branches if b != {"type": "null"}]
            del prop["anyOf"]
            prop.update(rest[0] if len(rest) == 1 else {"anyOf": rest})


def document(schema: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Post-process FastAPI's document in place (see the module docstring); returns it."""
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    components["securitySchemes"] = SECURITY
    for model in ("CompletionRequest", "ChatCompletionRequest"):
        n = schemas.get(model, {}).get("properties", {}).get("n")
        if n is not None:
            n["maximum"] = settings.max_n
    for path, item in schema.get("paths", {}).items():
        role = _role(path, settings)
        for method, op in item.items():
            responses = op.setdefault("responses", {})
            _multipart_without_nulls(op, schemas)
            had_422 = responses.pop("422", None) is not None
            if had_422 or "requestBody" in op or op.get("parameters"):
                _add(responses, 400)
            if "requestBody" in op:
                _add(responses, 408, 413)
            if role == "admin":
                _add(responses, 401, 403)
                op["security"] = [{"adminKey": []}]
            elif role == "client":
                _add(responses, 401)
                op["security"] = [{"clientKey": []}, {"adminKey": []}]
            if path in SERVING:
                _add(responses, 404, 429, 502, 503, 504)
            if (method, path) in UPSTREAM:
                _add(responses, 502, 503, 504)
    return schema


def install_openapi(app: FastAPI, settings: Settings) -> None:
    """Serve the post-processed document at /openapi.json (and /docs)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document(get_openapi(title=app.title, version=app.version,
                                                      description=app.description, routes=app.routes), settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
