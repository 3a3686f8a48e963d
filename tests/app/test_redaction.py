"""RedactionMiddleware in process: whole bodies (content-length corrected), streams (line by line, a key
split across chunks included), headers, binary bodies untouched."""

from __future__ import annotations

import asyncio
from secrets import token_hex

import httpx
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from app.redaction import RedactionMiddleware
from experts.remote.redact import MARK, Redactor

KEY = "sk-" + token_hex(20)


async def _json(request):
    return JSONResponse({"message": f"upstream said {KEY}", "n": 1}, headers={"x-echo": KEY})


async def _stream(request):
    async def gen():
        yield f'data: {{"text": "{KEY}"}}\n\n'
        yield f"data: split {KEY[:10]}"  # no newline yet: held back until the line ends
        yield f"{KEY[10:]} end\n\n"
        yield "data: [DONE]\n\n"
    return StreamingResponse(gen(), media_type="text/event-stream")


async def _binary(request):
    return Response(KEY.encode(), media_type="application/octet-stream")


def serve(method: str, path: str) -> httpx.Response:
    redactor = Redactor()
    redactor.add(KEY)
    app = Starlette(routes=[Route("/json", _json, methods=["GET", "HEAD"]), Route("/stream", _stream),
                            Route("/binary", _binary)])

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=RedactionMiddleware(app, redactor))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await c.request(method, path)

    return asyncio.run(go())


def test_whole_bodies_and_headers():
    r = serve("GET", "/json")
    assert r.json() == {"message": f"upstream said {MARK}", "n": 1} and r.headers["x-echo"] == MARK
    assert int(r.headers["content-length"]) == len(r.content)
    assert serve("HEAD", "/json").headers["content-length"] == r.headers["content-length"]  # as GET would send


def test_streams_and_binary():
    r = serve("GET", "/stream")
    assert KEY[:8] not in r.text and r.text.count(MARK) == 2 and r.text.endswith("data: [DONE]\n\n")
    assert f"split {MARK} end" in r.text
    assert serve("GET", "/binary").content == KEY.encode()
