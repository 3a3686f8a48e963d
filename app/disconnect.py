"""Cancel a request's work when its client goes away, for answers that are not streamed.

Streams are cancelled by Starlette when the client disconnects (the body iterator is closed). A
non-streamed handler is not: `until_disconnect` runs it next to a watcher of the ASGI receive channel
and cancels it on `http.disconnect`, so an abandoned request stops generating at the engine's next step.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request

from app.errors import ApiError

T = TypeVar("T")


class ClientDisconnected(ApiError):
    def __init__(self) -> None:
        super().__init__(499, "the client closed the connection", code="client_disconnected")


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    raise ClientDisconnected()
