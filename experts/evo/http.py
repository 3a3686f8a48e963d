"""Client side of the black-box merge-session contract: an :class:`merging.search.Evaluator`
over HTTP, so a search can run against any provider that implements it (another MergeGate,
the in-process one behind a URL, or a third party). The client never holds weights.

Contract (``issues show 5``, "Provider side")::

    POST {base}/v1/merge/sessions                    {base, pool, validation, ...}
         -> {"id": str, "n": int, "experts": [ids]}   ("session_id" / "N" also accepted)
    POST {base}/v1/merge/sessions/{id}/evaluate       {"alpha": [N], "beta": [N]} -> {"loss": float}
    POST {base}/v1/merge/sessions/{id}/evaluate_batch {"candidates": [{"alpha", "beta"}, ...]}
         -> {"losses": [float, ...]}                  (optional; 404/405 -> single calls)

Errors are expected in the OpenAI envelope ``{"error": {"message", "type", "code", "param"}}``
(other bodies are shown as text). Retry policy, per HTTP exchange:

* connection errors and timeouts, 5xx, and 429 are retried up to ``retries`` times, waiting
  ``Retry-After`` (or ``retry-after-ms``) when the server sends it, else ``backoff * 2**k``
  capped at ``max_backoff``; a Retry-After above ``retry_after_cap`` is not waited for;
* a 429 whose error code says the session's query budget is spent
  (:data:`BUDGET_CODES`) is final: :class:`BudgetExhaustedError`;
* every other 4xx is final and raises :class:`EvaluationRejectedError` with the server's
  message. Retries exhausted raise :class:`EvaluationUnavailableError`.

An evaluation whose response was lost (read timeout) may have been counted by the server;
retrying it spends one more query of the session's budget.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from experts.remote.redact import REDACTOR
from experts.remote.upstream import error_fields, retry_after_s

__all__ = [
    "BUDGET_CODES",
    "BudgetExhaustedError",
    "EvaluationError",
    "EvaluationRejectedError",
    "EvaluationUnavailableError",
    "HttpEvaluator",
    "create_session",
    "session_evaluator",
]

BUDGET_CODES = frozenset({"budget_exhausted", "query_budget_exhausted", "insufficient_quota"})
"""Error codes of a 429 that means "no queries left", which waiting does not cure."""

_SESSIONS = "/v1/merge/sessions"


class EvaluationError(RuntimeError):
    """A merge-session request failed.

    Attributes:
        status: the HTTP status (None for connection errors).
        code: the error envelope's ``code``, if any.
        attempts: HTTP exchanges made for this request.
    """

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 attempts: int = 1) -> None:
        super().__init__(message)
        self.status, self.code, self.attempts = status, code, attempts


class EvaluationRejectedError(EvaluationError):
    """The provider refused the request (a 4xx): retrying the same request cannot help."""


class BudgetExhaustedError(EvaluationRejectedError):
    """The session's query budget is spent (a 429 with a code from :data:`BUDGET_CODES`)."""


class EvaluationUnavailableError(EvaluationError):
    """The provider could not answer: connection errors, 429 or 5xx after all retries."""


class _Retry(Exception):
    def __init__(self, error: EvaluationError, delay: float | None) -> None:
        self.error, self.delay = error, delay


