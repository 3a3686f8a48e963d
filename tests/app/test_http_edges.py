"""The HTTP surface at its edges, through raw sockets where a client library would tidy the request:
keys checked before any body is read, body limits and stalls, unparsable requests, 405s, the OpenAPI
document, /metrics exposure, and bad input that used to be a 500."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import pkgutil
import socket
import time

import httpx
import pytest

import app.protocol
from app.main import create_app
from app.protocol.common import RequestModel
from app.settings import Settings
from tests.helpers import ADMIN_KEY, CLIENT_KEY, Gateway

CLIENT = {"Authorization": f"Bearer {CLIENT_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="module")
def edge(tmp_path_factory, tiny_model_dir):
    """A gateway with a 1 s body timeout (uploads keep the default 4 GiB limit) and open metrics."""
    gw = Gateway(tmp_path_factory.mktemp("edge") / "data", api_keys=CLIENT_KEY,
                 extra_env={"MERGEGATE_BODY_TIMEOUT_S": "1", "MERGEGATE_METRICS": "open"}).start()
    try:
        gw.register("tiny", tiny_model_dir)
        yield gw
    finally:
        gw.stop()


def raw(gw: Gateway, head: str, body: bytes = b"", *, wait: float = 10.0) -> tuple[int, dict[str, str], bytes, float]:
    """Send a hand-written request (headers, then `body`, then nothing more); return the status, headers,
    body and seconds until the answer arrived. The connection is left for the server to close."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=wait) as s:
        s.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        elapsed = time.monotonic() - start
        head_bytes, _, rest = data.partition(b"\r\n\r\n")
        lines = head_bytes.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            chunk = s.recv(65536)
            if not chunk:
                break
            rest += chunk
    return int(lines[0].split()[1]), headers, rest, elapsed


def envelope(body: bytes) -> dict:
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


# -- keys before bodies ------------------------------------------------------------------------------


@pytest.mark.parametrize("key, status", [(None, 401), ("wrong", 401), (CLIENT_KEY, 403)])
def test_an_upload_without_the_admin_key_is_refused_before_its_body_is_sent(edge, key, status):
    auth = f"Authorization: Bearer {key}\n" if key else ""
    head = (f"POST /admin/experts/upload HTTP/1.1\nHost: x\n{auth}"
            "Content-Type: multipart/form-data; boundary=b\nContent-Length: 500000000\n")
    got, headers, body, elapsed = raw(edge, head)  # not one byte of the 500 MB is sent
    assert got == status and elapsed < 5
    assert envelope(body)["code"] in ("invalid_api_key", "not_admin")
    assert headers["connection"] == "close"


def test_v1_without_a_key_is_refused_before_its_body_is_sent(edge):
    head = "POST /v1/completions HTTP/1.1\nHost: x\nContent-Type: application/json\nContent-Length: 1000\n"
    got, _, body, elapsed = raw(edge, head)
    assert got == 401 and elapsed < 5 and envelope(body)["code"] == "invalid_api_key"


# -- body limits, stalls, unparsable requests ------------------------------------------------------------


def test_a_chunked_body_over_the_limit_is_413(edge):
    def chunks():
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(5):
            yield b"x" * (1 << 20)
        yield b'"}'

    r = httpx.post(edge.base + "/v1/completions", content=chunks(), timeout=30,
                   headers={**CLIENT, "content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


def test_a_stalled_body_is_408_and_the_connection_closes(edge):
    head = (f"POST /admin/experts/upload HTTP/1.1\nHost: x\nAuthorization: Bearer {ADMIN_KEY}\n"
            "Content-Type: multipart/form-data; boundary=b\nContent-Length: 3000000000\n")
    got, headers, body, elapsed = raw(edge, head, b"--b\r\n")  # 3 GB announced, 5 bytes sent
    assert got == 408 and elapsed < 8
    assert envelope(body)["code"] == "request_timeout" and headers["connection"] == "close"


@pytest.mark.parametrize("length", ["-5", "abc"])
def test_an_unparsable_content_length_gets_the_json_envelope(edge, length):
    head = f"POST /v1/completions HTTP/1.1\nHost: x\nContent-Type: application/json\nContent-Length: {length}\n"
    got, headers, body, _ = raw(edge, head, b"{}")
    assert got == 400 and headers["content-type"] == "application/json"
    assert envelope(body)["type"] == "invalid_request_error"


# -- 405, OpenAPI ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path, allowed", [("/admin/experts/tiny", "DELETE, GET, PATCH"),
                                           ("/admin/experts", "GET, POST"), ("/v1/models", "GET")])
