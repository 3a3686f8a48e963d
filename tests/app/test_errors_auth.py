"""Error envelope per status class, and key checks, through raw HTTP."""

from __future__ import annotations

import httpx
import pytest

from tests.helpers import ADMIN_KEY, CLIENT_KEY

CLIENT = {"Authorization": f"Bearer {CLIENT_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def envelope(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and "Traceback" not in err["message"]
    return err


@pytest.mark.parametrize("body, param", [
    ({"model": "tiny", "prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x"}, "model"),
    ({"model": "tiny", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": "tiny", "prompt": "x", "n": 0}, "n"),
    ({"model": "tiny", "prompt": "x", "logprobs": 99}, "logprobs"),
])
def test_400_for_bad_parameters(gateway, body, param):
    err = envelope(httpx.post(gateway.base + "/v1/completions", json=body, headers=CLIENT), 400)
    assert err["type"] == "invalid_request_error" and err["param"] == param


def test_400_for_invalid_json_and_bad_chat(gateway):
    r = httpx.post(gateway.base + "/v1/completions", content=b"{not json",
                   headers={**CLIENT, "content-type": "application/json"})
    envelope(r, 400)
    r = httpx.post(gateway.base + "/v1/chat/completions", json={"model": "tiny", "messages": []}, headers=CLIENT)
    assert envelope(r, 400)["param"] == "messages"


def test_400_context_length(gateway):
    r = httpx.post(gateway.base + "/v1/completions", headers=CLIENT,
                   json={"model": "tiny", "prompt": "word " * 400, "max_tokens": 1})
    assert envelope(r, 400)["code"] == "context_length_exceeded"


def test_400_context_length_when_streaming_is_a_status_not_an_event(gateway):
    r = httpx.post(gateway.base + "/v1/completions", headers=CLIENT,
                   json={"model": "tiny", "prompt": "x", "max_tokens": 1000, "stream": True})
    assert envelope(r, 400)["code"] == "context_length_exceeded"


def test_404s(gateway):
    err = envelope(httpx.post(gateway.base + "/v1/completions", json={"model": "ghost", "prompt": "x"},
                              headers=CLIENT), 404)
    assert err["code"] == "model_not_found" and "ghost" in err["message"]
    envelope(httpx.get(gateway.base + "/v1/models/ghost", headers=CLIENT), 404)
    envelope(httpx.get(gateway.base + "/v1/nowhere", headers=CLIENT), 404)
    envelope(httpx.get(gateway.base + "/admin/experts/ghost", headers=ADMIN), 404)
    envelope(httpx.get(gateway.base + "/admin/jobs/job-ghost", headers=ADMIN), 404)


def test_413_oversized_body(gateway):
    r = httpx.post(gateway.base + "/v1/completions", headers=CLIENT,
                   json={"model": "tiny", "prompt": "x" * (5 << 20)})
    assert envelope(r, 413)["code"] == "payload_too_large"


def test_v1_requires_a_valid_client_key(gateway):
    envelope(httpx.get(gateway.base + "/v1/models"), 401)
    err = envelope(httpx.get(gateway.base + "/v1/models", headers={"Authorization": "Bearer nope"}), 401)
    assert err["code"] == "invalid_api_key" and "nope" not in err["message"]
    assert httpx.get(gateway.base + "/v1/models", headers=CLIENT).status_code == 200
    assert httpx.get(gateway.base + "/v1/models", headers=ADMIN).status_code == 200


def test_admin_refuses_client_keys_and_no_key(gateway):
    envelope(httpx.get(gateway.base + "/admin/experts"), 401)
    envelope(httpx.get(gateway.base + "/admin/experts", headers={"Authorization": "Bearer wrong"}), 401)
    err = envelope(httpx.get(gateway.base + "/admin/experts", headers=CLIENT), 403)
    assert err["type"] == "permission_error"
    envelope(httpx.delete(gateway.base + "/admin/experts/tiny", headers=CLIENT), 403)
    assert httpx.get(gateway.base + "/admin/experts/tiny", headers=ADMIN).status_code == 200  # still there


def test_keys_never_echoed(gateway):
    r = httpx.get(gateway.base + "/admin/experts", headers={"Authorization": f"Bearer {CLIENT_KEY}"})
    assert CLIENT_KEY not in r.text and ADMIN_KEY not in r.text
    assert ADMIN_KEY not in gateway.log.read_text() and CLIENT_KEY not in gateway.log.read_text()


def test_health_ready_metrics_and_request_id(gateway):
    r = httpx.get(gateway.base + "/health")
    assert r.json() == {"status": "ok"} and r.headers["x-request-id"].startswith("req-")
    assert httpx.get(gateway.base + "/ready").json() == {"status": "ready"}
    httpx.post(gateway.base + "/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 2}, headers=CLIENT)
    text = httpx.get(gateway.base + "/metrics", headers=ADMIN).text
    assert 'mergegate_requests_total{method="POST",route="/v1/completions",status="200"}' in text
    assert 'mergegate_tokens_total{direction="out",model="tiny"}' in text
    import re

    loaded = re.search(r"^mergegate_loaded_models (\S+)$", text, re.M)
    assert loaded and float(loaded.group(1)) >= 1
