"""The engine: one thread that runs all torch work of the serving path.

It steps every model's scheduler in turn (one iteration each, round robin), and between steps runs
other torch work handed to it (`call` / `run`: model loads, scoring, merge-session evaluation,
black-box members' steps). One thread is right on a CPU: torch already uses every core inside each
op, and a second thread with a team of its own slows every op of the first (experts.hf.threads).

Requests are submitted from any thread; their events come back through the request's sink, once
per step. `stream()` is the asyncio face: an async iterator of a request's events that cancels the
request when the consumer stops early (a client disconnect).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from experts.base import GenerationParams, StreamDelta, StreamEnd
from experts.errors import ExpertUnavailableError
from experts.hf.engine.batch import Limits, StepStats
from experts.hf.engine.choices import Event, Request
from experts.hf.engine.heap import HeapTrimmer
from experts.hf.engine.scheduler import ModelScheduler
from experts.hf.threads import own_cores

log = logging.getLogger("mergegate.engine")
T = TypeVar("T")


@dataclass(frozen=True)
class Prompt:
    """A tokenized prompt: the text (echoed back), its ids, and how many count as prompt tokens."""

    text: str
    ids: list[int]
    n_prompt: int


class Observer(Protocol):
    """What the engine reports (the app turns it into Prometheus metrics)."""

    def admitted(self, model: str, waited_s: float) -> None: ...

    def stepped(self, model: str, stats: StepStats, running: int, waiting: int) -> None: ...


class Engine:
    def __init__(self, limits: Limits | None = None, *, observer: Observer | None = None,
                 name: str = "mergegate-torch", threads: int | None = None) -> None:
        self.limits = limits or Limits()
        self.threads = threads  # torch threads of this thread's ops (None: every core, experts.hf.threads)
        self.observer = observer
        self._cv = threading.Condition()
        self._work: deque[tuple[Callable[[], Any], Future]] = deque()
        self._schedulers: dict[int, tuple[str, Any, ModelScheduler]] = {}  # id(model) -> (label, model, scheduler)
        self._closed = False
        self._outbox: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue, list[Event]]] = []
        self.heap = HeapTrimmer()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # -- submission (any thread) ------------------------------------------------------------------
    def submit(self, label: str, model: Any, tokenizer: Any, request: Request) -> None:
        """Queue a request for `model` (served under `label`); raises EngineOverloadedError when full."""
        with self._cv:
            if self._closed:
                raise ExpertUnavailableError("the gateway is shutting down")
            entry = self._schedulers.get(id(model))
            if entry is None or entry[1] is not model:
                on_admit = (lambda w: self.observer.admitted(label, w)) if self.observer else None
                entry = (label, model, ModelScheduler(model, tokenizer, self.limits, on_admit=on_admit))
                self._schedulers[id(model)] = entry
            entry[2].add(request)
            self._cv.notify()

    def call(self, fn: Callable[..., T], *args: Any) -> Future:
        """Run `fn(*args)` on the engine thread between steps; a concurrent.futures.Future of its result."""
        fut: Future = Future()
        with self._cv:
            if self._closed:
                raise ExpertUnavailableError("the gateway is shutting down")
            self._work.append((lambda: fn(*args), fut))
            self._cv.notify()
        return fut

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.wrap_future(self.call(fn, *args))

    def stream(self, label: str, model: Any, tokenizer: Any, prompts: Sequence[Prompt],
               params: GenerationParams, *, whole: bool = False, adapter: Any = None
               ) -> AsyncIterator[StreamDelta | StreamEnd]:
        """Submit now (so a full queue raises here) and return the request's events as they come.

        Events cross to the event loop once per engine step for all requests together (one wake-up of
        the loop, not one per request); with `whole` (an answer that is not streamed) they are kept
        until the request ends and cross once. `adapter`: LoRA factors for this request's rows (requests
        for many adapters of one base share the base's batch)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[list[Event]] = asyncio.Queue()
        held: list[Event] = []

        def sink(events: list[Event]) -> None:
            if whole:
                held.extend(events)
                if not isinstance(events[-1], (StreamEnd, BaseException)):
                    return
                events = held
            self._outbox.append((loop, queue, events))

        request = Request(params, tokenizer, sink, adapter)
        for p in prompts:
            request.add_prompt(p.text, p.ids, p.n_prompt)
        self.submit(label, model, tokenizer, request)
        return _events(request, queue)

    # -- the thread -------------------------------------------------------------------------------
    def _loop(self) -> None:
        own_cores(self.threads)  # the one thread whose torch ops use the cores (experts.hf.threads)
        while True:
            with self._cv:
                while not self._closed and not self._work:
                    wait = min(self._idle_for(), self.heap.due_in())
                    if wait <= 0:
                        break
                    self._cv.wait(None if wait == float("inf") else wait)
                if self._closed and not self._work:
                    break
                work = list(self._work)
                self._work.clear()
                now = time.monotonic()
                active = [e for e in self._schedulers.values() if e[2].ready_in(now) <= 0]
                dropped = [self._schedulers.pop(k)[2] for k, e in list(self._schedulers.items()) if not e[2].has_work()]
            for sched in dropped:  # idle: no state worth keeping (a new scheduler is cheap)
                sched.adapter.release()
            for fn, fut in work:
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn())
                    except BaseException as e:
                        fut.set_exception(e)
            for label, _, sched in active:
                try:
                    stats = sched.step()
                except Exception:
                    log.exception("engine step failed for %s", label)
                    continue
                if self.observer is not None:
                    self.observer.stepped(label, stats, sched.rows, len(sched.waiting))
            self._flush()
            with self._cv:
                idle = not any(e[2].has_work() for e in self._schedulers.values())
            if work or not idle:
                self.heap.busy()
            else:  # idle for a while: the freed buffers go back to the OS (experts.hf.engine.heap)
                self.heap.idle()
                self.heap.run_if_due()
        self._fail_all(ExpertUnavailableError("the gateway is shutting down"))
        self._flush()

    def _flush(self) -> None:
        """Hand this round's events to their event loops: one call per loop."""
        if not self._outbox:
            return
        items, self._outbox = self._outbox, []
        by_loop: dict[int, tuple[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, list[Event]]]]] = {}
        for loop, queue, events in items:
            by_loop.setdefault(id(loop), (loop, []))[1].append((queue, events))
        for loop, batch in by_loop.values():
            try:
                loop.call_soon_threadsafe(_dispatch, batch)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

    def _idle_for(self) -> float:
        """How long no scheduler has anything to do (0: a step is due now)."""
        now = time.monotonic()
        return min((e[2].ready_in(now) for e in self._schedulers.values()), default=float("inf"))

    def _fail_all(self, err: BaseException) -> None:
        for _, _, sched in self._schedulers.values():
            for g in list(sched.waiting):
                g.request.fail(err)
            for g in sched.prefill.groups if sched.prefill else []:
                g.request.fail(err)
            for lane in sched.running.lanes if sched.running else []:
                if lane is not None:
                    lane[0].request.fail(err)

    def stats(self) -> dict[str, dict[str, int]]:
        """Per model label: rows decoding and prompts waiting (a snapshot)."""
        with self._cv:
            entries = list(self._schedulers.values())
        out: dict[str, dict[str, int]] = {}
        for label, _, s in entries:
            cur = out.setdefault(label, {"running": 0, "waiting": 0})
            cur["running"] += s.rows
            cur["waiting"] += len(s.waiting)
        return out

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=30)


def _dispatch(batch: list[tuple[asyncio.Queue, list[Event]]]) -> None:
    for queue, events in batch:
        queue.put_nowait(events)


async def _events(request: Request, queue: asyncio.Queue[list[Event]]) -> AsyncIterator[StreamDelta | StreamEnd]:
    try:
        while True:
            for ev in await queue.get():
                if isinstance(ev, BaseException):
                    raise ev
                yield ev
                if isinstance(ev, StreamEnd):
                    return
    finally:
        request.cancel()  # a consumer that stops early (client gone) frees the rows at the next step
