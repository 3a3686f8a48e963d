"""The batching engine through the gateway: concurrency changes nothing a request gets; abandoned
requests stop; a full queue answers 429."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time

import httpx

from tests.helpers import CLIENT_KEY, Gateway, wait_until

AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}


def body(i: int, **extra) -> dict:
    return {"model": "tiny", "prompt": f"request {i}: def f(x):" + " y" * (i % 7), "max_tokens": 10 + i % 9,
            "temperature": 0.0 if i % 2 else 0.9, "seed": i, "n": 1 + i % 3, "logprobs": 1, **extra}


async def _complete(client: httpx.AsyncClient, b: dict) -> dict:
    r = await client.post("/v1/completions", json=b, headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()


async def _stream(client: httpx.AsyncClient, b: dict) -> dict:
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    async with client.stream("POST", "/v1/completions", json={**b, "stream": True}, headers=AUTH) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            for c in chunk["choices"]:
                texts[c["index"]] = texts.get(c["index"], "") + c["text"]
                if c["finish_reason"]:
                    finish[c["index"]] = c["finish_reason"]
    return {"choices": [{"index": i, "text": texts[i], "finish_reason": finish[i]} for i in sorted(texts)]}


def test_concurrent_streamed_and_plain_requests_equal_the_same_requests_alone(gateway):
    bodies = [body(i) for i in range(12)]

    async def run(concurrent: bool) -> list[dict]:
        async with httpx.AsyncClient(base_url=gateway.base, timeout=120) as client:
            if not concurrent:
                return [await _complete(client, b) for b in bodies]
            calls = [(_stream if i % 2 else _complete)(client, b) for i, b in enumerate(bodies)]
            return await asyncio.gather(*calls)

    alone = asyncio.run(run(False))
    together = asyncio.run(run(True))
    for a, t in zip(alone, together, strict=True):
        assert [(c["text"], c["finish_reason"]) for c in a["choices"]] == \
               [(c["text"], c["finish_reason"]) for c in t["choices"]]


def _metric(gw: Gateway, name: str, model: str = "tiny") -> float:
    text = httpx.get(gw.base + "/metrics", headers=gw.admin_headers, timeout=10).text
    m = re.search(rf'^{name}\{{model="{model}"\}} ([0-9.e+]+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def test_an_abandoned_request_stops_generating(gateway):
    big = {"model": "tiny", "prompt": ["abandon me"] * 8, "max_tokens": 120, "n": 16, "temperature": 1.0}
    before = _metric(gateway, "mergegate_engine_generated_tokens_total")
    # a raw connection, closed as soon as the engine has started on it (so the test does not depend on how many
    # tokens this machine generates before a client's timeout)
    host, port = httpx.URL(gateway.base).host, httpx.URL(gateway.base).port
    body = json.dumps(big).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Authorization: {AUTH['Authorization']}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    conn = socket.create_connection((host, port), timeout=10)
    try:
        conn.sendall(head + body)
        wait_until(lambda: _metric(gateway, "mergegate_engine_generated_tokens_total") > before, 20, 0.01)
        at_close = _metric(gateway, "mergegate_engine_generated_tokens_total")
    finally:
        conn.close()
    assert before < at_close < before + 128 * 120 / 2  # it had started, and was far from done
    wait_until(lambda: _metric(gateway, "mergegate_engine_batch_rows") == 0, 20, 0.1)
    time.sleep(0.5)
    stopped = _metric(gateway, "mergegate_engine_generated_tokens_total")
    time.sleep(1.0)
    assert _metric(gateway, "mergegate_engine_generated_tokens_total") == stopped  # nothing more runs
    assert stopped - at_close < 128 * 120 / 4  # a few steps after the close, not the rest of the 15,360 tokens


def test_a_full_queue_answers_429_with_retry_after(tmp_path, tiny_model_dir):
    gw = Gateway(tmp_path / "data", extra_env={"MERGEGATE_MAX_QUEUE": "1", "MERGEGATE_MAX_BATCH_SIZE": "1"}).start()
    try:
        gw.register("tiny", tiny_model_dir)
        b = {"model": "tiny", "prompt": "x", "max_tokens": 60, "temperature": 1.0}

        async def fire() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=gw.base, timeout=120) as client:
                return await asyncio.gather(*(client.post("/v1/completions", json=b) for _ in range(8)))

        responses = asyncio.run(fire())
        codes = sorted(r.status_code for r in responses)
        assert 200 in codes and 429 in codes, codes
        refused = next(r for r in responses if r.status_code == 429)
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "engine_overloaded"
    finally:
        gw.stop()
