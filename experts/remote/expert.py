"""`remote` experts: an OpenAI-compatible upstream reached through the shared, pooled `httpx.AsyncClient`.

The app serves them through the async proxy path (`proxy`, `proxy_stream`): the request is forwarded
with `model` rewritten to the upstream's name, and the upstream's answer (usage included) comes back
with `model` rewritten to this expert's id. Each call gets retries with exponential backoff and jitter
on connection errors, 429 and 5xx (honouring Retry-After up to a cap), never on other 4xx, which are
relayed with their status; a per-upstream circuit breaker fails fast while the upstream is down.
Fallbacks to other experts are the caller's business (`app.services.proxy`), since they may be local.

Streams are relayed event by event as they arrive: at most one unfinished SSE event is buffered, so
that the model name can be rewritten and a broken stream can be told apart from a finished one.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import anyio
import httpx

from experts.base import GenerationParams, GenerationResult, StreamDelta, StreamEnd, TokenLogprob
from experts.errors import ExpertUnavailableError, UpstreamError
from experts.remote.redact import REDACTOR
from experts.remote.upstream import RemoteRuntime, RemoteSpec, Slot, error_fields, retry_after_s, split_events
from experts.repository.registry import ExpertRecord

T = TypeVar("T")
MAX_ERROR_BODY = 64 << 10
_DONE = b"[DONE]"


class RemoteExpert:
    def __init__(self, record: ExpertRecord, runtime: RemoteRuntime) -> None:
        self.record = record
        self.spec = RemoteSpec.from_dict(record.spec)
        self.runtime = runtime
        self.health = runtime.health(record.id, self.spec)

    @property
    def id(self) -> str:
        return self.record.id

    # -- the sync Expert protocol -------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {**self.record.to_dict(), "loaded": False, "remote": self.status()}

    def status(self) -> dict[str, Any]:
        return {**self.health.snapshot(), "has_api_key": self.runtime.secrets.has(self.id)}

    def _async_only(self, what: str) -> ExpertUnavailableError:
        return ExpertUnavailableError(f"expert {self.id!r} is remote: {what} is served through the async "
                                      "proxy path (RemoteExpert.proxy / proxy_stream)")

    def count_tokens(self, text: str) -> int:
        raise ExpertUnavailableError(f"expert {self.id!r} is remote and has no local tokenizer")

    def render_chat(self, messages: Sequence[Mapping[str, Any]]) -> str:
        raise ExpertUnavailableError(f"expert {self.id!r} is remote; its upstream applies its chat template")

    def generate(self, prompt: str, params: GenerationParams) -> GenerationResult:
        raise self._async_only("generation")

    def stream(self, prompt: str, params: GenerationParams) -> Iterator[StreamDelta | StreamEnd]:
        raise self._async_only("streaming")

    def score(self, text: str, *, top_logprobs: int = 0) -> list[TokenLogprob]:
        """Blocking `ascore`, for callers in an AnyIO worker thread (where the app runs sync expert calls)."""
        try:
            return anyio.from_thread.run(lambda: self.ascore(text, top_logprobs=top_logprobs))
        except RuntimeError as e:
            if "worker thread" not in str(e):
                raise
            raise self._async_only("scoring outside a worker thread") from e

    async def ascore(self, text: str, *, top_logprobs: int = 0) -> list[TokenLogprob]:
        """Log-probabilities of `text` under the upstream: completions with echo, logprobs, max_tokens=0."""
        body = {"prompt": text, "max_tokens": 0, "echo": True, "logprobs": top_logprobs}
        try:
            data, _ = await self.proxy("/completions", body)
            lp = data["choices"][0]["logprobs"]
            tokens, values, tops = lp["tokens"], lp["token_logprobs"], lp.get("top_logprobs") or []
            offsets = lp.get("text_offset") or [0] * len(tokens)
        except UpstreamError as e:
            if e.status >= 500 or e.status == 429:
                raise
            raise ExpertUnavailableError(f"the upstream of {self.id!r} does not support scoring "
                                         f"(completions with echo + logprobs): {e}") from e
        except (KeyError, IndexError, TypeError) as e:
            raise ExpertUnavailableError(f"the upstream of {self.id!r} returned no echo logprobs") from e
        return [TokenLogprob(token=t, token_id=-1, logprob=v, text_offset=o,
                             top=tuple((tops[i] or {}).items()) if i < len(tops) else ())
                for i, (t, v, o) in enumerate(zip(tokens, values, offsets, strict=False))]

    # -- the async proxy path -------------------------------------------------------------------
    def _headers(self) -> dict[str, str]:
        key = self.runtime.secrets.get(self.id)
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _err(self, status: int, kind: str, message: str, **kw: Any) -> UpstreamError:
        return UpstreamError(self.id, status, kind, REDACTOR.redact(message), **kw)

    async def proxy(self, path: str, body: dict[str, Any]) -> tuple[dict[str, Any], float]:
        """POST `body` to the upstream's `path` (/completions, /chat/completions); returns (answer, upstream ms)."""
        payload = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        payload["model"] = self.spec.model

        async def attempt(slot: Slot) -> tuple[dict[str, Any], float]:
            t0 = time.perf_counter()
            response = await self.runtime.http.post(self.spec.base_url + path, json=payload,
                                                    headers=self._headers(), timeout=self.spec.timeout())
            ms = (time.perf_counter() - t0) * 1000
            self._check_status(response.status_code, response.headers, response.content)
            try:
                data = REDACTOR.redact_obj(response.json())  # what an upstream echoes never reaches anyone
            except (ValueError, RecursionError):
                raise self._err(502, "malformed", f"upstream answered {response.status_code} with a body "
                                "that is not JSON") from None
            if not isinstance(data, dict):
                raise self._err(502, "malformed", "upstream answered with JSON that is not an object")
            if "error" in data and "choices" not in data:  # some servers report errors with a 200
                msg = error_fields(response.content)["message"]
                raise self._err(502, "status_5xx", f"upstream answered 200 with an error: {msg}")
            if "model" in data:
                data["model"] = self.id
            return data, ms

        data, ms = await self._call(attempt)
        self.health.note_upstream(ms)
        return data, ms

    async def proxy_stream(self, path: str, body: dict[str, Any]) -> tuple[AsyncIterator[bytes], float]:
        """Open a streamed call; returns (SSE bytes as they arrive, ms until the first event).

        Everything that can still change the HTTP status (connecting, retries, the upstream's status,
        waiting for the first event) happens before this returns. Closing the iterator, or abandoning
        it, closes the upstream request. A failure later raises UpstreamError from the iterator.
        """
        payload = {**body, "model": self.spec.model, "stream": True}

        async def attempt(slot: Slot) -> tuple[AsyncIterator[bytes], float]:
            t0 = time.perf_counter()
            request = self.runtime.http.build_request("POST", self.spec.base_url + path, json=payload,
                                                      headers=self._headers(), timeout=self.spec.timeout())
            response = await self.runtime.http.send(request, stream=True)
            try:
                if response.status_code >= 300:
                    self._check_status(response.status_code, response.headers, await _read_capped(response))
            except BaseException:
                await _close(response)
                raise
            events = self._relay(response, slot)  # owns the response and the slot once started
            try:
                first = await anext(events)
            except StopAsyncIteration:
                raise self._err(502, "malformed", "upstream stream ended without any event") from None
            slot.kept = True  # released by the relay when the stream ends or is abandoned
            return self._tail(first, events), (time.perf_counter() - t0) * 1000

        chunks, ms = await self._call(attempt)
        self.health.note_upstream(ms)
        return chunks, ms

    async def _call(self, attempt: Callable[[Slot], Awaitable[T]]) -> T:
        """Run `attempt` with the breaker, the concurrency limit and retries."""
        h, spec = self.health, self.spec
        h.counters.requests += 1
        for n in range(spec.max_retries + 1):
            if not h.breaker.allow():
                err = self._err(503, "breaker_open", f"circuit breaker open after {h.breaker.threshold} "
                                "consecutive failures; failing fast", retry_after=h.breaker.retry_after() or None)
                h.note_error(err.kind, str(err))
                self._failed(err)
                raise err
            slot = await h.acquire()
            h.counters.attempts += 1
            try:
                result = await attempt(slot)
            except UpstreamError as e:
                err = e
            except httpx.HTTPError as e:
                err = self._classify(e)
            except BaseException:
                h.breaker.release()
                raise
            else:
                h.breaker.success()
                return result
            finally:
                if not slot.kept:
                    slot.release()
            h.note_error(err.kind, str(err))
            if err.status >= 500 or err.status == 429:
                h.breaker.failure()
            else:
                h.breaker.success()  # it answered: the request was wrong, not the upstream
            delay = self._retry_delay(err, n)
            if delay is None:
                self._failed(err, attempts=n + 1)
                raise err
            h.counters.retries += 1
            await self.runtime.sleep(delay)
        raise AssertionError("unreachable")

    def _failed(self, err: UpstreamError, attempts: int = 0) -> None:
        self.health.counters.failures += 1
        if attempts > 1:
            err.args = (f"{err} (after {attempts} attempts)",)

    def _retry_delay(self, err: UpstreamError, n: int) -> float | None:
        if not err.retryable or n >= self.spec.max_retries or self.health.breaker.state == "open":
            return None
        if err.retry_after is not None:
            return err.retry_after if err.retry_after <= self.spec.retry_after_cap_s else None
        return self.spec.backoff(n, self.runtime.rng)

    def _check_status(self, status: int, headers: httpx.Headers, body: bytes) -> None:
        if status < 300:
            return
        info = error_fields(body)
        msg = info.pop("message")
        if status == 429:
            raise self._err(429, "rate_limited", f"upstream rate limit (429): {msg}",
                            retry_after=retry_after_s(headers), type="rate_limit_error",
                            code=info.get("code") or "rate_limit_exceeded")
        if status >= 500:
            raise self._err(502, "status_5xx", f"upstream failed with {status}: {msg}",
                            retry_after=retry_after_s(headers))
        if status < 400:
            raise self._err(502, "malformed", f"upstream answered with an unexpected redirect ({status})")
        raise self._err(status, "client_error", f"upstream rejected the request ({status}): {msg}", **info)

    def _classify(self, e: httpx.HTTPError) -> UpstreamError:
        url = self.spec.base_url
        if isinstance(e, httpx.ConnectTimeout):
            return self._err(504, "connect_timeout",
                             f"connecting to {url} timed out after {self.spec.connect_timeout_s}s")
        if isinstance(e, httpx.PoolTimeout):
            return self._err(503, "pool", "no free connection to the upstream in time (gateway pool exhausted)")
        if isinstance(e, httpx.TimeoutException):
            return self._err(504, "timeout",
                             f"upstream sent nothing for {self.spec.read_timeout_s}s (read timeout)")
        if isinstance(e, httpx.ConnectError):
            return self._err(503, "connect", f"cannot connect to {url}: {type(e).__name__}")
        if isinstance(e, httpx.TransportError):
            return self._err(502, "connection", f"connection to {url} failed: {type(e).__name__}: {e}")
        return self._err(502, "malformed", f"bad upstream response: {type(e).__name__}")

    # -- stream relay -----------------------------------------------------------------------------
    async def _relay(self, response: httpx.Response, slot: Slot) -> AsyncIterator[bytes]:
        try:
            buf = b""
            async for chunk in response.aiter_bytes():
                events, buf = split_events(buf + chunk)
                for event in events:
                    out, done = self._rewrite(event)
                    if out:
                        yield out
                    if done:
                        return
            raise self._err(502, "stream_broken", "upstream stream ended before 'data: [DONE]'")
        except httpx.HTTPError as e:
            err = self._classify(e)
            if err.kind == "connection":
                err = self._err(502, "stream_broken",
                                f"upstream connection dropped mid-stream ({type(e).__name__})")
            raise err from None
        finally:
            await _close(response)
            slot.release()

    def _rewrite(self, event: bytes) -> tuple[bytes, bool]:
        """One SSE event out, redacted, with `model` set to this expert's id; (b'', False) for an empty event.

        An event whose JSON hides characters behind escapes (\\u...) is parsed and redacted field by field,
        since no byte pattern can see a key spelled that way."""
        lines = event.split(b"\n")
        data = [ln[5:].removeprefix(b" ") for ln in lines if ln.startswith(b"data:")]
        if not data:
            return (REDACTOR.redact_bytes(event) + b"\n\n" if event.strip() else b""), False
        payload = b"\n".join(data)
        if payload.strip() == _DONE:
            return b"data: [DONE]\n\n", True
        named = b'"model"' in payload
        if not named and b"\\u" not in payload and b"\\/" not in payload:
            return REDACTOR.redact_bytes(event) + b"\n\n", False
        try:
            obj = REDACTOR.redact_obj(json.loads(payload))
        except (ValueError, RecursionError):
            if named:
                raise self._err(502, "malformed", "upstream sent an SSE event that is not JSON") from None
            return REDACTOR.redact_bytes(event) + b"\n\n", False
        if isinstance(obj, dict) and "model" in obj:
            obj["model"] = self.id
        other = [ln for ln in lines if not ln.startswith(b"data:")]
        out = json.dumps(obj, separators=(",", ":")).encode()
        return REDACTOR.redact_bytes(b"".join(ln + b"\n" for ln in other) + b"data: " + out + b"\n\n"), False

    async def _tail(self, first: bytes, events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        try:
            yield first
            async for event in events:
                yield event
        except UpstreamError as e:  # the status is already sent, but the breaker and counters still learn
            self.health.breaker.failure()
            self.health.note_error(e.kind, str(e))
            self._failed(e)
            raise
        finally:
            await events.aclose()  # type: ignore[attr-defined]


async def _read_capped(response: httpx.Response) -> bytes:
    out = b""
    async for chunk in response.aiter_bytes():
        out += chunk
        if len(out) >= MAX_ERROR_BODY:
            break
    return out[:MAX_ERROR_BODY]


async def _close(response: httpx.Response) -> None:
    # Shielded: this also runs when the client went away and our task is being cancelled, and the
    # upstream request must still be closed (which is what cancels it upstream).
    with anyio.CancelScope(shield=True):
        await response.aclose()
