"""What remote experts share: their declared settings, per-upstream health, and the runtime that owns both.

`RemoteExpert` objects are built per request from the registry row; everything that must outlive a
request (the pooled HTTP client, the key store, each upstream's breaker, concurrency slots and
counters) lives in one `RemoteRuntime`, created by the app's lifespan.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit

import httpx

from experts.errors import InvalidExpertError
from experts.remote.breaker import CircuitBreaker
from experts.remote.redact import redact, redact_obj
from experts.remote.secrets import SecretStore

# Where each flat field of RemoteSpec lives in the stored (and wire) spec, e.g. timeouts.connect.
_NESTED = {"connect_timeout_s": ("timeouts", "connect"), "read_timeout_s": ("timeouts", "read"),
           "backoff_base_s": ("retry", "backoff_base_s"), "backoff_max_s": ("retry", "backoff_max_s"),
           "retry_after_cap_s": ("retry", "retry_after_cap_s"), "breaker_threshold": ("breaker", "threshold"),
           "breaker_cooldown_s": ("breaker", "cooldown_s")}
# (low, high) bounds, declared once and shared by validation and the docs.
BOUNDS: dict[str, tuple[float, float]] = {
    "connect_timeout_s": (0.01, 600), "read_timeout_s": (0.01, 3600), "max_concurrency": (1, 4096),
    "max_retries": (0, 10), "backoff_base_s": (0.0, 60), "backoff_max_s": (0.0, 600), "retry_after_cap_s": (0.0, 600),
    "breaker_threshold": (1, 1000), "breaker_cooldown_s": (0.0, 3600),
}


@dataclass(frozen=True, slots=True)
class RemoteSpec:
    """A remote expert's settings (`ExpertRecord.spec`). No secrets: the API key is in the SecretStore."""

    base_url: str  # as given to the openai client, e.g. http://host:8000/v1
    model: str  # the upstream's model name
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0  # longest wait for the next bytes (first byte, or next stream chunk)
    max_concurrency: int = 16
    max_retries: int = 2
    fallbacks: tuple[str, ...] = ()
    backoff_base_s: float = 0.25
    backoff_max_s: float = 4.0
    retry_after_cap_s: float = 10.0  # a Retry-After longer than this is not waited for
    breaker_threshold: int = 5
    breaker_cooldown_s: float = 30.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RemoteSpec:
        flat: dict[str, Any] = {k: d[k] for k in ("base_url", "model", "max_concurrency", "max_retries", "fallbacks")
                                if d.get(k) is not None}
        for name, (group, key) in _NESTED.items():
            value = (d.get(group) or {}).get(key)
            if value is not None:
                flat[name] = value
        missing = {"base_url", "model"} - flat.keys()
        if missing:
            raise InvalidExpertError(f"remote expert spec needs {sorted(missing)}")
        flat["base_url"] = check_base_url(str(flat["base_url"]))
        flat["fallbacks"] = tuple(str(f) for f in flat.get("fallbacks", ()))
        if not str(flat["model"]).strip():
            raise InvalidExpertError("model must name the upstream's model")
        for name, (low, high) in BOUNDS.items():
            if name in flat:
                typ = int if isinstance(getattr(_DEFAULTS, name), int) else float
                try:
                    flat[name] = typ(flat[name])
                except (TypeError, ValueError):
                    raise InvalidExpertError(f"{name} must be a number") from None
                if not low <= flat[name] <= high:
                    raise InvalidExpertError(f"{name} must be between {low} and {high}")
        return cls(**flat)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"base_url": self.base_url, "model": self.model, "max_concurrency": self.max_concurrency,
                             "max_retries": self.max_retries, "fallbacks": list(self.fallbacks)}
        for name, (group, key) in _NESTED.items():
            d.setdefault(group, {})[key] = getattr(self, name)
        return d

    def timeout(self) -> httpx.Timeout:
        return httpx.Timeout(connect=self.connect_timeout_s, read=self.read_timeout_s, write=self.read_timeout_s,
                             pool=self.connect_timeout_s)

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """Exponential backoff with jitter: base * 2**attempt, capped, then scaled by 0.5..1."""
        return min(self.backoff_max_s, self.backoff_base_s * 2 ** attempt) * (0.5 + rng.random() / 2)


_DEFAULTS = RemoteSpec(base_url="http://placeholder", model="placeholder")
SPEC_DEFAULTS: dict[str, Any] = {f.name: getattr(_DEFAULTS, f.name) for f in fields(RemoteSpec)}


def check_base_url(url: str) -> str:
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidExpertError(f"base_url must be an http(s) URL, got {url!r}")
    if parts.username or parts.password:
        raise InvalidExpertError("base_url must not contain credentials; send the key as api_key")
    if parts.query or parts.fragment:
        raise InvalidExpertError("base_url must not have a query string or fragment")
    return url.strip().rstrip("/")