def test_405_names_every_method_of_the_path(edge, path, allowed):
    r = httpx.put(edge.base + path, headers=ADMIN)
    assert r.status_code == 405 and r.headers["allow"] == allowed
    assert r.headers.get_list("allow") == [allowed] and allowed in r.json()["error"]["message"]


def test_openapi_documents_400_never_422(edge):
    spec = httpx.get(edge.base + "/openapi.json").json()
    assert "422" not in json.dumps(spec["paths"]) and "HTTPValidationError" not in json.dumps(spec)
    for path, item in spec["paths"].items():
        for method, op in item.items():
            if "requestBody" in op:
                assert {"400", "408", "413"} <= set(op["responses"]), (method, path)
            if path.startswith("/admin"):
                assert {"401", "403"} <= set(op["responses"]) and op["security"] == [{"adminKey": []}]
    assert spec["components"]["schemas"]["CompletionRequest"]["properties"]["n"]["maximum"] == 16
    materialize = spec["paths"]["/v1/merge/sessions/{session_id}/materialize"]["post"]
    assert materialize["security"] == [{"adminKey": []}] and "429" in materialize["responses"]


# -- /metrics --------------------------------------------------------------------------------------


def test_metrics_admin_by_default_and_deleted_experts_leave(gateway, tiny_model_dir):
    assert httpx.get(gateway.base + "/metrics").status_code == 401
    assert httpx.get(gateway.base + "/metrics", headers=CLIENT).status_code == 403
    gateway.register("metrics-gone", tiny_model_dir)
    r = httpx.post(gateway.base + "/v1/completions", headers=CLIENT,
                   json={"model": "metrics-gone", "prompt": "a", "max_tokens": 2})
    assert r.status_code == 200
    assert 'model="metrics-gone"' in httpx.get(gateway.base + "/metrics", headers=ADMIN).text
    assert httpx.delete(gateway.base + "/admin/experts/metrics-gone", headers=ADMIN).status_code == 200
    assert "metrics-gone" not in httpx.get(gateway.base + "/metrics", headers=ADMIN).text


def test_metrics_open_when_configured(edge):
    r = httpx.get(edge.base + "/metrics")
    assert r.status_code == 200 and "mergegate_requests_total" in r.text


def test_metrics_off_is_404(tmp_path):
    app = create_app(Settings(data_dir=tmp_path, admin_key=ADMIN_KEY, metrics="off"))

    async def run() -> httpx.Response:
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                return await c.get("/metrics", headers=ADMIN)

    r = asyncio.run(run())
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


# -- bad input: 400s, never 500s --------------------------------------------------------------------------


