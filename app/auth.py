"""Bearer-key checks. Keys are compared in constant time and never logged or echoed.

Who may call what is decided from the path alone (:meth:`Authenticator.role_for`), so the pure-ASGI
middleware (app/middleware.py) checks the key before a single byte of the body is read:

* `/admin/*` and `POST /v1/merge/sessions/{id}/materialize` (it registers an expert): the admin key;
  a client key is a 403, no key or a wrong key a 401;
* `/v1/*`: a client key or the admin key, when client keys are configured (open otherwise);
* `/metrics`: as `MERGEGATE_METRICS` says (`admin`, `open` or `off`);
* everything else (`/health`, `/ready`, `/docs`, `/openapi.json`) is open.

The route dependencies (`app.deps.require_admin`, `require_client`) apply the same checks again, so a
route mounted without the middleware is not left open.
"""

from __future__ import annotations

import hmac
import re
from typing import Literal

from fastapi import Request

from app.errors import ApiError

Role = Literal["admin", "client"]
ADMIN_PATHS = re.compile(r"^/admin(/|$)|^/v1/merge/sessions/[^/]+/materialize/?$")
CLIENT_PATHS = re.compile(r"^/v1(/|$)")


def bearer(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header value, or None."""
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def matches(token: str, keys: list[str]) -> bool:
    ok = False
    for key in keys:  # no early exit: the time does not depend on which key matched
        ok |= hmac.compare_digest(token.encode(), key.encode())
    return ok


class Authenticator:
    def __init__(self, admin_key: str, client_keys: list[str], *, metrics: str = "admin") -> None:
        self._admin = admin_key
        self._clients = client_keys
        self.metrics = metrics

    def role_for(self, path: str) -> Role | None:
        """The key a path needs: 'admin', 'client' or None (open)."""
        if ADMIN_PATHS.match(path):
            return "admin"
        if CLIENT_PATHS.match(path):
            return "client"
        if path == "/metrics" and self.metrics == "admin":
            return "admin"
        return None

    def check(self, role: Role | None, authorization: str | None) -> None:
        """Raise the 401/403 ApiError for a missing, wrong or insufficient key."""
        if role == "admin":
            self._check_admin(authorization)
        elif role == "client":
            self._check_client(authorization)

    def _check_client(self, authorization: str | None) -> None:
        """/v1: open when no client keys are configured; otherwise a client key or the admin key."""
        if not self._clients:
            return
        token = bearer(authorization)
        if token is None:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        if not matches(token, self._clients + [self._admin]):
            raise ApiError(401, "incorrect API key", code="invalid_api_key")

    def _check_admin(self, authorization: str | None) -> None:
        token = bearer(authorization)
        if token is None:
            raise ApiError(401, "missing admin key: send 'Authorization: Bearer <admin key>'", code="invalid_api_key")
        if matches(token, [self._admin]):
            return
        if self._clients and matches(token, self._clients):
            raise ApiError(403, "this key may call /v1 only; admin routes need the admin key", code="not_admin")
        raise ApiError(401, "incorrect admin key", code="invalid_api_key")

    def require_client(self, request: Request) -> None:
        self._check_client(request.headers.get("authorization"))

    def require_admin(self, request: Request) -> None:
        self._check_admin(request.headers.get("authorization"))
