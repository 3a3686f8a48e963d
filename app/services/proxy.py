"""Requests for remote experts: forward the wire request, try fallbacks in order, measure the overhead.

The chain is the requested expert, then its `fallbacks` in order (their own fallbacks are not
followed). A fallback is tried when an expert fails after its retries or its breaker is open (5xx,
429), never when the upstream said the request itself is wrong (other 4xx). Fallbacks may be local
experts; they answer through the local path with the request's model set to their id. Streams can
only fall back before the first byte is sent; a failure after that is an SSE error event + [DONE].
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from app.metrics import Metrics
from app.sse import SSE_DONE, sse_error
from experts.base import Expert
from experts.errors import ExpertError, ExpertNotFoundError, ExpertUnavailableError, UpstreamError
from experts.remote.expert import RemoteExpert
from experts.repository.repo import ExpertRepository

log = logging.getLogger("mergegate.proxy")

LocalComplete = Callable[[Any, Expert], Awaitable[dict[str, Any]]]
LocalStream = Callable[[Any, Expert], Awaitable[AsyncIterator[str]]]


@dataclass(slots=True)
class ProxyResult:
    body: dict[str, Any]
    headers: dict[str, str]


@dataclass(slots=True)
class ProxyStream:
    chunks: AsyncIterator[bytes | str]
    headers: dict[str, str]


class ProxyService:
    def __init__(self, repo: ExpertRepository, metrics: Metrics) -> None:
        self.repo = repo
        self.metrics = metrics

    def chain(self, primary: RemoteExpert) -> Iterator[Expert]:
        yield primary
        for fid in primary.spec.fallbacks:
            if fid == primary.id:
                continue
            try:
                yield self.repo.get(fid)
            except (ExpertNotFoundError, ExpertUnavailableError) as e:
                log.warning("fallback %s of %s skipped: %s", fid, primary.id, e)

    async def complete(self, path: str, req: BaseModel, primary: RemoteExpert, local: LocalComplete) -> ProxyResult:
        t0 = time.perf_counter()
        body = req.model_dump(exclude_unset=True)
        expert, data, upstream_ms, failures = await self._first_answer(
            primary, lambda x: x.proxy(path, body), lambda x: local(req.model_copy(update={"model": x.id}), x))
        return ProxyResult(data, self._served(primary, expert, t0, upstream_ms, failures))

    async def stream(self, path: str, req: BaseModel, primary: RemoteExpert, local: LocalStream) -> ProxyStream:
        t0 = time.perf_counter()
        body = req.model_dump(exclude_unset=True)
        expert, chunks, upstream_ms, failures = await self._first_answer(
            primary, lambda x: x.proxy_stream(path, body),
            lambda x: local(req.model_copy(update={"model": x.id}), x))
        headers = self._served(primary, expert, t0, upstream_ms, failures)
        return ProxyStream(self._guard(expert.id, chunks), headers)

    async def _first_answer(self, primary: RemoteExpert,
                            remote: Callable[[RemoteExpert], Awaitable[tuple[Any, float]]],
                            local: Callable[[Expert], Awaitable[Any]]
                            ) -> tuple[Expert, Any, float, list[tuple[str, ExpertError]]]:
        """Walk the chain until an expert answers: (that expert, its answer, its ms, the failures before it)."""
        failures: list[tuple[str, ExpertError]] = []
        for expert in self.chain(primary):
            try:
                if isinstance(expert, RemoteExpert):
                    answer, upstream_ms = await remote(expert)
                else:
                    t1 = time.perf_counter()
                    answer = await local(expert)
                    upstream_ms = (time.perf_counter() - t1) * 1000
            except ExpertError as e:
                self._failed(expert.id, e)
                if expert is primary and not _fallback_ok(e):
                    raise self._gave_up(primary, e) from None
                failures.append((expert.id, e))
                continue
            return expert, answer, upstream_ms, failures
        raise self._gave_up(primary, _exhausted(primary, failures))

    async def _guard(self, expert_id: str, chunks: AsyncIterator[bytes | str]) -> AsyncIterator[bytes | str]:
        """After the first byte the status is sent: a failure becomes an SSE error event, then [DONE]."""
        try:
            async for chunk in chunks:
                yield chunk
        except ExpertError as e:
            self._failed(expert_id, e)
            yield sse_error(e)
            yield SSE_DONE
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]

    def _served(self, primary: RemoteExpert, expert: Expert, t0: float, upstream_ms: float,
                failures: list[tuple[str, ExpertError]]) -> dict[str, str]:
        overhead_ms = max(0.0, (time.perf_counter() - t0) * 1000 - upstream_ms)
        self.metrics.remote_requests.labels(primary.id, "fallback" if failures else "ok").inc()
        self.metrics.remote_upstream.labels(expert.id).observe(upstream_ms / 1000)
        self.metrics.remote_overhead.labels(expert.id).observe(overhead_ms / 1000)
        if isinstance(expert, RemoteExpert):
            expert.health.note_overhead(overhead_ms)
        headers = {"x-mergegate-overhead-ms": f"{overhead_ms:.3f}", "x-mergegate-upstream-ms": f"{upstream_ms:.3f}",
                   "x-mergegate-expert": expert.id}
        if failures:
            headers["x-mergegate-fallback-from"] = ",".join(i for i, _ in failures)
        return headers

    def _failed(self, expert_id: str, e: ExpertError) -> None:
        kind = e.kind if isinstance(e, UpstreamError) else type(e).__name__
        self.metrics.remote_errors.labels(expert_id, kind).inc()
        log.warning("expert %s failed: %s", expert_id, e)

    def _gave_up(self, primary: RemoteExpert, e: ExpertError) -> ExpertError:
        self.metrics.remote_requests.labels(primary.id, "error").inc()
        return e


def _fallback_ok(e: ExpertError) -> bool:
    return e.fallback_ok if isinstance(e, UpstreamError) else True


def _exhausted(primary: RemoteExpert, failures: list[tuple[str, ExpertError]]) -> ExpertError:
    """The primary's error (its status tells what went wrong with the requested expert), naming the
    fallbacks that failed too."""
    first = failures[0][1]
    if len(failures) == 1 or not isinstance(first, UpstreamError):
        return first
    others = "; ".join(f"{i}: {e}" for i, e in failures[1:])
    return UpstreamError(primary.id, first.status, first.kind,
                         str(first).removeprefix(f"expert {primary.id!r}: ") + f"; fallbacks failed too: {others}",
                         code=first.code, type=first.type, retry_after=first.retry_after)