@pytest.mark.parametrize("extra, param", [
    ({"prompt": "\ud800abc"}, "prompt"),
    ({"prompt": ["ok", "\udfffx"]}, "prompt"),
    ({"seed": 2**70}, "seed"),
    ({"seed": -(2**70)}, "seed"),
    ({"prompt": [-1]}, "prompt.0"),
    ({"prompt": [2**64]}, "prompt.0"),
    ({"prompt": [[5], [-3]]}, "prompt.1.0"),
    ({"frequency_penalty": False}, "frequency_penalty"),
    ({"temperature": True}, "temperature"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"prompt": ["x"] * 129}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"user_extra": "\ud800"}, None),
])
def test_bad_input_is_a_400_with_its_param(edge, extra, param):
    body = json.dumps({"model": "tiny", "prompt": "a", "max_tokens": 1, **extra})  # json.dumps keeps \ud800 escaped
    r = httpx.post(edge.base + "/v1/completions", content=body,
                   headers={**CLIENT, "content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_chat_lone_surrogate_and_boolean_numbers_are_400(edge):
    for extra in ({"messages": [{"role": "user", "content": "hi \udc00"}]}, {"top_p": False}, {"n": True}):
        body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **extra})
        r = httpx.post(edge.base + "/v1/chat/completions", content=body,
                       headers={**CLIENT, "content-type": "application/json"})
        assert r.status_code == 400, r.text


def test_the_largest_seed_and_an_out_of_vocabulary_id(edge):
    ok = {"model": "tiny", "prompt": "a", "max_tokens": 2}
    for seed in (2**63 - 1, -(2**63), 0):
        r = httpx.post(edge.base + "/v1/completions", json={**ok, "seed": seed}, headers=CLIENT)
        assert r.status_code == 200, r.text
    r = httpx.post(edge.base + "/v1/completions", json={**ok, "prompt": [1000000000]}, headers=CLIENT)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert r.json()["error"]["code"] == "token_out_of_vocabulary"


def test_too_many_choices_is_a_400(edge):
    r = httpx.post(edge.base + "/v1/completions", headers=CLIENT,
                   json={"model": "tiny", "prompt": ["a"] * 100, "n": 2, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_choices"


# -- one validation layer ---------------------------------------------------------------------------------


def _refs(node: object, out: set[str]) -> set[str]:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str):
            out.add(ref.rpartition("/")[2])
        for v in node.values():
            _refs(v, out)
    elif isinstance(node, list):
        for v in node:
            _refs(v, out)
    return out


def test_every_json_body_model_is_a_request_model(tmp_path):
    """Every model a JSON body is validated with (nested ones too) goes through app.protocol.common.RequestModel."""
    spec = create_app(Settings(data_dir=tmp_path, admin_key=ADMIN_KEY)).openapi()
    schemas = spec["components"]["schemas"]
    names: set[str] = set()
    for item in spec["paths"].values():
        for op in item.values():
            _refs(op.get("requestBody", {}).get("content", {}).get("application/json", {}), names)
    while True:  # close over nested references
        more = set().union(*(_refs(schemas[n], set()) for n in names)) - names
        if not more:
            break
        names |= more
    classes = {}
    for m in pkgutil.iter_modules(app.protocol.__path__):
        module = importlib.import_module(f"app.protocol.{m.name}")
        classes.update(dict(inspect.getmembers(module, inspect.isclass)))
    assert len(names) > 30
    outside = sorted(n for n in names if not issubclass(classes[n], RequestModel))
    assert not outside, f"request models outside the validation layer: {outside}"


def test_keys_and_urls_the_gateway_sends_on_are_checked(edge):
    body = {"id": "odd-key", "base_url": "http://127.0.0.1:9/v1", "model": "m", "check": False}
    for bad in ({"api_key": "clé-ó"}, {"api_key": "two words"}, {"base_url": "http://exa mple/v1"},
                {"base_url": "ftp://x/v1"}):
        r = httpx.post(edge.base + "/admin/experts/remote", json={**body, **bad}, headers=ADMIN)
        assert r.status_code == 400, r.text  # a non-ASCII key used to be a 500 (an unencodable header)
    spec = httpx.get(edge.base + "/openapi.json").json()
    body = spec["paths"]["/admin/experts/upload"]["post"]["requestBody"]["content"]["multipart/form-data"]
    upload = body["schema"]["properties"]
    assert "anyOf" not in upload["archive"] and upload["id"]["pattern"]  # a form field is left out, never null
