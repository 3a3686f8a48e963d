"""A fault-injecting OpenAI-compatible upstream for the remote-expert tests.

Served by uvicorn in a background thread on 127.0.0.1; the test sets `mode` and reads the counters.
Modes: normal, slow (first byte after `delay`), rate_limit (429 with Retry-After `fail_times` times,
then OK), fail_then_ok (500 `fail_times` times, then OK; a large fail_times means always), reject
(`status` with an OpenAI error that echoes the caller's key, as some providers do), malformed (200
with a body that is not JSON), drop (a stream whose connection is cut after two chunks), hang (a
stream that sends one chunk and then nothing, until the client goes away or `hang_cap_s` passes).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.helpers import free_port

MODEL = "fake-model"
TEXT = ["Hel", "lo", " world"]
USAGE = {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}


class FakeUpstream:
    def __init__(self) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}/v1"
        self.reset()
        app = Starlette(routes=[Route("/v1/models", self._models),
                                Route("/v1/completions", self._answer, methods=["POST"]),
                                Route("/v1/chat/completions", self._answer, methods=["POST"])])
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="critical", lifespan="off",
                                timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="fake-upstream", daemon=True)

    def reset(self, mode: str = "normal", *, fail_times: int = 0, retry_after: str = "1", delay: float = 0.0,
              status: int = 401, hang_cap_s: float = 20.0) -> FakeUpstream:
        self.mode, self.fail_times, self.retry_after, self.delay = mode, fail_times, retry_after, delay
        self.status, self.hang_cap_s = status, hang_cap_s
        self.attempts = 0  # POSTs to /completions or /chat/completions
        self.model_calls = 0
        self.auth: list[str] = []
        self.bodies: list[dict[str, Any]] = []
        self.streams_closed = 0  # hung streams ended because the client went away
        return self

    # -- life cycle -------------------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> FakeUpstream:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("fake upstream did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def wait_for(self, predicate: Any, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.02)
        return predicate()

    # -- endpoints --------------------------------------------------------------------------------
    async def _models(self, request: Request) -> Response:
        self.model_calls += 1
        return JSONResponse({"object": "list", "data": [{"id": MODEL, "object": "model", "created": 1,
                                                          "owned_by": "fake"}]})

    async def _answer(self, request: Request) -> Response:
        self.attempts += 1
        self.auth.append(request.headers.get("authorization", ""))
        body = await request.json()
        self.bodies.append(body)
        chat = request.url.path.endswith("/chat/completions")
        mode = self.mode
        if mode == "slow":
            await asyncio.sleep(self.delay)
        if mode == "fail_then_ok" and self.attempts <= self.fail_times:
            return JSONResponse({"error": {"message": "upstream exploded", "type": "server_error"}}, status_code=500)
        if mode == "rate_limit" and self.attempts <= self.fail_times:
            return JSONResponse({"error": {"message": "slow down", "type": "rate_limit_error"}}, status_code=429,
                                headers={"Retry-After": self.retry_after})
        if mode == "reject":
            token = request.headers.get("authorization", "").removeprefix("Bearer ")
            return JSONResponse({"error": {"message": f"Incorrect API key provided: {token}",
                                           "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}},
                                status_code=self.status)
        if mode == "malformed":
            return Response(b'{"id": "cmpl-1", "choices": [', media_type="application/json")
        if body.get("stream"):
            return StreamingResponse(self._events(body, chat, mode), media_type="text/event-stream")
        return JSONResponse(_answer(body, chat))

    async def _events(self, body: dict[str, Any], chat: bool, mode: str):
        usage = (body.get("stream_options") or {}).get("include_usage")
        for i, piece in enumerate(TEXT):
            if mode == "drop" and i == 2:
                raise ConnectionResetError("fake upstream drops the connection")
            yield _sse(_chunk(body, chat, piece, None, first=i == 0))
            if mode == "hang":
                try:
                    deadline = time.monotonic() + self.hang_cap_s
                    while time.monotonic() < deadline:
                        await asyncio.sleep(0.05)
                finally:
                    self.streams_closed += 1
                return
        yield _sse(_chunk(body, chat, "", "stop", first=False))
        if usage:
            yield _sse({**_chunk(body, chat, "", None, first=False), "choices": [], "usage": USAGE})
        yield b"data: [DONE]\n\n"


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _answer(body: dict[str, Any], chat: bool) -> dict[str, Any]:
    text = "".join(TEXT)
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": "stop"}
        return {"id": "chatcmpl-fake", "object": "chat.completion", "created": 1, "model": body["model"],
                "choices": [choice], "usage": USAGE, "provider_extra": {"kept": True}}
    return {"id": "cmpl-fake", "object": "text_completion", "created": 1, "model": body["model"],
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}], "usage": USAGE,
            "provider_extra": {"kept": True}}


def _chunk(body: dict[str, Any], chat: bool, piece: str, finish: str | None, *, first: bool) -> dict[str, Any]:
    if chat:
        delta = {"role": "assistant", "content": piece} if first else {"content": piece}
        return {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1, "model": body["model"],
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], "usage": None}
    return {"id": "cmpl-fake", "object": "text_completion", "created": 1, "model": body["model"],
            "choices": [{"index": 0, "text": piece, "logprobs": None, "finish_reason": finish}], "usage": None}
