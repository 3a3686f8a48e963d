"""The HTTP end of the one redaction path (experts.remote.redact): every response the gateway sends.

`RedactionMiddleware` is the outermost middleware, so it sees every status line, header and body
byte: JSON answers, error envelopes (the body-size limit's included), SSE events (ours and relayed),
`/metrics`. A body sent in one piece is redacted whole and its `content-length` corrected; a stream
(no `content-length`) is redacted line by line as it goes, an unfinished last line held back until
the rest of it arrives, so an SSE event leaves as soon as its blank line is written. Binary bodies
(`application/octet-stream`, images, ...) pass untouched.

`install_redaction` also starts the redaction of every log record of the process and adds the
gateway's own keys (admin and client keys) to the secret set.
"""

from __future__ import annotations

from typing import Any

from experts.remote.redact import REDACTOR, Redactor, install_log_redaction

Message = dict[str, Any]
_TEXT_TYPES = (b"text/", b"application/json", b"application/problem+json", b"application/javascript",
               b"application/xml", b"application/x-ndjson")
_MAX_HELD = 1 << 20  # a streamed line longer than this is redacted in pieces


def install_redaction(*keys: str | None) -> None:
    """Redact `keys` (the admin and client keys) along with every other secret, from now on, and
    every log record of this process. Idempotent."""
    REDACTOR.add(*keys)
    install_log_redaction()


def _textual(headers: list[tuple[bytes, bytes]]) -> bool:
    for k, v in headers:
        if k.lower() == b"content-type":
            v = v.lower()
            return v.startswith(_TEXT_TYPES) or b"+json" in v or b"event-stream" in v
    return True  # no content type: treat as text


def _has_length(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(k.lower() == b"content-length" for k, _ in headers)


def _with_length(headers: list[tuple[bytes, bytes]], n: int) -> list[tuple[bytes, bytes]]:
    return [(k, str(n).encode() if k.lower() == b"content-length" else v) for k, v in headers]


class RedactionMiddleware:
    """Pure ASGI: redacts response headers and bodies with `redactor` (the process's one by default)."""

    def __init__(self, app: Any, redactor: Redactor = REDACTOR) -> None:
        self.app = app
        self.redactor = redactor

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        redact = self.redactor.redact_bytes
        state: dict[str, Any] = {"start": None, "text": True, "whole": False, "held": b""}

        async def redacting_send(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                headers = [(k, redact(v)) for k, v in message.get("headers", [])]
                state["text"] = _textual(headers)
                state["whole"] = _has_length(headers)
                state["start"] = {**message, "headers": headers}  # sent with the first body bytes
                return
            if kind != "http.response.body" or not state["text"]:
                await _flush_start(message.get("body", b"") if kind == "http.response.body" else None)
                await send(message)
                return
            body, more = state["held"] + message.get("body", b""), message.get("more_body", False)
            if more and state["whole"]:  # a body of known length in pieces: redact it whole at the end
                state["held"] = body
                return
            if more:
                cut = body.rfind(b"\n") + 1
                if not cut and len(body) > _MAX_HELD:
                    cut = len(body) - 256
                body, state["held"] = body[:cut], body[cut:]
            else:
                state["held"] = b""
            out = redact(body)
            await _flush_start(out if state["whole"] else None, len(body))
            if out or not more:
                await send({**message, "body": out})

        async def _flush_start(out: bytes | None, original: int | None = None) -> None:
            start = state["start"]
            if start is None:
                return
            state["start"] = None
            if out is not None and original is not None and len(out) != original:
                start = {**start, "headers": _with_length(start["headers"], len(out))}
            await send(start)

        await self.app(scope, receive, redacting_send)
        if state["start"] is not None:  # a response without a body message
            await send(state["start"])