class _Transport:
    """One httpx client plus the retry policy; shared by the helpers below."""

    def __init__(self, base_url: str, api_key: str | None, *, timeout: float, retries: int, backoff: float,
                 max_backoff: float, retry_after_cap: float, client: httpx.Client | None,
                 sleep: Callable[[float], None], max_connections: int) -> None:
        if retries < 0 or backoff < 0 or max_backoff < 0 or timeout <= 0:
            raise ValueError("retries, backoff and max_backoff must be >= 0 and timeout > 0")
        self.base = base_url.rstrip("/")
        self.api_key = api_key
        REDACTOR.add(api_key)  # a provider key: never in an error, a job row or a log line
        self.retries, self.backoff = retries, backoff
        self.max_backoff, self.retry_after_cap = max_backoff, retry_after_cap
        self.sleep = sleep
        self._own = client is None
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self.client = client or httpx.Client(timeout=timeout, limits=limits)
        self.timeout = timeout
        self._lock = threading.Lock()
        self.attempts = 0  # HTTP exchanges, all requests together
        self.retried = 0

    def close(self) -> None:
        if self._own:
            self.client.close()

    def post(self, path: str, body: Mapping[str, Any], *, idempotent: bool = True) -> tuple[int, Any]:
        """POST with retries; returns (status, JSON) of a 2xx, or (404/405, None) for those."""
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        attempt = 0
        while True:
            attempt += 1
            with self._lock:
                self.attempts += 1
            try:
                return self._once(path, body, headers, attempt, idempotent)
            except _Retry as r:
                if attempt > self.retries or r.delay is None:
                    r.error.attempts = attempt
                    raise r.error from None
                with self._lock:
                    self.retried += 1
                self.sleep(r.delay)

    def _once(self, path: str, body: Mapping[str, Any], headers: dict[str, str], attempt: int,
              idempotent: bool) -> tuple[int, Any]:
        url = self.base + path
        try:
            response = self.client.post(url, json=body, headers=headers, timeout=self.timeout)
        except httpx.HTTPError as e:
            sent = not isinstance(e, httpx.ConnectError | httpx.ConnectTimeout)
            err = EvaluationUnavailableError(REDACTOR.redact(f"POST {url}: {type(e).__name__}: {e}"))
            raise _Retry(err, None if (sent and not idempotent) else self._delay(attempt, None)) from None
        status = response.status_code
        if 200 <= status < 300:
            try:
                return status, REDACTOR.redact_obj(response.json())
            except (ValueError, RecursionError):
                raise EvaluationError(f"POST {url}: {status} with a non-JSON body", status=status,
                                      attempts=attempt) from None
        if status in (404, 405) and path.endswith("/evaluate_batch"):
            return status, None
        fields = error_fields(response.content)
        message = REDACTOR.redact(f"POST {url}: {status}: {fields.get('message', '')}")
        code = fields.get("code")
        if status == 429 and code in BUDGET_CODES:
            raise BudgetExhaustedError(message, status=status, code=code, attempts=attempt)
        if status == 429 or status >= 500:
            delay = self._delay(attempt, retry_after_s(response.headers))
            retryable = idempotent or status in (429, 503)
            err = EvaluationUnavailableError(message, status=status, code=code)
            raise _Retry(err, delay if retryable else None)
        raise EvaluationRejectedError(message, status=status, code=code, attempts=attempt)

    def _delay(self, attempt: int, retry_after: float | None) -> float | None:
        """Seconds to wait before the next attempt (None: do not retry)."""
        if retry_after is not None:
            return retry_after if retry_after <= self.retry_after_cap else None
        return min(self.max_backoff, self.backoff * 2 ** (attempt - 1))


