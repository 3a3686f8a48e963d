"""Bearer-key checks. Keys are compared in constant time and never logged or echoed."""

from __future__ import annotations

import hmac

from fastapi import Request

from app.errors import ApiError


def bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def matches(token: str, keys: list[str]) -> bool:
    ok = False
    for key in keys:  # no early exit: the time does not depend on which key matched
        ok |= hmac.compare_digest(token.encode(), key.encode())
    return ok


class Authenticator:
    def __init__(self, admin_key: str, client_keys: list[str]) -> None:
        self._admin = admin_key
        self._clients = client_keys

    def require_client(self, request: Request) -> None:
        """/v1: open when no client keys are configured; otherwise a client key or the admin key."""
        if not self._clients:
            return
        token = bearer(request)
        if token is None:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        if not matches(token, self._clients + [self._admin]):
            raise ApiError(401, "incorrect API key", code="invalid_api_key")

    def require_admin(self, request: Request) -> None:
        token = bearer(request)
        if token is None:
            raise ApiError(401, "missing admin key: send 'Authorization: Bearer <admin key>'", code="invalid_api_key")
        if matches(token, [self._admin]):
            return
        if self._clients and matches(token, self._clients):
            raise ApiError(403, "this key may call /v1 only; admin routes need the admin key", code="not_admin")
        raise ApiError(401, "incorrect admin key", code="invalid_api_key")
