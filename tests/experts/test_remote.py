"""Remote-expert building blocks without a network: breaker, key store, spec, retries and the stream relay
(against httpx.MockTransport, with a recorded sleep instead of real backoff)."""

from __future__ import annotations

import asyncio
import json
import random
import stat

import httpx
import pytest

from experts.errors import InvalidExpertError, UpstreamError
from experts.remote.breaker import CircuitBreaker
from experts.remote.expert import RemoteExpert
from experts.remote.secrets import SecretStore
from experts.remote.upstream import RemoteRuntime, RemoteSpec, retry_after_s, split_events
from experts.repository.registry import ExpertRecord
from tests.helpers import FakeClock


def test_breaker_cycle():
    clock = FakeClock()
    b = CircuitBreaker(threshold=3, cooldown_s=10, clock=clock)
    for _ in range(2):
        assert b.allow()
        b.failure()
    b.success()  # success resets the consecutive count
    for _ in range(3):
        assert b.allow()
        b.failure()
    assert b.state == "open" and not b.allow() and b.retry_after() == 10
    clock.t += 10
    assert b.state == "half_open" and b.allow() and not b.allow()  # exactly one probe
    b.failure()  # the probe failed: open for another cool-down
    assert b.state == "open" and b.times_opened == 2
    clock.t += 10
    assert b.allow()
    b.release()  # the probe was abandoned: another may go
    assert b.allow()
    b.success()
    assert b.state == "closed" and b.allow() and b.allow()


def test_secret_store(tmp_path):
    store = SecretStore(tmp_path / "secrets")
    assert store.get("a") is None
    store.set("a", "k1")
    store.set("a", "k2")
    path = tmp_path / "secrets" / "a.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert SecretStore(tmp_path / "secrets").get("a") == "k2" and store.ids() == ["a"]
    assert [p.name for p in path.parent.iterdir()] == ["a.key"]  # no temp files left behind
    with pytest.raises(InvalidExpertError):
        store.set("../escape", "k")
    store.delete("a")
    assert store.get("a") is None and not path.exists()


def test_spec_round_trip_and_validation():
    spec = RemoteSpec.from_dict({"base_url": "http://h:1/v1/", "model": "m", "timeouts": {"read": 3},
                                 "breaker": {"threshold": 2}, "fallbacks": ["x"]})
    assert spec.base_url == "http://h:1/v1" and spec.read_timeout_s == 3.0 and spec.connect_timeout_s == 5.0
    assert RemoteSpec.from_dict(spec.to_dict()) == spec and spec.fallbacks == ("x",)
    for bad in ({"base_url": "http://u:p@h/v1", "model": "m"}, {"base_url": "h:1", "model": "m"},
                {"base_url": "http://h/v1?key=1", "model": "m"}, {"base_url": "http://h/v1", "model": " "},
                {"base_url": "http://h/v1", "model": "m", "max_retries": 11}, {"model": "m"},
                {"base_url": "http://h/v1", "model": "m", "timeouts": {"read": "soon"}}):
        with pytest.raises(InvalidExpertError):
            RemoteSpec.from_dict(bad)
    rng = random.Random(0)
    delays = [spec.backoff(n, rng) for n in range(6)]
    assert all(0.5 * min(4.0, 0.25 * 2 ** n) <= d <= min(4.0, 0.25 * 2 ** n) for n, d in enumerate(delays))


def test_retry_after_and_sse_split():
    assert retry_after_s(httpx.Headers({"retry-after": "2"})) == 2.0
    assert retry_after_s(httpx.Headers({"retry-after-ms": "250", "retry-after": "9"})) == 0.25
    assert retry_after_s(httpx.Headers({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}), now=1445412470) == 10
    assert retry_after_s(httpx.Headers({"retry-after": "soon"})) is None
    assert retry_after_s(httpx.Headers()) is None
    events, rest = split_events(b"data: 1\r\n\r\n: ping\n\ndata: 2\n\ndata: par")
    assert events == [b"data: 1", b": ping", b"data: 2"] and rest == b"data: par"


# -- RemoteExpert against a mock transport ----------------------------------------------------------
def make(handler, tmp_path, **spec) -> tuple[RemoteExpert, list[float]]:
    sleeps: list[float] = []

    async def sleep(s: float) -> None:
        sleeps.append(s)

    secrets = SecretStore(tmp_path / "secrets")
    secrets.set("r", "sk-secret")
    runtime = RemoteRuntime(httpx.AsyncClient(transport=httpx.MockTransport(handler)), secrets,
                            rng=random.Random(1), sleep=sleep)
    record = ExpertRecord(id="r", kind="remote", spec={"base_url": "http://up/v1", "model": "up-model", **spec})
    return RemoteExpert(record, runtime), sleeps


