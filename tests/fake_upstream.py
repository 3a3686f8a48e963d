"""A fault-injecting OpenAI-compatible upstream for the remote-expert tests.

Served by uvicorn in a background thread on 127.0.0.1; the test sets `mode` and reads the counters.
Modes: normal, slow (first byte after `delay`), rate_limit (429 with Retry-After `fail_times` times,
then OK), fail_then_ok (500 `fail_times` times, then OK; a large fail_times means always), reject
(`status` with an OpenAI error that echoes the caller's key, as some providers do), malformed (200
with a body that is not JSON), drop (a stream whose connection is cut after two chunks), hang (a
stream that sends one chunk and then nothing, until the client goes away or `hang_cap_s` passes).

Leaky routes, for the leak hunt (tests/test_leaks.py): under `/leak/{plan}/v1/...` the upstream echoes the
caller's bearer key back in every way an upstream can. `plan` is comma-separated `target=action` pairs;
targets: `models` (GET /models), `completions`, `chat` or `post` (both), and for the merge-session
contract (provider root `/leak/{plan}`): `create`, `evaluate` (single and batch), `materialize`.
Unnamed targets behave normally (the normal answers also carry the key where a field allows).
See `LEAK_ACTIONS` for the actions.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from typing import Any
from urllib.parse import quote

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.helpers import free_port, wait_until

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
                                Route("/v1/chat/completions", self._answer, methods=["POST"]),
                                Route("/leak/{plan}/v1/{rest:path}", self._leak, methods=["GET", "POST", "DELETE"])])
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
        self.leak_auth: list[str] = []  # bearer keys received on the leaky routes, in order
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
        return wait_until(predicate, timeout)

    # -- endpoints --------------------------------------------------------------------------------
    async def _leak(self, request: Request) -> Response:
        return await leak_route(self, request)

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


# -- the leaky routes ---------------------------------------------------------------------------------
LEAK_ACTIONS = {
    "json<status>": "an OpenAI error envelope with the key in message, type, code and param",
    "odd<n>": "error bodies of odd shapes (n = 0..5): the key in nested fields and as a dict key, a bare list "
              "or string",
    "text<status>": "a plain-text body with the key, and the key in response headers",
    "long<status>": "messages longer than any cut (300, 1000 characters) with the key where a cut falls",
    "uescape": "a JSON error whose key is spelled with \\u escapes", "encoded": "URL-encoded and base64 forms",
    "429": "429 with Retry-After: 0 and the key in the body and headers", "redirect": "307 to a URL holding the key",
    "slow": "1.5 s of silence, then a 500 with the key", "ok": "200, the key in text, model, odd fields and keys",
    "streamerror": "a stream whose second event is an error event with the key", "streamdrop": "a stream cut "
    "after a chunk with the key", "hang": "a stream with the key in its first chunk, then silence",
    "list": "GET /models listing the key (not the model)", "reject": "(provider) 401 with the key",
    "garbage": "(provider) a losses answer that is not a list, ending with the key",
    "leak": "(provider) materialize answers with the key in its lineage", "odd": "(provider) a session view "
    "with the key among the experts",
}


def _echo_headers(key: str) -> dict[str, str]:
    return {"x-echo-key": key, "www-authenticate": f'Bearer error="invalid_token", key="{key}"',
            "set-cookie": f"session={quote(key)}", "x-debug-b64": base64.b64encode(key.encode()).decode()}


def _odd(n: int, key: str) -> Any:
    return [{"error": {"detail": {key: [key, {"k": key}]}}}, {"error": [key, 1]}, [key, {"nested": [key]}], key,
            {"error": {"message": {"inner": key}, "type": key}}, {"message": None, "detail": f"bad token {key}"}][n % 6]


def _escaped(key: str) -> bytes:
    spelled = "".join(f"\\u{ord(c):04x}" for c in key)
    return ('{"error": {"message": "bad key ' + spelled + '", "code": "' + spelled + '"}}').encode()


def leak_error(action: str, key: str) -> Response | None:
    """The error answer of `action` (None: not an error action)."""
    digits = "".join(ch for ch in action if ch.isdigit())
    status = int(digits) if len(digits) == 3 else 400
    if action.startswith("json"):
        return JSONResponse({"error": {"message": f"Incorrect API key provided: {key}", "type": key, "code": key,
                                       "param": key}}, status_code=status, headers=_echo_headers(key))
    if action.startswith("odd"):
        return JSONResponse(_odd(int(digits or 0), key), status_code=500 if int(digits or 0) % 2 else 400)
    if action.startswith("text"):
        return Response(f"Unauthorized: the key {key} is not valid here\n<b>{key}</b>", status_code=status,
                        media_type="text/plain", headers=_echo_headers(key))
    if action == "longtext":
        return Response("y" * 290 + key + "w" * 20, status_code=500, media_type="text/plain")
    if action.startswith("long"):
        message = "x" * 290 + key + " " + "z" * max(0, 994 - 291 - len(key)) + key + "y" * 50
        return JSONResponse({"error": {"message": message}}, status_code=status)
    if action == "uescape":
        return Response(_escaped(key), status_code=400, media_type="application/json")
    if action == "encoded":
        forms = [json.dumps(key)[1:-1], quote(key, safe=""), base64.b64encode(key.encode()).decode(),
                 base64.b64encode(f"Bearer {key}".encode()).decode(), base64.urlsafe_b64encode(key.encode()).decode()]
        return JSONResponse({"error": {"message": "forms: " + " | ".join(forms)}}, status_code=401)
    if action == "429":
        return JSONResponse({"error": {"message": f"slow down, {key}", "code": key}}, status_code=429,
                            headers={"Retry-After": "0", **_echo_headers(key)})
    if action == "redirect":
        return JSONResponse({"error": {"message": f"moved: use {key}"}}, status_code=307,
                            headers={"location": f"http://evil.invalid/steal?key={quote(key, safe='')}&raw={key}",
                                     **_echo_headers(key)})
    if action == "reject":
        return JSONResponse({"error": {"message": "x" * 180 + f" unknown key {key}", "code": "invalid_api_key"}},
                            status_code=401, headers=_echo_headers(key))
    return None


def _leak_chunk(body: dict[str, Any], chat: bool, piece: str, key: str) -> dict[str, Any]:
    chunk = _chunk(body, chat, piece, None, first=False)
    chunk["system_fingerprint"] = key
    chunk[key] = {"nested": [key]}
    return chunk


async def _leak_events(body: dict[str, Any], chat: bool, action: str, key: str, up: Any) -> Any:
    yield _sse(_leak_chunk(body, chat, f"the key is {key}", key))
    if action == "streamdrop":
        raise ConnectionResetError("fake upstream drops the connection")
    if action == "hang":
        await asyncio.sleep(up.hang_cap_s)
        return
    if action == "streamerror":
        yield _sse({"error": {"message": f"upstream failed mid-stream for {key}", "type": key, "code": key}})
        yield b"data: [DONE]\n\n"
        return
    yield b": comment " + key.encode() + b"\n\n"
    yield b"event: " + key.encode() + b"\ndata: " + _escaped(key) + b"\n\n"
    yield _sse({**_chunk(body, chat, quote(key), "stop", first=False), "model": key})
    yield b"data: [DONE]\n\n"


def _leak_answer(body: dict[str, Any], chat: bool, key: str) -> dict[str, Any]:
    out = _answer(body, chat)
    out["model"], out["system_fingerprint"], out[key] = key, key, [{key: key}]
    if chat:
        out["choices"][0]["message"]["content"] = f"your key: {key}"
    else:
        out["choices"][0]["text"] = f"your key: {key}"
    out["provider_extra"] = {"b64": base64.b64encode(key.encode()).decode(), "deep": [[[{"k": key}]]]}
    return out


async def leak_route(self: FakeUpstream, request: Request) -> Response:
    key = request.headers.get("authorization", "").removeprefix("Bearer ")
    self.leak_auth.append(key)
    plan = dict(p.split("=", 1) for p in request.path_params["plan"].split(",") if "=" in p)
    rest = request.path_params["rest"]
    if request.method == "DELETE":
        return JSONResponse({"deleted": True})
    body = await request.json() if request.method == "POST" else {}
    if rest == "models":
        action = plan.get("models", "")
        if action == "list":
            return JSONResponse({"data": [{"id": key, "owner": key}, {"id": f"other-{key}"}]})
        return leak_error(action, key) or JSONResponse({"data": [{"id": MODEL}]})
    if rest.startswith("merge/sessions"):
        return await _leak_provider(rest, body, plan, key)
    chat = rest.endswith("chat/completions")
    action = plan.get("chat" if chat else "completions", plan.get("post", ""))
    if action == "slow":
        await asyncio.sleep(1.5)
        action = "json500"
    error = leak_error(action, key)
    if error is not None:
        return error
    if body.get("stream"):
        return StreamingResponse(_leak_events(body, chat, action, key, self), media_type="text/event-stream",
                                 headers=_echo_headers(key))
    return JSONResponse(_leak_answer(body, chat, key), headers=_echo_headers(key))


async def _leak_provider(rest: str, body: dict[str, Any], plan: dict[str, str], key: str) -> Response:
    parts = rest.split("/")
    if len(parts) == 2:  # create
        action = plan.get("create", "")
        if action == "odd":
            return JSONResponse({"id": "msess-1", "n": 2, "experts": [key, "a2"], key: key, "note": "x" * 150 + key})
        return leak_error(action, key) or JSONResponse({"id": "msess-1", "n": 2, "experts": ["a1", "a2"]})
    op = parts[-1]
    if op == "materialize":
        if plan.get("materialize") == "leak":
            return JSONResponse({"id": MODEL, "lineage": {"note": key, key: [key], "deep": {"k": [key]}}, "echo": key})
        return leak_error(plan.get("materialize", ""), key) or JSONResponse({"id": MODEL})
    action = plan.get("evaluate", "")
    if action == "garbage":
        return JSONResponse({"losses": "g" * 170 + key})
    error = leak_error(action, key)
    if error is not None:
        return error
    if op == "evaluate_batch":
        return JSONResponse({"losses": [0.5 + 0.1 * i for i, _ in enumerate(body.get("candidates", []))]})
    return JSONResponse({"loss": 0.5})
