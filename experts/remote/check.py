"""The registration check of a remote expert: does the upstream answer, and does it serve the model?

What the upstream said (error messages in `notes`, the model ids it lists) goes back to the admin, so the
key under test is added to the redaction set first and everything returned or raised is redacted."""

from __future__ import annotations

import time
from typing import Any

import httpx

from experts.errors import UpstreamError
from experts.remote.redact import REDACTOR
from experts.remote.upstream import RemoteSpec, error_fields

PROBES = (("completion", "/completions", {"prompt": "Hello", "max_tokens": 1}),
          ("chat", "/chat/completions", {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 1}))


async def check_upstream(http: httpx.AsyncClient, expert_id: str, spec: RemoteSpec, api_key: str | None
                         ) -> dict[str, Any]:
    """GET /models first; if that fails or does not list the model, a one-token completion, then a
    one-token chat completion. Returns what was found; raises UpstreamError: 400 when the upstream
    answered but refused (key, model), 502 when it could not be used (unreachable, 5xx, garbage)."""
    REDACTOR.add(api_key)  # not stored yet, but already a secret
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    found: dict[str, Any] = {"base_url": spec.base_url, "model": spec.model}
    notes: list[str] = []
    t0 = time.perf_counter()

    def fail(status: int, message: str) -> UpstreamError:
        return UpstreamError(expert_id, status, "check_failed", REDACTOR.redact(f"upstream check failed: {message}"),
                             code="upstream_check_failed")

    def ok(method: str) -> dict[str, Any]:
        return REDACTOR.redact_obj({**found, "ok": True, "method": method, "notes": notes,
                                    "upstream_ms": round((time.perf_counter() - t0) * 1000, 3)})

    async def call(method: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        try:
            return await http.request(method, spec.base_url + path, json=body, headers=headers,
                                      timeout=spec.timeout())
        except httpx.TimeoutException:
            raise fail(502, f"{spec.base_url}{path} timed out") from None
        except httpx.HTTPError as e:
            raise fail(502, f"cannot reach {spec.base_url} ({type(e).__name__})") from None

    r = await call("GET", "/models")
    if r.status_code in (401, 403):
        raise fail(400, f"the upstream rejected the API key ({r.status_code}: {error_fields(r.content)['message']})")
    ids = _model_ids(r)
    if ids is not None:
        found.update(models=ids[:50], model_listed=spec.model in ids)
        if spec.model in ids:
            return ok("models")
        notes.append(f"GET /models does not list {spec.model!r}")
    else:
        notes.append(f"GET /models answered {r.status_code}")
    statuses = []
    for method, path, body in PROBES:
        r = await call("POST", path, {"model": spec.model, **body})
        if r.status_code == 200 and _has_choices(r):
            return ok(method)
        statuses.append(502 if r.status_code == 200 else r.status_code)
        notes.append(f"POST {path} answered {r.status_code}: {error_fields(r.content)['message']}")
    raise fail(502 if all(s >= 500 for s in statuses) else 400, "; ".join(notes))


def _model_ids(r: httpx.Response) -> list[str] | None:
    if r.status_code != 200:
        return None
    try:
        return [str(m.get("id")) for m in r.json()["data"]]
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _has_choices(r: httpx.Response) -> bool:
    try:
        return isinstance(r.json()["choices"], list)
    except (ValueError, KeyError, TypeError):
        return False
