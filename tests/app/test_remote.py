"""Remote experts end to end: a front gateway process proxying to a second MergeGate and to a faulty upstream.

Every response the front gateway sends goes through `call`, so the last test can check that no API
key ever appeared in a response body, a header or the gateway's (debug-level) log.
"""

from __future__ import annotations

import asyncio
import json
import stat
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.fake_upstream import MODEL, TEXT, USAGE, FakeUpstream
from tests.helpers import ADMIN_KEY, CLIENT_KEY, Gateway, free_port

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
UPSTREAM = {"Authorization": f"Bearer {CLIENT_KEY}"}
FAKE_KEY = "sk-fake-9f8e7d6c5b4a-SECRET"
NEW_KEY = "sk-rotated-0a1b2c3d-SECRET"
FAST = {"retry": {"backoff_base_s": 0.01, "backoff_max_s": 0.05}}
SEEN: list[str] = []  # every response of the front gateway (bodies and headers)


@pytest.fixture(scope="module")
def fake():
    upstream = FakeUpstream().start()
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def front(tmp_path_factory, tiny_model_dir, request):
    """The gateway under test (debug logging, open /v1), with a local expert `local-tiny` for fallbacks."""
    gw = Gateway(tmp_path_factory.mktemp("front") / "data", extra_env={"MERGEGATE_LOG_LEVEL": "debug"})
    with ThreadPoolExecutor(1) as pool:
        boot = pool.submit(lambda: gw.start().register("local-tiny", tiny_model_dir))
        try:
            request.getfixturevalue("gateway")  # the upstream gateway starts meanwhile
            boot.result(timeout=240)
            yield gw
        finally:
            gw.stop()


@pytest.fixture(scope="module")
def mg(front, gateway):
    """The second MergeGate (serving `tiny`, client key required) registered on the front as `mg`."""
    view = add_remote(front, "mg", gateway.base + "/v1", model="tiny", api_key=CLIENT_KEY, check=True)
    assert view["check"]["ok"] and view["check"]["method"] == "models" and view["check"]["model_listed"]
    return view


def call(front: Gateway, method: str, path: str, **kw) -> httpx.Response:
    r = httpx.request(method, front.base + path, timeout=30, **kw)
    SEEN.append(r.text + json.dumps(dict(r.headers)))
    return r


def add_remote(front: Gateway, expert_id: str, base_url: str, *, model: str = MODEL, api_key: str | None = FAKE_KEY,
               check: bool = False, **spec) -> dict:
    body = {"id": expert_id, "base_url": base_url, "model": model, "check": check, **spec}
    if api_key:
        body["api_key"] = api_key
    r = call(front, "POST", "/admin/experts/remote", json=body, headers=ADMIN)
    assert r.status_code == 201, r.text
    return r.json()


def remote(front: Gateway, expert_id: str) -> dict:
    r = call(front, "GET", f"/admin/experts/{expert_id}", headers=ADMIN)
    assert r.status_code == 200, r.text
    return r.json()["remote"]