def test_proxy_retries_with_backoff_and_forwards_everything(tmp_path):
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if len(seen) < 3:
            return httpx.Response(503 if len(seen) == 1 else 500, json={"error": {"message": "down"}},
                                  headers={"retry-after": "0.5"} if len(seen) == 1 else {})
        return httpx.Response(200, json={"id": "x", "model": "up-model", "choices": [], "usage": {"total_tokens": 1}})

    expert, sleeps = make(handler, tmp_path, max_retries=3)
    data, ms = asyncio.run(expert.proxy("/completions", {"model": "r", "prompt": "p", "user": "u", "custom": [1]}))
    body = json.loads(seen[-1].content)
    assert body == {"model": "up-model", "prompt": "p", "user": "u", "custom": [1]}
    assert seen[-1].headers["authorization"] == "Bearer sk-secret" and str(seen[-1].url) == "http://up/v1/completions"
    assert data["model"] == "r" and data["usage"] == {"total_tokens": 1} and ms >= 0
    assert sleeps[0] == 0.5 and 0.25 <= sleeps[1] <= 0.5  # Retry-After honoured, then backoff for attempt 2
    c = expert.health.counters
    assert (c.attempts, c.retries, c.successes, c.failures) == (3, 2, 1, 0)


def test_4xx_is_relayed_once_and_breaker_fails_fast(tmp_path):
    calls = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if request.url.path.endswith("/chat/completions"):
            return httpx.Response(422, json={"error": {"message": "bad sk-secret", "param": "messages", "code": "x"}})
        return httpx.Response(500, text="oops")

    expert, sleeps = make(handler, tmp_path, max_retries=2, breaker={"threshold": 3, "cooldown_s": 60})
    with pytest.raises(UpstreamError) as e:
        asyncio.run(expert.proxy("/chat/completions", {"messages": []}))
    assert e.value.status == 422 and e.value.param == "messages" and "sk-secret" not in str(e.value)
    assert calls["n"] == 1 and not e.value.fallback_ok
    with pytest.raises(UpstreamError) as e:
        asyncio.run(expert.proxy("/completions", {}))
    assert e.value.status == 502 and calls["n"] == 4 and "after 3 attempts" in str(e.value)
    assert expert.health.breaker.state == "open" and len(sleeps) == 2
    with pytest.raises(UpstreamError) as e:
        asyncio.run(expert.proxy("/completions", {}))
    assert e.value.kind == "breaker_open" and e.value.status == 503 and calls["n"] == 4
    assert e.value.retry_after and e.value.retry_after > 59


def test_stream_relay_rewrites_model_across_chunk_boundaries(tmp_path):
    wire = (b'data: {"model":"up-model","choices":[{"text":"a"}]}\n\n: keep-alive\n\n'
            b'data: {"model":"up-model","choices":[{"text":"b"}]}\n\ndata: [DONE]\n\n')

    async def body():
        for i in range(0, len(wire), 7):  # events split at arbitrary points
            yield wire[i:i + 7]

    def handler(request: httpx.Request) -> httpx.Response:
        assert json.loads(request.content)["stream"] is True
        return httpx.Response(200, content=body(), headers={"content-type": "text/event-stream"})

    expert, _ = make(handler, tmp_path)

    async def run() -> list[bytes]:
        chunks, _ = await expert.proxy_stream("/completions", {"prompt": "p"})
        return [c async for c in chunks]

    out = asyncio.run(run())
    assert out == [b'data: {"model":"r","choices":[{"text":"a"}]}\n\n', b": keep-alive\n\n",
                   b'data: {"model":"r","choices":[{"text":"b"}]}\n\n', b"data: [DONE]\n\n"]
    assert expert.health.counters.in_flight == 0


def test_stream_without_done_is_an_error_after_the_first_event(tmp_path):
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b'data: {"choices":[]}\n\n')

    expert, _ = make(handler, tmp_path)

    async def run() -> list[bytes]:
        chunks, _ = await expert.proxy_stream("/completions", {})
        got = []
        with pytest.raises(UpstreamError) as e:
            async for c in chunks:
                got.append(c)
        assert e.value.kind == "stream_broken"
        return got

    assert asyncio.run(run()) == [b'data: {"choices":[]}\n\n']
    assert expert.health.counters.errors == {"stream_broken": 1} and expert.health.counters.in_flight == 0


def test_sync_score_from_a_worker_thread_and_errors_in_a_200(tmp_path):
    import anyio.to_thread

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if body["prompt"] == "oops":
            return httpx.Response(200, json={"error": {"message": "quota exceeded"}})
        lp = {"tokens": ["a", "b"], "token_logprobs": [None, -0.5], "top_logprobs": [None, {"b": -0.5}],
              "text_offset": [0, 1]}
        return httpx.Response(200, json={"choices": [{"text": "ab", "logprobs": lp}], "model": "up-model"})

    expert, _ = make(handler, tmp_path)

    async def run():
        tokens = await anyio.to_thread.run_sync(lambda: expert.score("ab", top_logprobs=1))
        with pytest.raises(UpstreamError) as e:
            await expert.proxy("/completions", {"prompt": "oops"})
        return tokens, e.value

    tokens, err = asyncio.run(run())
    assert [(t.token, t.logprob, t.top) for t in tokens] == [("a", None, ()), ("b", -0.5, (("b", -0.5),))]
    assert err.status == 502 and "quota exceeded" in str(err)
    with pytest.raises(Exception, match="async proxy path"):
        expert.score("ab")  # not in a worker thread
