"""Server-sent events in the format the OpenAI client parses."""

from __future__ import annotations

import json
from typing import Any

from app.errors import error_body, to_api_error

SSE_DONE = "data: [DONE]\n\n"


def sse_event(payload: Any) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def sse_error(exc: BaseException) -> str:
    """An error after the stream started: status can no longer change, so it travels as an event."""
    return sse_event(error_body(to_api_error(exc)))
