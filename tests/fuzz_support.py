"""The fuzz harness of tests/test_fuzz.py: schemathesis cases against a live gateway, judged by the rules below.

Every case is generated from the gateway's own /openapi.json, sent with a key, and judged:

* never a 5xx, and every error is the envelope `{"error": {message, type, param, code}}`. One exception:
  the fuzz points every remote upstream at a closed port, and the documented answer to a dead upstream
  is a 502/503/504 with `code: "upstream_..."`; those are counted apart, any other 5xx is a bug;
* the status is documented for the operation, the content type too, and the body matches the
  documented schema (schemathesis' conformance checks);
* positive cases (the schema allows them) are not *refused*: a refusal is a 4xx that is not one of
  the semantic refusals below, which depend on the server's state rather than on the request's
  shape. A 400 without a `code` comes from the validation layer, so it means the schema allowed what
  the server refuses: a failure (the schema must tell the truth, not the check be weakened);
* negative cases (the schema forbids them) are rejected with a 4xx (never accepted, never a 5xx).

Cases are kept small so the suite stays fast: numbers that size work (max_tokens, n, budgets, model
sizes) are clamped to small values within their bounds (integers beyond 2**53 to 2**53: SAFE_INT),
`?background=true` is forced on job routes and every job a case starts is cancelled at once, and URLs
a case would make the gateway call point at a closed local port.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import Case, GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

# A 4xx that a schema-valid request may get: the state of the server decides, not the request's shape.
SEMANTIC_STATUSES = {404, 409, 429}
# 400s with these codes are checks of state or of rules between fields (documented in docs/api.md).
SEMANTIC_400 = {
    "context_length_exceeded",  # the model's context window (per model)
    "invalid_combination",  # a rule between fields, each valid alone
    "invalid_candidate",  # vector length is the session's pool size
    "too_many_choices",  # prompts x n over the per-request limit
    "token_out_of_vocabulary",  # token ids past the model's vocabulary (per model)
    "model_cannot_generate",  # the named expert does not generate here (its kind)
    "InvalidExpertError",  # the named experts, paths, corpora or tasks are not fit (state)
    "RecipeError",  # merge recipes: methods and parameters checked against the experts named
    "InvalidRecipeError",
    "MergeCompatibilityError",
    "CorpusError",
    "InvalidCorpusError",
    "UnknownCorpusError",  # corpora (BTM domains) are built on the server
    "ValueError",
}
CLAMP = {  # field name -> the largest value sent (each at least the field's minimum in the schema)
    "max_tokens": 4, "max_completion_tokens": 4, "n": 2, "max_seconds": 0.5, "batch_size": 2, "seq_len": 16,
    "n_layer": 1, "n_embd": 16, "n_head": 1, "n_positions": 32, "vocab_size": 300, "budget": 4,
    "budget_stage1": 4, "budget_stage2": 4, "popsize": 2, "max_examples": 4, "sequences": 2,
    "context_length": 16, "stride": 8, "max_tokens_per_example": 16, "r": 2, "top_logprobs": 2, "logprobs": 2,
}
# The generator reads 64-bit bounds as doubles (2**63 - 1 becomes 2**63): integers beyond 2**53 are brought
# back to +-2**53; the exact 64-bit edges are tested in tests/app/test_http_edges.py.
SAFE_INT = 2**53
CLOSED_URL = "http://127.0.0.1:9"  # discard port: refused at once, whatever the machine's network
URL_FIELDS = {"url", "base_url"}


def clamp(value: Any) -> Any:
    """`value` with the size-driving numbers clamped and outbound URLs made local (schema-valid stays valid)."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if k in CLAMP and isinstance(v, int | float) and not isinstance(v, bool):
                v = min(v, CLAMP[k])
            elif k in URL_FIELDS and isinstance(v, str):
                v = CLOSED_URL + ("/v1" if k == "base_url" else "")
            out[k] = clamp(v)
        return out
    if isinstance(value, list):
        return [clamp(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > SAFE_INT:
        return SAFE_INT if value > 0 else -SAFE_INT
    return value


@dataclass
class Stats:
    cases: int = 0
    statuses: Counter = field(default_factory=Counter)
    server_errors: int = 0  # 5xx that are bugs
    upstream_errors: int = 0  # the documented 502/503/504 of a remote expert's dead upstream
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, response: requests.Response) -> None:
        """Count a response; raise on a 5xx that is not a dead upstream's documented answer."""
        status = response.status_code
        with self.lock:
            self.cases += 1
            self.statuses[status] += 1
        if status < 500:
            return
        if status in (502, 503, 504) and str(_error(response)["code"] or "").startswith("upstream_"):
            with self.lock:
                self.upstream_errors += 1
            return
        with self.lock:
            self.server_errors += 1
        raise AssertionError(f"server error {status}: {response.text[:500]}")


class Refused(AssertionError):
    pass


def _error(response: requests.Response) -> dict[str, Any]:
    try:
        err = response.json()["error"]
    except (ValueError, KeyError, TypeError) as e:
        raise AssertionError(f"{response.status_code} is not the error envelope: {response.text[:300]!r}") from e
    if not isinstance(err, dict) or set(err) != {"message", "type", "param", "code"}:
        raise AssertionError(f"{response.status_code}: malformed envelope {err!r}")
    return err


def judge_refusal(case: Case, response: requests.Response, role: str | None, key: str) -> None:
    """Raise Refused when a schema-valid request got a 4xx that is not a semantic refusal."""
    status = response.status_code
    if status < 400 or status >= 500:
        return
    err = _error(response)
    if key == "client" and role == "admin":
        if status != 403:
            raise Refused(f"{case.operation.label}: a client key on an admin route got {status}, not 403")
        return
    if status in SEMANTIC_STATUSES or (status == 400 and err["code"] in SEMANTIC_400):
        return
    raise Refused(f"{case.operation.label}: schema-valid request refused with {status} {err}\n"
                  f"  body={json.dumps(case.body, default=str)[:600]} query={case.query} path={case.path_parameters}")


@dataclass
class Target:
    base: str
    headers: dict[str, dict[str, str]]  # key name -> headers
    admin_headers: dict[str, str]
    role_of: Callable[[str], str | None]
    model: str | None = None  # a registered model that half the serving cases are aimed at
    session: requests.Session = field(default_factory=requests.Session)


SERVING = {"/v1/completions", "/v1/chat/completions"}
READ_ONLY_MODEL_PATHS = {"/v1/models/{model_id}", "/admin/experts/{expert_id}", "/admin/experts/{expert_id}/load",
                         "/admin/experts/{expert_id}/unload", "/admin/experts/{expert_id}/pin"}


def _prepare(case: Case, model: str | None) -> None:
    """Clamp the body, force background jobs, and aim half the cases at the registered model (by the parity
    of the generated name, so runs stay deterministic): random names alone would only ever meet a 404."""
    if isinstance(case.body, dict | list):
        case.body = clamp(case.body)
    if model is not None:
        op = case.operation
        if op.path in SERVING and isinstance(case.body, dict) and len(str(case.body.get("model", ""))) % 2 == 0:
            case.body["model"] = model
        if op.path in READ_ONLY_MODEL_PATHS and op.method.upper() != "DELETE" and case.path_parameters:
            for name, value in case.path_parameters.items():
                if len(str(value)) % 2 == 0:
                    case.path_parameters[name] = model
    if case.query is not None and "background" in case.query:
        case.query["background"] = "true"
    elif any(p.name == "background" for p in case.operation.query):
        case.query = {**(case.query or {}), "background": "true"}


def _cancel_job(target: Target, response: requests.Response) -> None:
    if response.status_code != 202:
        return
    try:
        job = response.json()
    except ValueError:
        return
    if isinstance(job, dict) and job.get("object") == "job":
        target.session.post(f"{target.base}/admin/jobs/{job['id']}/cancel", headers=target.admin_headers, timeout=30)


# 5xx are judged by Stats.add (schemathesis' not_a_server_error would count a dead upstream's 502 as a bug)
POSITIVE_CHECKS = [status_code_conformance, content_type_conformance, response_schema_conformance]
NEGATIVE_CHECKS = [status_code_conformance, content_type_conformance, negative_data_rejection]


def load_schema(base: str) -> Any:
    """The gateway's document as schemathesis reads it. Negative cases break the documented parameters only:
    no extra query parameters (the server ignores unknown ones, as OpenAI clients send extras) and no
    missing Authorization header (each phase sends its key; the key phases test that)."""
    schema = schemathesis.openapi.from_url(base + "/openapi.json")
    schema.config.generation.update(allow_extra_parameters=False, with_security_parameters=False)
    return schema


def fuzz_operation(target: Target, operation: Any, key: str, mode: GenerationMode, examples: int,
                   stats: Stats) -> None:
    """Run `examples` cases of one operation (deterministic: derandomized) and judge each; raise on a failure.
    The serving operations get four times as many: they run the model on what the generator sends."""
    if operation.path in SERVING:
        examples *= 4
    role = target.role_of(operation.path)
    headers = target.headers[key]
    checks = POSITIVE_CHECKS if mode == GenerationMode.POSITIVE else NEGATIVE_CHECKS

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True, print_blob=False,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate, Phase.shrink])
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Case) -> None:
        _prepare(case, target.model)
        response = case.call(base_url=target.base, session=target.session, headers=headers, timeout=60)
        _cancel_job(target, response)
        stats.add(response)
        if response.status_code >= 400:
            _error(response)
        case.validate_response(response, checks=checks, headers=headers)
        if mode == GenerationMode.POSITIVE:
            judge_refusal(case, response, role, key)

    try:
        run()
    except Unsatisfiable:  # negative mode on an operation with nothing to break (no parameters, no body)
        if mode == GenerationMode.POSITIVE:
            raise
