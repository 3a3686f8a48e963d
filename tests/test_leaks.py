"""The leak hunt: canary keys, upstreams and providers that echo them in every way they can, and a
gateway that must never let one out.

One gateway process (debug logging, canary admin and client keys) proxies to the leaky routes of the
fake upstream (tests/fake_upstream.py, `/leak/{plan}/...`): error bodies (JSON, odd shapes, plain
text, \\u-escaped, encoded, longer than any cut), the key in headers, 429 with Retry-After, redirects
to a URL holding the key, slow answers and timeouts, streams whose chunks and mid-stream error events
carry it; registration with and without the check, PATCH and rotation, fallbacks; search jobs against
leaky providers (and `mergegate search`). Every response (bodies, headers, SSE events) is recorded.
The last test looks for every canary, in its raw, JSON-escaped, URL-encoded and base64 forms and as
12-character prefixes and suffixes, in: the responses, the job rows and their event streams, the
registry (through the API, through SQLite, and the raw bytes of every file in the data dir except the
key store), the gateway's log and `/metrics`. The target is 0 appearances.
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from secrets import token_hex
from urllib.parse import quote, quote_plus

import httpx
import pytest

from tests.fake_upstream import MODEL, FakeUpstream
from tests.helpers import ROOT, Gateway

CANARIES = {
    "remote": "sk-" + token_hex(20),
    "odd": "sk-" + token_hex(4) + '/+="\\&%?~' + token_hex(12),  # its escaped and encoded forms all differ
    "rotated": "sk-" + token_hex(20),
    "patched": "sk-" + token_hex(20),
    "fallback-b": "sk-" + token_hex(20),
    "fallback-c": "sk-" + token_hex(20),
    "provider": "pk-" + token_hex(20),
    "admin": "ad-" + token_hex(20),
    "client": "cl-" + token_hex(20),
}
ADMIN = {"Authorization": f"Bearer {CANARIES['admin']}"}
CLIENT = {"Authorization": f"Bearer {CANARIES['client']}"}
QUICK = {"max_retries": 1, "retry": {"backoff_base_s": 0.01, "backoff_max_s": 0.02},
         "breaker": {"threshold": 1000}}
SEEN: list[tuple[str, str]] = []  # (what, text): every response of the gateway, headers included
ERRORS = {"json401": 401, "json400": 400, "json500": 502, "odd0": 400, "odd1": 502, "odd2": 400, "odd3": 502,
          "odd4": 400, "odd5": 502, "text401": 401, "text500": 502, "long400": 400, "long500": 502,
          "longtext": 502, "uescape": 400, "encoded": 401, "429": 429, "redirect": 502}


@pytest.fixture(scope="module")
def fake():
    upstream = FakeUpstream().start()
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def other_host():
    upstream = FakeUpstream().start()
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    g = Gateway(tmp_path_factory.mktemp("leaks") / "data", admin_key=CANARIES["admin"], api_keys=CANARIES["client"],
                extra_env={"MERGEGATE_LOG_LEVEL": "debug"}).start()
    yield g
    g.stop()


def leaky(up: FakeUpstream, plan: str, v1: bool = True) -> str:
    return f"http://127.0.0.1:{up.port}/leak/{plan}" + ("/v1" if v1 else "")


def call(gw: Gateway, method: str, path: str, *, what: str = "", **kw) -> httpx.Response:
    headers = kw.pop("headers", ADMIN if path.startswith("/admin") or path == "/metrics" else CLIENT)
    r = httpx.request(method, gw.base + path, headers=headers, timeout=60, **kw)
    SEEN.append((what or f"{method} {path}", f"{r.status_code}\n{json.dumps(dict(r.headers))}\n{r.text}"))
    return r


def register(gw: Gateway, expert_id: str, base_url: str, key: str | None, *, check: bool = False,
             status: int = 201, **spec) -> dict:
    body = {"id": expert_id, "base_url": base_url, "model": MODEL, "check": check, **QUICK, **spec}
    if key is not None:
        body["api_key"] = key
    r = call(gw, "POST", "/admin/experts/remote", json=body)
    assert r.status_code == status, r.text
    return r.json()


def complete(gw: Gateway, model: str, *, chat: bool = False, stream: bool = False) -> httpx.Response:
    body: dict = {"model": model, "max_tokens": 4, "stream": stream}
    if chat:
        body["messages"] = [{"role": "user", "content": "hi"}]
    else:
        body["prompt"] = "hi"
    return call(gw, "POST", "/v1/chat/completions" if chat else "/v1/completions", json=body,
                what=f"{model} chat={chat} stream={stream}")


def events(text: str) -> list:
    out = []
    for block in text.split("\n\n"):
        data = [ln[5:].strip() for ln in block.split("\n") if ln.startswith("data:")]
        if data:
            out.append("[DONE]" if data[0] == "[DONE]" else json.loads("\n".join(data)))
    return out


def envelope(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


# -- remote experts ------------------------------------------------------------------------------------
def test_upstream_errors_of_every_shape(gw, fake):
    """Each error action, through completions and chat, streamed and not: the status is right, the key
    was sent (so it could be echoed) and the envelope is well-formed."""
    for i, (action, status) in enumerate(ERRORS.items()):
        key = CANARIES["remote" if i % 2 else "odd"]
        register(gw, f"lk-{action}", leaky(fake, f"post={action}"), key)
        before = len(fake.leak_auth)
        for chat in (False, True):
            for stream in (False, True):
                envelope(complete(gw, f"lk-{action}", chat=chat, stream=stream), status)
        assert key in fake.leak_auth[before:], action


def test_answers_and_streams_that_carry_the_key(gw, fake):
    register(gw, "lk-ok", leaky(fake, "post=ok"), CANARIES["odd"])
    r = complete(gw, "lk-ok")
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "your key: [redacted]"
    for chat in (False, True):
        r = complete(gw, "lk-ok", chat=chat, stream=True)
        got = events(r.text)  # every event still parses: redaction never breaks JSON
        assert r.status_code == 200 and got[-1] == "[DONE]" and len(got) >= 4
        assert "event: [redacted]" in r.text and ": comment [redacted]" in r.text
    register(gw, "lk-streamerror", leaky(fake, "post=streamerror"), CANARIES["remote"])
    got = events(complete(gw, "lk-streamerror", stream=True).text)
    assert got[1]["error"]["message"] == "upstream failed mid-stream for [redacted]" and got[-1] == "[DONE]"
    register(gw, "lk-drop", leaky(fake, "post=streamdrop"), CANARIES["odd"])
    got = events(complete(gw, "lk-drop", chat=True, stream=True).text)
    assert got[-2]["error"]["code"] == "upstream_stream_broken" and got[-1] == "[DONE]"
    fake.hang_cap_s = 3.0
    register(gw, "lk-hang", leaky(fake, "post=hang"), CANARIES["remote"], timeouts={"read": 0.5})
    got = events(complete(gw, "lk-hang", stream=True).text)
    assert got[-2]["error"]["code"] == "upstream_timeout" and got[-1] == "[DONE]"
    register(gw, "lk-slow", leaky(fake, "post=slow"), CANARIES["remote"], timeouts={"read": 0.5}, max_retries=0)
    envelope(complete(gw, "lk-slow"), 504)
    register(gw, "lk-slow-then-500", leaky(fake, "post=slow"), CANARIES["odd"], timeouts={"read": 5}, max_retries=0)
    envelope(complete(gw, "lk-slow-then-500", stream=True), 502)


def test_registration_check_failures_and_notes(gw, fake):
    for plan, status in (("models=json401", 400), ("models=text500,post=text500", 502),
                         ("models=redirect,post=redirect", 400), ("models=uescape,post=long400", 400),
                         ("models=429,post=429", 400)):
        for key in (CANARIES["remote"], CANARIES["odd"]):
            err = register(gw, "lk-check", leaky(fake, plan), key, check=True, status=status)["error"]
            assert err["code"] == "upstream_check_failed" and key in fake.leak_auth
    r = call(gw, "GET", "/admin/experts/lk-check")
    assert r.status_code == 404  # a failed check registers nothing
    # the check passes on chat, after notes that quote the upstream's refusals (and the listed "models")
    view = register(gw, "lk-checked", leaky(fake, "models=list,completions=json400"), CANARIES["odd"], check=True)
    check = view["check"]
    assert check["ok"] and check["method"] == "chat" and not check["model_listed"]
    assert "[redacted]" in check["notes"][-1] and check["models"][0] == "[redacted]"


def test_patch_rotation_and_a_new_base_url(gw, fake, other_host):
    register(gw, "lk-rot", leaky(fake, "post=json401"), CANARIES["remote"])
    envelope(complete(gw, "lk-rot"), 401)
    r = call(gw, "PATCH", "/admin/experts/lk-rot", json={"api_key": CANARIES["rotated"]})
    assert r.status_code == 200 and r.json()["remote"]["has_api_key"]
    envelope(complete(gw, "lk-rot", chat=True), 401)
    assert fake.leak_auth[-1] == CANARIES["rotated"]
    # a new host without the key: refused, and the new host hears nothing
    moved = leaky(other_host, "post=ok")
    err = envelope(call(gw, "PATCH", "/admin/experts/lk-rot", json={"base_url": moved}), 400)
    assert "keep_key" in err["message"] and other_host.leak_auth == []
    err = envelope(call(gw, "PATCH", "/admin/experts/lk-rot", json={"base_url": moved, "check": True}), 400)
    assert other_host.leak_auth == []
    envelope(call(gw, "PATCH", "/admin/experts/lk-rot", json={"base_url": moved, "keep_key": True,
                                                              "api_key": CANARIES["patched"]}), 400)
    assert call(gw, "GET", "/admin/experts/lk-rot").json()["spec"]["base_url"] == leaky(fake, "post=json401")
    # an explicit keep_key sends the stored key there
    r = call(gw, "PATCH", "/admin/experts/lk-rot", json={"base_url": moved, "keep_key": True})
    assert r.status_code == 200
    assert complete(gw, "lk-rot").status_code == 200 and other_host.leak_auth == [CANARIES["rotated"]]
    # a new key with the new URL, checked against a leaky upstream
    r = call(gw, "PATCH", "/admin/experts/lk-rot", json={
        "base_url": leaky(fake, "models=list,completions=text401"), "api_key": CANARIES["patched"], "check": True})
    assert r.status_code == 200 and r.json()["check"]["method"] == "chat", r.text
    envelope(complete(gw, "lk-rot"), 401)
    assert fake.leak_auth[-1] == CANARIES["patched"]
    # the same URL needs nothing; a path-only change on a key-less expert neither
    assert call(gw, "PATCH", "/admin/experts/lk-rot", json={"max_retries": 0}).status_code == 200
    register(gw, "lk-nokey", leaky(fake, "post=ok"), None)
    assert call(gw, "PATCH", "/admin/experts/lk-nokey", json={"base_url": moved}).status_code == 200


def test_fallbacks(gw, fake):
    register(gw, "fb-c", leaky(fake, "post=ok"), CANARIES["fallback-c"])
    register(gw, "fb-b", leaky(fake, "post=json500"), CANARIES["fallback-b"], max_retries=0)
    register(gw, "fb-a", leaky(fake, "post=odd1"), CANARIES["remote"], fallbacks=["fb-b", "fb-c"])
    for stream in (False, True):
        r = complete(gw, "fb-a", stream=stream)
        assert r.status_code == 200 and r.headers["x-mergegate-fallback-from"] == "fb-a,fb-b"
    register(gw, "fb-x", leaky(fake, "post=long500"), CANARIES["odd"], fallbacks=["fb-b"])
    err = envelope(complete(gw, "fb-x", chat=True), 502)
    assert "fallbacks failed too: fb-b" in err["message"] and "[redacted]" in err["message"]


# -- search providers -----------------------------------------------------------------------------------
def search(gw: Gateway, plan: str, *, fake: FakeUpstream, name: str | None = None, status: int = 400) -> dict:
    body = {"provider": {"url": leaky(fake, plan, v1=False), "api_key": CANARIES["provider"], "retries": 0,
                         "timeout_s": 10},
            "base": "b", "pool": ["a1", "a2"], "validation": {"examples": [{"prompt": "p", "completion": "c"}]},
            "method": "best_single", "name": name}
    r = call(gw, "POST", "/admin/searches", params={"background": "false"}, json=body)
    assert r.status_code == status, r.text
    return r.json()


def test_search_providers(gw, fake):
    for plan in ("create=reject", "create=redirect", "create=text500", "create=odd,evaluate=json500",
                 "evaluate=garbage", "evaluate=429", "evaluate=encoded", "materialize=long400"):
        err = search(gw, plan, fake=fake, name="lk-won" if plan.startswith("materialize") else None)["error"]
        assert err["code"] == "job_failed" and CANARIES["provider"] in fake.leak_auth, plan
    view = search(gw, "materialize=leak", fake=fake, name="lk-won", status=201)
    assert view["kind"] == "remote" and view["lineage"]["provider_lineage"]["note"] == "[redacted]"
    r = complete(gw, "lk-won")  # the provider's key now serves the winner
    assert r.status_code == 200 and fake.leak_auth[-1] == CANARIES["provider"]
    jobs = call(gw, "GET", "/admin/jobs", params={"limit": 1000}).json()["data"]
    failed = [j for j in jobs if j["kind"].startswith("search") and j["status"] == "failed"]
    assert len(failed) == 8 and all(j["error"] for j in failed)
    odd = next(j for j in failed if j["params"]["provider"]["url"].endswith("create=odd,evaluate=json500"))
    assert odd["detail"]["session"]["experts"][0] == "[redacted]"


def test_cli_search_against_a_leaky_provider(fake, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MERGEGATE_PROVIDER_KEY": CANARIES["provider"]}
    proc = subprocess.run([sys.executable, "-m", "app.cli", "search", "--url", leaky(fake, "create=reject", v1=False),
                           "--base", "b", "--pool", "a1,a2", "--task", "dictionary_word", "--method", "best_single",
                           "--retries", "0"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "401" in proc.stderr, proc.stderr[-2000:]
    SEEN.append(("mergegate search (stdout, stderr)", proc.stdout + proc.stderr))


# -- the count ------------------------------------------------------------------------------------------
def needles(secret: str) -> dict[str, str]:
    """The forms an upstream or a bug could write a key in, and 12-character pieces of the plain ones."""
    forms = {"raw": secret, "json": json.dumps(secret)[1:-1], "url": quote(secret, safe=""), "url+": quote_plus(secret)}
    raw = secret.encode()
    for name, enc in (("b64", base64.b64encode), ("b64url", base64.urlsafe_b64encode)):
        for o in range(3):
            text = enc(b"\0" * o + raw).decode()
            forms[f"{name}@{o}"] = text[(8 * o + 5) // 6:(8 * (o + len(raw))) // 6]
    for name in ("raw", "json"):
        forms[f"{name}[:12]"], forms[f"{name}[-12:]"] = forms[name][:12], forms[name][-12:]
    return forms


def sinks(gw: Gateway) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    jobs = call(gw, "GET", "/admin/jobs", params={"limit": 1000}, what="jobs").json()["data"]
    for job in jobs:
        call(gw, "GET", f"/admin/jobs/{job['id']}/events", what="job events (SSE)")
    experts = call(gw, "GET", "/admin/experts", what="experts").json()["data"]
    for e in experts:
        call(gw, "GET", f"/admin/experts/{e['id']}", what="expert")
    call(gw, "GET", "/metrics", what="metrics")
    call(gw, "GET", "/v1/models", what="models")
    by_kind: dict[str, list[str]] = {}
    for what, text in SEEN:
        kind = ("SSE events" if "stream=True" in what or "SSE" in what else "job rows (API)" if what == "jobs"
                else "/metrics" if what == "metrics" else "CLI output" if what.startswith("mergegate") else "responses")
        by_kind.setdefault(kind, []).append(text)
    out.update({k: "\n".join(v).encode() for k, v in by_kind.items()})
    db = gw.data_dir / "registry.db"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        out["registry rows (SQLite)"] = "\n".join(conn.iterdump()).encode()
    files = [p for p in gw.data_dir.rglob("*") if p.is_file() and p.parent.name != "secrets"]
    out["data dir files (raw bytes)"] = b"\n".join(p.read_bytes() for p in files)
    out["gateway log"] = gw.log.read_bytes()
    return out


def test_no_canary_anywhere(gw):
    if len(SEEN) < 100:
        pytest.skip("counts what the other tests of this module made the gateway say")
    time.sleep(0.5)  # let the last job rows and log lines land
    found: Counter[str] = Counter()
    examples: list[str] = []
    all_sinks = sinks(gw)
    for sink, blob in all_sinks.items():
        for name, secret in CANARIES.items():
            for form, needle in needles(secret).items():
                n = blob.count(needle.encode())
                if n:
                    found[f"{sink}: {name} ({form})"] += n
                    at = blob.find(needle.encode())
                    context = blob[max(0, at - 80):at + len(needle) + 40].replace(needle.encode(), b"<CANARY>")
                    examples.append(f"{sink}, {name} {form}: ...{context.decode(errors='replace')}...")
    sizes = {k: len(v) for k, v in all_sinks.items()}
    print(f"\nleak hunt: {len(SEEN)} responses, sinks (bytes): {sizes}, canary appearances: {sum(found.values())}")
    assert "[redacted]" in all_sinks["gateway log"].decode(errors="replace")  # the upstreams' echoes were logged
    assert sizes["registry rows (SQLite)"] > 0 and sizes["job rows (API)"] > 0 and sizes["SSE events"] > 0
    assert not found, "canaries leaked:\n" + "\n".join(f"{k}: {v}" for k, v in found.items()) + "\n" + "\n".join(
        examples[:20])
