"""Running the app under uvicorn, with the OpenAI error envelope even for requests the app never sees.

uvicorn answers a request its HTTP parser refuses (a negative or non-numeric Content-Length, a broken
request line or header) itself, with a plain-text 400. The protocol classes here send the same 400 as
the error envelope `{"error": {message, type, param, code}}`, and still close the connection.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

BAD_REQUEST = {"error": {"message": "invalid HTTP request: the request line or a header (such as Content-Length) "
                                    "could not be parsed", "type": "invalid_request_error", "param": None,
                         "code": "invalid_http_request"}}


def _envelope_400() -> bytes:
    body = json.dumps(BAD_REQUEST).encode()
    head = (b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: "
            + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n")
    return head + body


def http_protocol() -> type[asyncio.Protocol]:
    """The HTTP protocol class uvicorn's `auto` would pick (httptools when installed, else h11), answering
    unparsable requests with the envelope. uvicorn is imported here: only `serve` and `demo` need it."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class EnvelopeHTTPProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        def send_400_response(self, msg: str) -> None:
            self.transport.write(_envelope_400())
            self.transport.close()

    return EnvelopeHTTPProtocol


def serve(app: Any, *, host: str, port: int, log_level: str) -> None:
    import uvicorn  # lazy: only `serve` and `demo` need the server

    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False, http=http_protocol())