class HttpEvaluator:
    """:class:`merging.search.Evaluator` over a provider's merge session.

    Args:
        base_url: provider root, e.g. ``http://127.0.0.1:8000`` (without ``/v1``).
        session_id: the session to query (see :func:`create_session`).
        api_key: sent as ``Authorization: Bearer``; never logged or echoed in errors.
        n: number of adapters in the session (from the create response), or None.
        timeout: seconds per HTTP exchange.
        retries: extra attempts per request (connection errors, 429, 5xx).
        backoff, max_backoff: exponential backoff base and cap, seconds.
        retry_after_cap: longest Retry-After waited for, seconds.
        concurrency: evaluations in flight in :meth:`evaluate_many` when it falls back to
            single calls.
        batch: use ``evaluate_batch`` (True), never (False), or try it once and fall back to
            single calls on 404/405 (None).
        client: an ``httpx.Client`` to use (e.g. with ``httpx.MockTransport``); not closed here.
        sleep: how to wait between attempts (tests pass a recorder).
    """

    def __init__(self, base_url: str, session_id: str, api_key: str | None = None, *, n: int | None = None,
                 timeout: float = 120.0, retries: int = 4, backoff: float = 0.5, max_backoff: float = 30.0,
                 retry_after_cap: float = 120.0, concurrency: int = 8, batch: bool | None = None,
                 client: httpx.Client | None = None, sleep: Callable[[float], None] = time.sleep) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self.session_id = session_id
        self.n = n
        self.concurrency = concurrency
        self._batch = batch
        self._path = f"{_SESSIONS}/{session_id}"
        self._http = _Transport(base_url, api_key, timeout=timeout, retries=retries, backoff=backoff,
                                max_backoff=max_backoff, retry_after_cap=retry_after_cap, client=client,
                                sleep=sleep, max_connections=max(concurrency, 1))

    @property
    def attempts(self) -> int:
        """HTTP exchanges made so far (including retries)."""
        return self._http.attempts

    @property
    def retried(self) -> int:
        """Retries made so far."""
        return self._http.retried

    def evaluate(self, alpha: Sequence[float], beta: Sequence[float]) -> float:
        """The session's loss for (alpha, beta)."""
        _, data = self._http.post(self._path + "/evaluate", {"alpha": _floats(alpha), "beta": _floats(beta)})
        return _loss(data, "loss")

    def evaluate_many(self, candidates: Sequence[tuple[Sequence[float], Sequence[float]]]) -> list[float]:
        """Losses for a population, in order: one ``evaluate_batch`` call, or concurrent singles."""
        if not candidates:
            return []
        if self._batch is not False:
            body = {"candidates": [{"alpha": _floats(a), "beta": _floats(b)} for a, b in candidates]}
            status, data = self._http.post(self._path + "/evaluate_batch", body)
            if data is not None:
                self._batch = True
                losses = data.get("losses") if isinstance(data, dict) else None
                if not isinstance(losses, list) or len(losses) != len(candidates):
                    raise EvaluationError(f"evaluate_batch answered {_shown(data)} for "
                                          f"{len(candidates)} candidates", status=status)
                return [_loss({"loss": v}, "losses[]") for v in losses]
            if self._batch is True:
                raise EvaluationRejectedError(f"{self._path}/evaluate_batch: {status}", status=status)
            self._batch = False
        if len(candidates) == 1 or self.concurrency == 1:
            return [self.evaluate(a, b) for a, b in candidates]
        with ThreadPoolExecutor(min(self.concurrency, len(candidates))) as pool:
            futures = [pool.submit(self.evaluate, a, b) for a, b in candidates]
            try:
                return [f.result() for f in futures]
            except BaseException:
                for f in futures:
                    f.cancel()
                raise

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> HttpEvaluator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def create_session(base_url: str, api_key: str | None, body: Mapping[str, Any], *, timeout: float = 300.0,
                   retries: int = 2, backoff: float = 1.0, client: httpx.Client | None = None,
                   sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """``POST {base}/v1/merge/sessions``; returns the provider's JSON as is.

    Creating a session is not idempotent, so only failures where the request cannot have been
    processed are retried: connection refused, 429, 503.
    """
    http = _Transport(base_url, api_key, timeout=timeout, retries=retries, backoff=backoff, max_backoff=30.0,
                      retry_after_cap=120.0, client=client, sleep=sleep, max_connections=1)
    try:
        _, data = http.post(_SESSIONS, body, idempotent=False)
    finally:
        http.close()
    if not isinstance(data, dict):
        raise EvaluationError(f"POST {base_url}{_SESSIONS}: expected a JSON object, got {_shown(data)}")
    return data


def session_evaluator(
    base_url: str, api_key: str | None, session: Mapping[str, Any], **kw: Any
) -> HttpEvaluator:
    """An :class:`HttpEvaluator` for a :func:`create_session` response (reads its id and N)."""
    sid = session.get("id", session.get("session_id"))
    n = session.get("n", session.get("N"))
    if n is None and isinstance(session.get("experts"), list):
        n = len(session["experts"])
    if not isinstance(sid, str):
        raise EvaluationError(f"session response has no id: {_shown(dict(session))}")
    return HttpEvaluator(base_url, sid, api_key, n=n, **kw)


def _shown(data: Any) -> str:
    """A provider's answer, quoted in an error: redacted first, then cut to 200 characters."""
    return repr(REDACTOR.redact(str(data))[:200])


def _floats(v: Sequence[float]) -> list[float]:
    return [float(x) for x in v]


def _loss(data: Any, what: str) -> float:
    value = data.get("loss") if isinstance(data, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise EvaluationError(f"expected a numeric {what} in the response, got {_shown(data)}")
    return float(value)