# -- helpers on upstream responses ----------------------------------------------------------------
def retry_after_s(headers: httpx.Headers, now: float | None = None) -> float | None:
    """Seconds asked for by `retry-after-ms`, or `Retry-After` as seconds or an HTTP date."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def error_fields(body: bytes) -> dict[str, Any]:
    """message/type/code/param of an upstream error body, OpenAI-shaped or not.

    Every secret is redacted before anything is cut to length (and the redaction also removes what a
    cut would leave of a key), so the message can be shown, stored and logged."""
    try:
        data = redact_obj(json.loads(body))
    except (ValueError, RecursionError):
        text = redact(body.decode(errors="replace")).strip()
        return {"message": text[:300] or "(empty body)"}
    err = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(err, dict):
        msg = err.get("message") or err.get("detail") or json.dumps(err)[:300]
        out = {"message": str(msg)[:1000]}
        for k in ("type", "code", "param"):
            if isinstance(err.get(k), str):
                out[k] = err[k]
        return out
    return {"message": str(err)[:300]}


def split_events(buf: bytes) -> tuple[list[bytes], bytes]:
    """Complete SSE events (without their blank-line terminator) and the unfinished rest."""
    if b"\r" in buf:
        buf = buf.replace(b"\r\n", b"\n")
    parts = buf.split(b"\n\n")
    return parts[:-1], parts[-1]


# -- per-upstream health ----------------------------------------------------------------------------
@dataclass(slots=True)
class Counters:
    requests: int = 0  # proxied calls (one per client request, whatever the retries)
    successes: int = 0
    failures: int = 0
    attempts: int = 0  # HTTP exchanges with the upstream
    retries: int = 0
    in_flight: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # by class (UpstreamError.kind)
    upstream_ms_total: float = 0.0
    overhead_ms_total: float = 0.0
    last_upstream_ms: float | None = None
    last_error: str | None = None


class Slot:
    """One unit of an upstream's concurrency limit; release() is idempotent."""

    def __init__(self, sem: asyncio.Semaphore, counters: Counters) -> None:
        self._sem, self._counters, self._held = sem, counters, True
        self.kept = False  # handed over to a stream relay, which releases it
        counters.in_flight += 1

    def release(self) -> None:
        if self._held:
            self._held = False
            self._counters.in_flight -= 1
            self._sem.release()


class UpstreamHealth:
    def __init__(self, spec: RemoteSpec, clock: Callable[[], float]) -> None:
        self.breaker = CircuitBreaker(spec.breaker_threshold, spec.breaker_cooldown_s, clock=clock)
        self.counters = Counters()
        self._limit = spec.max_concurrency
        self._sem = asyncio.Semaphore(spec.max_concurrency)

    def configure(self, spec: RemoteSpec) -> None:
        self.breaker.configure(spec.breaker_threshold, spec.breaker_cooldown_s)
        if spec.max_concurrency != self._limit:  # holders of the old semaphore release into it
            self._limit, self._sem = spec.max_concurrency, asyncio.Semaphore(spec.max_concurrency)

    async def acquire(self) -> Slot:
        sem = self._sem
        await sem.acquire()
        return Slot(sem, self.counters)

    def note_error(self, kind: str, message: str) -> None:
        self.counters.errors[kind] = self.counters.errors.get(kind, 0) + 1
        self.counters.last_error = message

    def note_upstream(self, ms: float) -> None:
        self.counters.successes += 1
        self.counters.upstream_ms_total += ms
        self.counters.last_upstream_ms = round(ms, 3)

    def note_overhead(self, ms: float) -> None:
        self.counters.overhead_ms_total += ms

    def snapshot(self) -> dict[str, Any]:
        c = asdict(self.counters)
        c["upstream_ms_total"] = round(c["upstream_ms_total"], 3)
        c["overhead_ms_total"] = round(c["overhead_ms_total"], 3)
        return {"breaker": self.breaker.snapshot(), "max_concurrency": self._limit, "counters": c}


class RemoteRuntime:
    """Owned by the app lifespan: the shared pooled client, the key store and every upstream's health."""

    def __init__(self, http: httpx.AsyncClient, secrets: SecretStore, *, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.http = http
        self.secrets = secrets
        self.clock = clock
        self.rng = rng or random.Random()
        self.sleep = sleep
        self._health: dict[str, UpstreamHealth] = {}

    def health(self, expert_id: str, spec: RemoteSpec) -> UpstreamHealth:
        h = self._health.get(expert_id)
        if h is None:
            h = self._health[expert_id] = UpstreamHealth(spec, self.clock)
        else:
            h.configure(spec)
        return h

    def peek(self, expert_id: str) -> UpstreamHealth | None:
        return self._health.get(expert_id)

    def reset(self, expert_id: str) -> None:
        """The upstream changed (URL, model or key): forget its failures."""
        h = self._health.get(expert_id)
        if h is not None:
            h.breaker.reset()

    def forget(self, expert_id: str) -> None:
        self._health.pop(expert_id, None)
        self.secrets.delete(expert_id)

    def cleanup(self, known_ids: set[str]) -> list[str]:
        """Delete keys of experts that no longer exist (e.g. a crash between writing a key and the row)."""
        orphans = [i for i in self.secrets.ids() if i not in known_ids]
        for i in orphans:
            self.secrets.delete(i)
        return orphans

    def breaker_states(self) -> dict[str, str]:
        return {i: h.breaker.state for i, h in self._health.items()}
