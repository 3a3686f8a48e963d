"""experts/search_client.py: the HTTP Evaluator against a real local provider (uvicorn on
127.0.0.1 in a thread) with injected faults, plus httpx.MockTransport for transport errors."""

from __future__ import annotations

import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from experts.evo.http import (
    BudgetExhaustedError,
    EvaluationRejectedError,
    EvaluationUnavailableError,
    HttpEvaluator,
    create_session,
    session_evaluator,
)
from merging.search import evo_merging

KEY = "sk-test-search-client"
A_STAR = np.array([0.6, 0.3, 0.9])
B_STAR = np.array([0.5, -0.4, 0.2])


def quadratic(alpha: Any, beta: Any) -> float:
    return float(np.sum((np.asarray(alpha) - A_STAR) ** 2) + np.sum((np.asarray(beta) - B_STAR) ** 2))


def envelope(status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class Provider:
    """A tiny merge-session provider: quadratic loss, a queue of injected fault responses."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.faults: deque[JSONResponse] = deque()
        self.batch = True
        self.hits: list[str] = []

    def app(self) -> FastAPI:
        app = FastAPI()

        def check(request: Request, path: str) -> JSONResponse | None:
            with self.lock:
                self.hits.append(path)
                if request.headers.get("authorization") != f"Bearer {KEY}":
                    return envelope(401, "incorrect API key", "invalid_api_key")
                return self.faults.popleft() if self.faults else None

        def bad(alpha: list[float], beta: list[float]) -> JSONResponse | None:
            if len(alpha) != 3 or len(beta) != 3:
                return envelope(400, f"alpha and beta must have 3 values, got {len(alpha)} and {len(beta)}")
            return None

        @app.post("/v1/merge/sessions")
        async def create(request: Request, body: dict) -> Any:
            return check(request, "create") or {"id": "s1", "n": 3, "experts": ["a", "b", "c"]}

        @app.post("/v1/merge/sessions/{sid}/evaluate")
        async def evaluate(sid: str, request: Request, body: dict) -> Any:
            fault = check(request, "evaluate")
            alpha, beta = body["alpha"], body["beta"]
            return fault or bad(alpha, beta) or {"loss": quadratic(alpha, beta)}

        @app.post("/v1/merge/sessions/{sid}/evaluate_batch")
        async def evaluate_batch(sid: str, request: Request, body: dict) -> Any:
            if not self.batch:
                with self.lock:
                    self.hits.append("batch-404")
                return JSONResponse({"detail": "Not Found"}, status_code=404)
            fault = check(request, "batch")
            return fault or {"losses": [quadratic(c["alpha"], c["beta"]) for c in body["candidates"]]}

        return app


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, Provider]]:
    provider = Provider()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(provider.app(), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        assert time.monotonic() < deadline, "local provider did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", provider
    finally:
        srv.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture()
def provider(server: tuple[str, Provider]) -> Iterator[tuple[str, Provider, list[float]]]:
    url, p = server
    p.reset()
    yield url, p, []


def make(url: str, sleeps: list[float], **kw: Any) -> HttpEvaluator:
    return HttpEvaluator(url, "s1", KEY, n=3, sleep=sleeps.append, **kw)


def test_evaluate_returns_the_loss(provider) -> None:
    url, p, sleeps = provider
    with make(url, sleeps) as ev:
        assert ev.evaluate([0.6, 0.3, 0.9], [0.5, -0.4, 0.2]) == 0.0
        assert ev.evaluate([1, 1, 1], [0, 0, 0]) == quadratic([1, 1, 1], [0, 0, 0])
        assert ev.attempts == 2 and sleeps == [] and p.hits == ["evaluate", "evaluate"]


def test_503_then_ok_is_retried_with_backoff(provider) -> None:
    url, p, sleeps = provider
    p.faults.append(envelope(503, "warming up"))
    with make(url, sleeps, backoff=0.25) as ev:
        assert ev.evaluate([1, 1, 1], [0, 0, 0]) == quadratic([1, 1, 1], [0, 0, 0])
        assert (ev.attempts, ev.retried, sleeps) == (2, 1, [0.25])


def test_429_honours_retry_after(provider) -> None:
    url, p, sleeps = provider
    p.faults.append(envelope(429, "slow down", "rate_limited", headers={"Retry-After": "0"}))
    with make(url, sleeps, backoff=5.0) as ev:
        assert ev.evaluate([1, 1, 1], [0, 0, 0]) == quadratic([1, 1, 1], [0, 0, 0])
        assert ev.attempts == 2 and sleeps == [0.0]


def test_400_is_not_retried_and_carries_the_message(provider) -> None:
    url, p, sleeps = provider
    with make(url, sleeps) as ev, pytest.raises(EvaluationRejectedError, match="must have 3 values") as info:
        ev.evaluate([1, 1], [0, 0])
    assert info.value.status == 400 and info.value.attempts == 1 and p.hits == ["evaluate"] and sleeps == []


def test_spent_budget_and_exhausted_retries(provider) -> None:
    url, p, sleeps = provider
    p.faults.append(envelope(429, "query budget spent (1200 of 1200)", "budget_exhausted"))
    with make(url, sleeps) as ev, pytest.raises(BudgetExhaustedError, match="budget spent"):
        ev.evaluate([1, 1, 1], [0, 0, 0])
    assert p.hits == ["evaluate"] and sleeps == []

    p.faults.extend(envelope(502, "upstream down") for _ in range(3))
    with make(url, sleeps, retries=2, backoff=0.1) as ev, pytest.raises(EvaluationUnavailableError) as info:
        ev.evaluate([1, 1, 1], [0, 0, 0])
    assert info.value.status == 502 and info.value.attempts == 3 and sleeps == [0.1, 0.2]

    p.faults.append(envelope(429, "come back later", headers={"Retry-After": "3600"}))
    with make(url, sleeps, retry_after_cap=60) as ev, pytest.raises(EvaluationUnavailableError):
        ev.evaluate([1, 1, 1], [0, 0, 0])  # longer than the cap: not waited for


def test_wrong_key_is_rejected_without_leaking_it(provider) -> None:
    url, p, sleeps = provider
    with HttpEvaluator(url, "s1", "sk-wrong-secret", sleep=sleeps.append) as ev:
        with pytest.raises(EvaluationRejectedError) as info:
            ev.evaluate([1, 1, 1], [0, 0, 0])
    assert info.value.status == 401 and "sk-wrong-secret" not in str(info.value) and sleeps == []


def test_evaluate_many_uses_the_batch_endpoint_or_falls_back_on_404(provider) -> None:
    url, p, sleeps = provider
    cands = [([1.0, 0.5, 0.0], [0.1 * i, 0.0, -0.1]) for i in range(6)]
    expected = [quadratic(a, b) for a, b in cands]
    with make(url, sleeps) as ev:
        assert ev.evaluate_many(cands) == expected and p.hits == ["batch"]
    p.reset()
    p.batch = False
    p.faults.append(envelope(503, "busy"))  # one single call fails once, then succeeds
    with make(url, sleeps, concurrency=3) as ev:
        assert ev.evaluate_many(cands) == expected
        assert ev.evaluate_many(cands[:2]) == expected[:2]  # no second batch attempt
    assert p.hits.count("batch-404") == 1 and p.hits.count("evaluate") == 6 + 1 + 2


def test_search_over_http_equals_in_process(provider) -> None:
    """The true black-box case: same seed, same result, through a local server or in process."""

    class Local:
        n = 3

        def evaluate(self, alpha, beta):
            return quadratic(alpha, beta)

    kw = {"budget_stage1": 40, "budget_stage2": 40, "seed": 11}
    local = evo_merging(Local(), 3, **kw).to_dict()
    url, p, sleeps = provider
    session = create_session(url, KEY, {"base": "demo", "pool": ["a", "b", "c"], "validation": []})
    with session_evaluator(url, KEY, session, sleep=sleeps.append) as ev:
        assert (ev.session_id, ev.n) == ("s1", 3)
        assert evo_merging(ev, 3, **kw).to_dict() == local
        assert p.hits.count("batch") == 4  # two generations per stage, one request each
    p.batch = False
    with session_evaluator(url, KEY, session, sleep=sleeps.append, concurrency=4) as ev:
        assert evo_merging(ev, 3, **kw).to_dict() == local


def test_transport_errors_with_mock_transport() -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if len(calls) == 1:
            raise httpx.ConnectError("connection refused", request=request)
        if len(calls) == 2:
            raise httpx.ReadTimeout("timed out", request=request)
        return httpx.Response(200, json={"loss": 1.5})

    sleeps: list[float] = []
    client = httpx.Client(transport=httpx.MockTransport(handler))
    ev = HttpEvaluator("http://provider", "s9", KEY, client=client, backoff=1.0, sleep=sleeps.append)
    assert ev.evaluate([1.0], [1.0]) == 1.5
    assert calls == ["/v1/merge/sessions/s9/evaluate"] * 3 and sleeps == [1.0, 2.0]

    calls.clear()  # creating a session is not idempotent: a lost response is not retried
    with pytest.raises(EvaluationUnavailableError, match="ReadTimeout"):
        create_session("http://provider", KEY, {}, client=client, sleep=sleeps.append)
    assert calls == ["/v1/merge/sessions"] * 2  # the connect error was retried, the timeout not

    bad = httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(200, json={"oops": 1})))
    with pytest.raises(Exception, match="numeric loss"):
        HttpEvaluator("http://provider", "s9", client=bad).evaluate([1.0], [1.0])
