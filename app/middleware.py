"""A pure-ASGI middleware (cheap on the hot path): request id, key checks, body limits, request metrics.

Everything here happens before FastAPI reads a byte of the body:

1. the key the path needs is checked (app/auth.py): an upload without the admin key is a 401 before
   anything is spooled;
2. `Content-Length` is checked: unparsable or negative is a 400, over the limit a 413;
3. the body is read through a guard: past the limit (chunked bodies included) a 413; no data for
   `MERGEGATE_BODY_TIMEOUT_S` while more is due, a 408. The app then sees a disconnect; whatever it
   answers is dropped and the guard's error goes out instead, with `connection: close`.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

from app.auth import Authenticator
from app.errors import ApiError, error_body
from app.metrics import Metrics

Scope = dict[str, Any]
Message = dict[str, Any]


class BodyGuard:
    """The ASGI `receive` of one request, with the body-size limit and the body read timeout."""

    def __init__(self, receive: Callable[[], Any], limit: int, timeout_s: float) -> None:
        self.receive = receive
        self.limit = limit
        self.timeout_s = timeout_s
        self.received = 0
        self.done = False  # the whole body arrived: later receives (disconnect watchers) wait freely
        self.failed: ApiError | None = None

    async def __call__(self) -> Message:
        if self.failed is not None:
            return {"type": "http.disconnect"}
        if self.done:
            return await self.receive()
        try:
            message = await asyncio.wait_for(self.receive(), self.timeout_s)
        except TimeoutError:
            self.failed = ApiError(408, f"the request body stalled: no data for {self.timeout_s:g} s",
                                   code="request_timeout")
            return {"type": "http.disconnect"}
        if message["type"] != "http.request":
            self.done = True
            return message
        self.received += len(message.get("body", b""))
        if self.received > self.limit:
            self.failed = ApiError(413, f"request body exceeds the limit of {self.limit} bytes",
                                   code="payload_too_large")
            return {"type": "http.disconnect"}
        if not message.get("more_body", False):
            self.done = True
        return message


class GatewayMiddleware:
    def __init__(self, app: Any, *, metrics: Metrics, max_body: int, max_upload: int,
                 auth: Callable[[], Authenticator | None] = lambda: None, body_timeout_s: float = 30.0,
                 upload_paths: tuple[str, ...] = ("/admin/experts/upload",)) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body = max_body
        self.max_upload = max_upload
        self.auth = auth
        self.body_timeout_s = body_timeout_s
        self.upload_paths = upload_paths

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id = "req-" + uuid.uuid4().hex[:20]
        limit = self.max_upload if scope["path"] in self.upload_paths else self.max_body
        refusal = self._refusal(scope, limit)
        if refusal is not None:
            await send_error(send, refusal, request_id)
            self._observe(scope, refusal.status, start)
            return
        guard = BodyGuard(receive, limit, self.body_timeout_s)
        status = {"code": 500, "started": False}

        async def tagged_send(message: Message) -> None:
            if guard.failed is not None and not status["started"]:
                return  # the app's answer to the guard's disconnect: the guard's error goes out instead
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
                message["headers"] = list(message.get("headers", [])) + [(b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, guard, tagged_send)
        except Exception:
            if guard.failed is None or status["started"]:
                raise
        finally:
            if guard.failed is not None and not status["started"]:
                status["code"] = guard.failed.status
                await send_error(send, guard.failed, request_id)
            self._observe(scope, int(status["code"]), start)

    def _refusal(self, scope: Scope, limit: int) -> ApiError | None:
        """The error to answer without running the app: a missing or wrong key, a bad or too large length."""
        auth = self.auth()
        if auth is not None:
            try:
                auth.check(auth.role_for(scope["path"]), _header(scope, b"authorization"))
            except ApiError as e:
                return e
        raw = _header(scope, b"content-length")
        if raw is None:
            return None
        if not raw.strip().isdigit():
            return ApiError(400, "Content-Length must be a non-negative integer", code="invalid_content_length")
        length = int(raw)
        if length > limit:
            return ApiError(413, f"request body is {length} bytes; the limit is {limit}", code="payload_too_large")
        return None

    def _observe(self, scope: Scope, code: int, start: float) -> None:
        route = scope.get("route")
        path = getattr(route, "path", None) or "unmatched"
        self.metrics.requests.labels(scope["method"], path, str(code)).inc()
        self.metrics.latency.labels(path).observe(time.perf_counter() - start)


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k == name:
            return v.decode("latin-1")
    return None


async def send_error(send: Any, err: ApiError, request_id: str | None = None) -> None:
    """Answer with the error envelope and close the connection (the body, if any, was not read)."""
    body = json.dumps(error_body(err)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    if request_id is not None:
        headers.append((b"x-request-id", request_id.encode()))
    for k, v in (err.headers or {}).items():
        headers.append((k.lower().encode(), v.encode()))
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
