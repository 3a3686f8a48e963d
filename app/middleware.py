"""A pure-ASGI middleware (cheap on the hot path): request id, body-size limit, request metrics."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from app.errors import ApiError, error_body
from app.metrics import Metrics

Scope = dict[str, Any]


class GatewayMiddleware:
    def __init__(self, app: Any, *, metrics: Metrics, max_body: int, max_upload: int,
                 upload_paths: tuple[str, ...] = ("/admin/experts/upload",)) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body = max_body
        self.max_upload = max_upload
        self.upload_paths = upload_paths

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id = "req-" + uuid.uuid4().hex[:20]
        limit = self.max_upload if scope["path"] in self.upload_paths else self.max_body
        status = {"code": 500}
        length = _content_length(scope)
        if length is not None and length > limit:
            await _send_error(send, ApiError(413, f"request body is {length} bytes; the limit is {limit}",
                                             code="payload_too_large"), request_id)
            self._observe(scope, 413, start)
            return
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise ApiError(413, f"request body exceeds the limit of {limit} bytes", code="payload_too_large")
            return message

        async def tagged_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, limited_receive, tagged_send)
        finally:
            self._observe(scope, status["code"], start)

    def _observe(self, scope: Scope, code: int, start: float) -> None:
        route = scope.get("route")
        path = getattr(route, "path", None) or "unmatched"
        self.metrics.requests.labels(scope["method"], path, str(code)).inc()
        self.metrics.latency.labels(path).observe(time.perf_counter() - start)


def _content_length(scope: Scope) -> int | None:
    for k, v in scope.get("headers", []):
        if k == b"content-length":
            try:
                return int(v)
            except ValueError:
                return None
    return None


async def _send_error(send: Any, err: ApiError, request_id: str) -> None:
    body = json.dumps(error_body(err)).encode()
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"x-request-id", request_id.encode()), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