def envelope(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and "Traceback" not in err["message"]
    return err


def events(text: str) -> list:
    out = []
    for block in text.split("\n\n"):
        data = [ln[6:] for ln in block.split("\n") if ln.startswith("data: ")]
        if data:
            out.append("[DONE]" if data[0] == "[DONE]" else json.loads("\n".join(data)))
    return out


def complete(front: Gateway, model: str, **body) -> httpx.Response:
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    return call(front, "POST", path, json={"model": model, "prompt": "hi", "max_tokens": 4, **body})


# -- a real MergeGate upstream: proxied output equals direct output -------------------------------------
@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "def main():", "max_tokens": 8, "temperature": 0, "logprobs": 2}),
    ("/v1/completions", {"prompt": ["one", "two"], "max_tokens": 5, "n": 2, "seed": 7}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Write a loop"}], "max_tokens": 6, "seed": 3}),
])
def test_proxied_equals_direct(front, gateway, mg, path, body):
    direct = httpx.post(gateway.base + path, json={**body, "model": "tiny"}, headers=UPSTREAM, timeout=30).json()
    r = call(front, "POST", path, json={**body, "model": "mg"})
    assert r.status_code == 200, r.text
    proxied = r.json()
    assert proxied["choices"] == direct["choices"] and proxied["usage"] == direct["usage"]
    assert proxied["model"] == "mg" and proxied["object"] == direct["object"]
    assert float(r.headers["x-mergegate-overhead-ms"]) >= 0 and r.headers["x-mergegate-expert"] == "mg"


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "import os", "max_tokens": 8, "temperature": 0}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 6, "temperature": 0}),
])
def test_proxied_stream_equals_direct(front, gateway, mg, path, body):
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    direct = events(httpx.post(gateway.base + path, json={**body, "model": "tiny"}, headers=UPSTREAM, timeout=30).text)
    r = call(front, "POST", path, json={**body, "model": "mg"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert "x-mergegate-overhead-ms" in r.headers
    proxied = events(r.text)
    assert proxied[-1] == "[DONE]" and len(proxied) == len(direct) > 3
    assert [e["choices"] for e in proxied[:-1]] == [e["choices"] for e in direct[:-1]]
    assert proxied[-2]["usage"] == direct[-2]["usage"] and proxied[-2]["usage"]["completion_tokens"] > 0
    assert {e["model"] for e in proxied[:-1]} == {"mg"}


def test_openai_client_through_remote(front, gateway, mg):
    client = openai.OpenAI(base_url=front.base + "/v1", api_key="unused", max_retries=0)
    direct = openai.OpenAI(base_url=gateway.base + "/v1", api_key=CLIENT_KEY, max_retries=0)
    kw = dict(prompt="The quick brown fox", max_tokens=7, temperature=0)
    got = client.completions.create(model="mg", **kw)
    assert got.choices[0].text == direct.completions.create(model="tiny", **kw).choices[0].text
    assert got.model == "mg" and got.usage.total_tokens > 0
    chat = dict(messages=[{"role": "user", "content": "Say something"}], max_tokens=6, temperature=0)
    want = direct.chat.completions.create(model="tiny", **chat)
    stream = client.chat.completions.create(model="mg", stream=True, stream_options={"include_usage": True}, **chat)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == want.usage.completion_tokens


def test_ascore_matches_direct_echo_logprobs(gateway, tmp_path):
    from experts.remote.expert import RemoteExpert
    from experts.remote.secrets import SecretStore
    from experts.remote.upstream import RemoteRuntime
    from experts.repository.registry import ExpertRecord

    async def score() -> list:
        async with httpx.AsyncClient() as http:
            secrets = SecretStore(tmp_path / "secrets")
            secrets.set("mg", CLIENT_KEY)
            spec = {"base_url": gateway.base + "/v1", "model": "tiny"}
            expert = RemoteExpert(ExpertRecord(id="mg", kind="remote", spec=spec), RemoteRuntime(http, secrets))
            return await expert.ascore("def main(): pass", top_logprobs=2)

    tokens = asyncio.run(score())
    direct = httpx.post(gateway.base + "/v1/completions", headers=UPSTREAM, json={
        "model": "tiny", "prompt": "def main(): pass", "max_tokens": 0, "echo": True, "logprobs": 2}).json()
    lp = direct["choices"][0]["logprobs"]
    assert [t.token for t in tokens] == lp["tokens"] and [t.logprob for t in tokens] == lp["token_logprobs"]
    assert dict(tokens[1].top) == lp["top_logprobs"][1]


# -- registration ----------------------------------------------------------------------------------------
def test_registration_checks_the_upstream(front, gateway, fake):
    fake.reset()
    view = add_remote(front, "checked", fake.base, check=True)
    assert view["check"]["method"] == "models" and view["check"]["models"] == [MODEL] and fake.model_calls == 1
    fake.reset()
    view = add_remote(front, "unchecked", fake.base, check=False)
    assert view["check"] is None and fake.model_calls == 0 and fake.attempts == 0
    body = {"id": "nope", "model": "tiny", "check": True}
    r = call(front, "POST", "/admin/experts/remote", headers=ADMIN,
             json={**body, "base_url": f"http://127.0.0.1:{free_port()}/v1"})
    assert envelope(r, 502)["code"] == "upstream_check_failed" and "cannot reach" in r.json()["error"]["message"]
    r = call(front, "POST", "/admin/experts/remote", headers=ADMIN,
             json={**body, "base_url": gateway.base + "/v1", "model": "ghost", "api_key": CLIENT_KEY})
    err = envelope(r, 400)
    assert "'ghost'" in err["message"] and "nope" in err["message"]
    r = call(front, "POST", "/admin/experts/remote", headers=ADMIN,
             json={**body, "base_url": gateway.base + "/v1", "api_key": "wrong-key-XYZ-123"})
    assert "rejected the API key" in envelope(r, 400)["message"] and "wrong-key-XYZ-123" not in r.text
    for bad in ({"base_url": "http://user:pw@127.0.0.1:1/v1"}, {"base_url": "ftp://x/v1"},
                {"base_url": fake.base, "fallbacks": ["ghost"]}, {"base_url": fake.base, "max_retries": 99}):
        envelope(call(front, "POST", "/admin/experts/remote", headers=ADMIN, json={**body, "check": False, **bad}), 400)
    envelope(call(front, "GET", "/admin/experts/nope", headers=ADMIN), 404)  # nothing was registered
    assert not (front.data_dir / "secrets" / "nope.key").exists()


def test_key_storage_rotation_and_patch(front, fake):
    fake.reset()
    view = add_remote(front, "rot", fake.base)
    assert view["remote"]["has_api_key"] and FAKE_KEY not in json.dumps(view)
    key_file = front.data_dir / "secrets" / "rot.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and key_file.read_text().strip() == FAKE_KEY
    assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
    assert FAKE_KEY.encode() not in (front.data_dir / "registry.db").read_bytes()
    assert complete(front, "rot").status_code == 200 and fake.auth[-1] == f"Bearer {FAKE_KEY}"
    assert fake.bodies[-1]["model"] == MODEL  # the model name is rewritten to the upstream's
    r = call(front, "PATCH", "/admin/experts/rot", headers=ADMIN,
             json={"api_key": NEW_KEY, "timeouts": {"read": 7}, "fallbacks": ["local-tiny"], "tags": ["x"]})
    assert r.status_code == 200, r.text
    spec = r.json()["spec"]
    assert spec["timeouts"] == {"connect": 5.0, "read": 7.0} and spec["fallbacks"] == ["local-tiny"]
    assert r.json()["tags"] == ["x"] and NEW_KEY not in r.text
    assert complete(front, "rot").status_code == 200 and fake.auth[-1] == f"Bearer {NEW_KEY}"
    assert key_file.read_text().strip() == NEW_KEY
    r = call(front, "PATCH", "/admin/experts/rot", headers=ADMIN, json={"api_key": None})
    assert r.json()["remote"]["has_api_key"] is False and not key_file.exists()
    assert complete(front, "rot").status_code == 200 and fake.auth[-1] == ""
    assert envelope(call(front, "PATCH", "/admin/experts/local-tiny", headers=ADMIN, json={"tags": []}), 400)
    call(front, "PATCH", "/admin/experts/rot", headers=ADMIN, json={"api_key": FAKE_KEY})
    assert key_file.exists()
    assert call(front, "DELETE", "/admin/experts/rot", headers=ADMIN).status_code == 200
    assert not key_file.exists()


# -- faults ----------------------------------------------------------------------------------------------
def test_5xx_retried_until_success(front, fake):
    add_remote(front, "flaky", fake.base, max_retries=2, **FAST)
    fake.reset("fail_then_ok", fail_times=2)
    r = complete(front, "flaky")
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "".join(TEXT) and fake.attempts == 3
    assert r.json()["usage"] == USAGE and r.json()["provider_extra"] == {"kept": True}  # passed through
    st = remote(front, "flaky")
    assert st["breaker"]["state"] == "closed" and st["breaker"]["consecutive_failures"] == 0
    assert st["counters"]["attempts"] == 3 and st["counters"]["retries"] == 2
    assert st["counters"]["errors"] == {"status_5xx": 2} and st["counters"]["failures"] == 0


def test_breaker_opens_fails_fast_and_closes(front, fake):
    add_remote(front, "brk", fake.base, max_retries=1, breaker={"threshold": 2, "cooldown_s": 3.0}, **FAST)
    fake.reset("fail_then_ok", fail_times=1000)
    r = complete(front, "brk")
    err = envelope(r, 502)
    assert err["code"] == "upstream_status_5xx" and "'brk'" in err["message"] and "2 attempts" in err["message"]
    assert r.headers["x-should-retry"] == "false" and fake.attempts == 2
    assert remote(front, "brk")["breaker"]["state"] == "open"
    r = complete(front, "brk", stream=True)  # open: fails fast, before any byte, for streams too
    assert envelope(r, 503)["code"] == "upstream_breaker_open" and int(r.headers["retry-after"]) >= 1
    assert fake.attempts == 2
    time.sleep(3.2)  # the cool-down is long enough that a loaded CI machine cannot outlast it mid-test
    assert remote(front, "brk")["breaker"]["state"] == "half_open"
    r = complete(front, "brk")  # the probe fails: open again, one attempt only
    assert r.status_code == 502 and fake.attempts == 3 and remote(front, "brk")["breaker"]["state"] == "open"
    time.sleep(3.2)
    fake.reset()
    assert complete(front, "brk").status_code == 200 and fake.attempts == 1
    st = remote(front, "brk")
    assert st["breaker"]["state"] == "closed" and st["breaker"]["times_opened"] == 2
    assert st["counters"]["errors"]["breaker_open"] == 1
    metrics = call(front, "GET", "/metrics", headers=ADMIN).text
    assert 'mergegate_remote_breaker_state{expert="brk"} 0.0' in metrics
    assert 'mergegate_remote_errors_total{error="breaker_open",expert="brk"} 1.0' in metrics
    assert 'mergegate_remote_overhead_seconds_count{expert="brk"}' in metrics


def test_429_honours_retry_after_or_relays_it(front, fake):
    add_remote(front, "rl", fake.base, max_retries=2, retry={"backoff_base_s": 0.01, "retry_after_cap_s": 2})
    fake.reset("rate_limit", fail_times=1, retry_after="1")
    t0 = time.monotonic()
    assert complete(front, "rl").status_code == 200 and fake.attempts == 2
    assert time.monotonic() - t0 >= 1.0
    fake.reset("rate_limit", fail_times=100, retry_after="30")  # longer than the cap: not waited for
    r = complete(front, "rl")
    err = envelope(r, 429)
    assert err["type"] == "rate_limit_error" and r.headers["retry-after"] == "30" and fake.attempts == 1


def test_4xx_relayed_without_retry_or_fallback_and_key_redacted(front, fake):
    add_remote(front, "rej", fake.base, max_retries=3, fallbacks=["local-tiny"], **FAST)
    for status in (401, 400):
        fake.reset("reject", status=status)
        r = complete(front, "rej")
        err = envelope(r, status)
        assert fake.attempts == 1 and "x-mergegate-expert" not in r.headers
        assert "'rej'" in err["message"] and "[redacted]" in err["message"] and FAKE_KEY not in r.text
        assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error"
    assert remote(front, "rej")["breaker"]["consecutive_failures"] == 0


def test_malformed_json_is_502(front, fake):
    add_remote(front, "bad", fake.base, max_retries=2, **FAST)
    fake.reset("malformed")
    err = envelope(complete(front, "bad"), 502)
    assert err["code"] == "upstream_malformed" and "'bad'" in err["message"] and fake.attempts == 1


def test_slow_first_byte_times_out_without_retry(front, fake):
    add_remote(front, "slow", fake.base, max_retries=2, timeouts={"read": 1.0}, **FAST)
    fake.reset("slow", delay=2.5)
    err = envelope(complete(front, "slow"), 504)
    assert err["code"] == "upstream_timeout" and fake.attempts == 1  # a read timeout is not retried
    assert envelope(complete(front, "slow", stream=True), 504)["code"] == "upstream_timeout"  # a status, not an event
    fake.reset("slow", delay=0.05)
    assert complete(front, "slow").status_code == 200


def test_connection_dropped_mid_stream(front, fake):
    add_remote(front, "drop", fake.base, **FAST)
    fake.reset("drop")
    r = complete(front, "drop", stream=True)
    assert r.status_code == 200
    evs = events(r.text)
    assert [e["choices"][0]["text"] for e in evs[:2]] == TEXT[:2]
    assert evs[2]["error"]["code"] == "upstream_stream_broken" and "'drop'" in evs[2]["error"]["message"]
    assert evs[3:] == ["[DONE]"] and fake.attempts == 1
    st = remote(front, "drop")
    assert st["counters"]["errors"] == {"stream_broken": 1} and st["counters"]["in_flight"] == 0


def test_stream_that_never_ends_is_cut_by_the_read_timeout(front, fake):
    add_remote(front, "hang", fake.base, timeouts={"read": 0.5}, **FAST)
    fake.reset("hang")
    t0 = time.monotonic()
    r = complete(front, "hang", stream=True)
    evs = events(r.text)
    assert r.status_code == 200 and time.monotonic() - t0 < 5
    assert evs[0]["choices"][0]["text"] == TEXT[0] and evs[1]["error"]["code"] == "upstream_timeout"
    assert evs[2:] == ["[DONE]"]
    assert fake.wait_for(lambda: fake.streams_closed == 1)  # the upstream request was closed


def test_client_disconnect_cancels_the_upstream_request(front, fake):
    add_remote(front, "hang2", fake.base, timeouts={"read": 30})
    fake.reset("hang", hang_cap_s=30)
    with httpx.stream("POST", front.base + "/v1/completions", timeout=10,
                      json={"model": "hang2", "prompt": "x", "stream": True}) as r:
        assert r.status_code == 200
        first = next(r.iter_lines())
        assert first.startswith("data: ") and "hang2" in first
    assert fake.wait_for(lambda: fake.streams_closed == 1, timeout=5)
    deadline = time.monotonic() + 5
    while remote(front, "hang2")["counters"]["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.05)
    st = remote(front, "hang2")
    assert st["counters"]["in_flight"] == 0 and st["breaker"]["consecutive_failures"] == 0


def test_connect_errors_are_retried(front):
    add_remote(front, "down", f"http://127.0.0.1:{free_port()}/v1", max_retries=2, **FAST)
    err = envelope(complete(front, "down"), 503)
    assert err["code"] == "upstream_connect" and "'down'" in err["message"]
    assert remote(front, "down")["counters"]["attempts"] == 3


def test_fallbacks_in_order(front, gateway, fake, mg):
    add_remote(front, "fb", fake.base, max_retries=0, fallbacks=["mg", "local-tiny"],
               breaker={"threshold": 1, "cooldown_s": 60})
    fake.reset("fail_then_ok", fail_times=1000)
    body = {"prompt": "def main():", "max_tokens": 6, "temperature": 0}
    direct = httpx.post(gateway.base + "/v1/completions", json={**body, "model": "tiny"}, headers=UPSTREAM).json()
    r = complete(front, "fb", **body)
    assert r.status_code == 200 and r.headers["x-mergegate-expert"] == "mg"
    assert r.headers["x-mergegate-fallback-from"] == "fb" and r.json()["choices"] == direct["choices"]
    assert fake.attempts == 1 and remote(front, "fb")["breaker"]["state"] == "open"
    r = complete(front, "fb", stream=True, **body)  # breaker open: straight to the fallback, streamed
    assert r.status_code == 200 and r.headers["x-mergegate-expert"] == "mg" and fake.attempts == 1
    assert "".join(e["choices"][0]["text"] for e in events(r.text)[:-1]) == direct["choices"][0]["text"]
    # A local fallback answers through the local path; when every expert fails, the primary's error names them.
    add_remote(front, "fb-local", fake.base, max_retries=0, fallbacks=["down", "local-tiny"])
    r = complete(front, "fb-local", **body)
    assert r.status_code == 200 and r.json()["model"] == "local-tiny"
    assert r.headers["x-mergegate-fallback-from"] == "fb-local,down"
    add_remote(front, "fb-none", fake.base, max_retries=0, fallbacks=["down"])
    err = envelope(complete(front, "fb-none"), 502)
    assert "'fb-none'" in err["message"] and "fallbacks failed too: down" in err["message"]


def test_no_key_in_any_response_or_log(front):
    if not SEEN:
        pytest.skip("checks the responses of the other tests in this module")
    seen = "\n".join(SEEN)
    log = front.log.read_text()
    assert "expert" in log  # debug logging was on, including the proxy's warnings
    for key in (FAKE_KEY, NEW_KEY, CLIENT_KEY):
        assert key not in seen and key not in log
