"""One model's batch: iteration-level scheduling (Orca / vLLM style).

Each `step()`: drop cancelled requests; admit waiting prompts (first come, first served) into the
prefill batch while the batch has room; run one chunk of the prefill (at most `max_batched_tokens`
minus the decoding rows, so a long prompt never stalls the rows that are decoding); when a prefill
is complete, sample each prompt's first tokens and join its choices to the running batch; then one
decode step for every running row. Rows leave the batch the step they finish.

A prompt of a request with `n` choices is prefilled once and its cache copied to n rows.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import torch

from experts.errors import EngineOverloadedError, ExpertUnavailableError
from experts.hf.engine import layout
from experts.hf.engine.batch import Limits, Prefill, Running, StepStats
from experts.hf.engine.choices import Event, Group, Request
from experts.hf.engine.kv import BatchAdapter, adapter_for


class ModelScheduler:
    def __init__(self, model: Any, tokenizer: Any, limits: Limits | None = None, *,
                 on_admit: Callable[[float], None] | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.limits = limits or Limits()
        self.adapter: BatchAdapter = adapter_for(model, kernel=self.limits.gpt2_kernel)
        self.waiting: deque[Group] = deque()
        self._lock = threading.Lock()  # `waiting` is appended to from other threads
        self.prefill: Prefill | None = None
        self.running: Running | None = None
        self.on_admit = on_admit

    # -- queue ----------------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        """Queue a request's prompts (any thread)."""
        with self._lock:
            if len(self.waiting) + len(request.groups) > self.limits.max_queue:
                raise EngineOverloadedError(f"the model's queue is full ({self.limits.max_queue} prompts waiting)",
                                            retry_after=1.0)
            self.waiting.extend(request.groups)

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefill or self.running)

    def ready_in(self, now: float) -> float:
        """Seconds until a step would do something (0: now); the engine sleeps that long when idle."""
        if self.prefill or self.running:
            return 0.0
        with self._lock:
            if not self.waiting:
                return float("inf")
            return max(0.0, self._admit_at(now) - now)

    @property
    def rows(self) -> int:
        """Rows decoding now (holes left by finished rows not counted)."""
        return self.running.live if self.running else 0

    # -- one iteration --------------------------------------------------------------------------
    def step(self) -> StepStats:
        stats = StepStats()
        self._drop_cancelled()
        if self.prefill is None:
            self._admit()
        with torch.inference_mode():
            if self.prefill is not None:
                self._guarded(self._prefill_chunk, [g.request for g in self.prefill.groups], stats)
            if self.running is not None:
                self._guarded(self._decode, [lane[0].request for lane in self.running.lanes if lane], stats)
        return stats

    def _guarded(self, fn: Callable[[StepStats], None], requests: list[Request], stats: StepStats) -> None:
        """A failure of the model itself fails every request in that batch (and nothing else)."""
        try:
            fn(stats)
        except Exception as e:
            err = e if isinstance(e, ExpertUnavailableError) else ExpertUnavailableError(
                f"generation failed: {type(e).__name__}: {e}")
            for r in {id(r): r for r in requests}.values():
                r.fail(err)
            if fn == self._prefill_chunk:
                self.prefill = None
            else:
                self.running = None

    def _drop_cancelled(self) -> None:
        with self._lock:
            if any(g.request.cancelled for g in self.waiting):
                self.waiting = deque(g for g in self.waiting if not g.request.cancelled)
        p = self.prefill
        if p is not None and any(g.request.cancelled for g in p.groups):
            keep = [i for i, g in enumerate(p.groups) if not g.request.cancelled]
            self._select_prefill(keep)
        r = self.running
        if r is not None and any(lane and lane[0].request.cancelled for lane in r.lanes):
            self.running = layout.keep(self.adapter, r, [i for i, lane in enumerate(r.lanes)
                                                         if lane and not lane[0].request.cancelled])

    # -- admission --------------------------------------------------------------------------------
    def _admit(self) -> None:
        room = self.limits.max_batch_size - self.rows
        chosen: list[Group] = []
        with self._lock:
            if not self._admit_now():
                return
            self._take(chosen, room)
        if not chosen:
            return
        longest = max(len(g.ids) for g in chosen)
        self._start_prefill(chosen, longest)

    def _admit_now(self) -> bool:
        """Whether to start a prefill now (the caller holds the lock)."""
        if not self.waiting:
            return False
        now = time.monotonic()
        return self._admit_at(now) <= now

    def _admit_at(self, now: float) -> float:
        """When the waiting prompts should be admitted (the caller holds the lock)."""
        lim = self.limits
        waiting_rows = sum(g.n for g in self.waiting)
        if self.rows + waiting_rows >= lim.max_batch_size:
            return now
        oldest = self.waiting[0].request.created
        if self.running is None:
            return oldest + lim.admit_window_s
        if waiting_rows >= lim.admit_ratio * self.rows:
            return now
        return oldest + lim.max_wait_s

    def _take(self, chosen: list[Group], room: int) -> None:
        """First come, first served, while the batch and the padded prefill have room."""
        lim = self.limits
        longest = 0
        while self.waiting and room > 0:
            g = self.waiting[0]
            if chosen and (not self.adapter.paddable or g.n > room
                           or (len(chosen) + 1) * max(longest, len(g.ids)) > lim.max_prefill_padded):
                break
            if not chosen and not self.adapter.paddable and self.running is not None:
                break  # without padding, one prompt's choices at a time
            self.waiting.popleft()
            chosen.append(g)
            room -= g.n
            longest = max(longest, len(g.ids))

    def _start_prefill(self, chosen: list[Group], longest: int) -> None:
        now = time.monotonic()
        for g in chosen:
            if g.request.admitted is None:
                g.request.admitted = now
                if self.on_admit is not None:
                    self.on_admit(now - g.request.created)
        b = len(chosen)
        ids = torch.zeros(b, longest, dtype=torch.long)
        mask = torch.zeros(b, longest, dtype=torch.long)
        offsets = []
        for i, g in enumerate(chosen):
            off = longest - len(g.ids)
            ids[i, off:] = torch.tensor(g.ids)
            mask[i, off:] = 1
            offsets.append(off)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        self.prefill = Prefill(chosen, ids, mask, positions, offsets)

    def _select_prefill(self, keep: list[int]) -> None:
        p = self.prefill
        assert p is not None
        if not keep:
            self.prefill = None
            return
        idx = torch.tensor(keep)
        p.groups = [p.groups[i] for i in keep]
        p.ids, p.mask, p.positions = p.ids[idx], p.mask[idx], p.positions[idx]
        p.offsets = [p.offsets[i] for i in keep]
        if p.cache is not None:
            p.cache = self.adapter.select(p.cache, idx)
        if p.last is not None:
            p.last = p.last[idx]

    # -- prefill ----------------------------------------------------------------------------------
    def _prefill_chunk(self, stats: StepStats) -> None:
        p = self.prefill
        assert p is not None
        b, total = p.ids.shape
        budget = max(1, (self.limits.max_batched_tokens - self.rows) // b)
        c0, c1 = p.done, min(total, p.done + budget)
        echo = [i for i, g in enumerate(p.groups) if g.echo_lp]
        padded = any(p.offsets)
        logits, p.cache = self.adapter.forward(p.ids[:, c0:c1], p.mask[:, :c1] if padded else None,
                                               p.positions[:, c0:c1] if padded else None, p.cache,
                                               last_only=not echo, rows=_adapters(g.request.adapter for g in p.groups))
        stats.prefill_tokens += b * (c1 - c0)
        for i in echo:
            lo = max(c0, p.offsets[i])  # the row's real columns in this chunk
            if lo < c1:
                lp = torch.log_softmax(logits[i, lo - c0:].float(), dim=-1)
                p.groups[i].record_prompt_logprobs(range(lo - p.offsets[i], c1 - p.offsets[i]), lp)
        p.done = c1
        if c1 == total:
            p.last = logits[:, -1].float()
            self._finish_prefill(stats)

    def _finish_prefill(self, stats: StepStats) -> None:
        """First tokens of every prompt; its surviving choices join the running batch."""
        p = self.prefill
        assert p is not None and p.last is not None
        self.prefill = None
        by_request: dict[int, list[Event]] = {}
        lanes: list[tuple[Group, int]] = []
        source: list[int] = []
        first: list[int] = []
        for i, g in enumerate(p.groups):
            events = by_request.setdefault(id(g.request), [])
            events.extend(g.echo_events())
            if g.params.max_tokens == 0:
                events.extend(g.finish_length())
                continue
            logits = p.last[i:i + 1].expand(g.n, -1)
            if not bool(torch.isfinite(logits[0]).all()):
                self._nonfinite(g, events)
                continue
            tokens = g.sample(logits).tolist()
            events.extend(g.accept(range(g.n), tokens, logits))
            stats.generated += g.n
            for choice in g.live():
                lanes.append((g, choice))
                source.append(i)
                first.append(tokens[choice])
        self._deliver(p.groups, by_request)
        if not lanes:
            return
        idx = torch.tensor(source)
        # one row per prompt, all kept (the common case): the prefill's cache as it is, not a copy of it
        cache = p.cache if source == list(range(len(p.groups))) else self.adapter.select(p.cache, idx)
        mask = torch.cat([p.mask[idx], torch.ones(len(idx), 1, dtype=p.mask.dtype)], dim=1)
        lengths = p.mask[idx].sum(1)  # the first sampled token goes at this position
        self.running = layout.join(self.adapter, self.running, cache, mask, lengths, torch.tensor(first), lanes)

    # -- decode -----------------------------------------------------------------------------------
    def _decode(self, stats: StepStats) -> None:
        """The cache holds every row's tokens but the last sampled one; `mask` already counts it."""
        r = self.running
        assert r is not None
        padded = r.mask is not None  # without padding, the model's own (fastest) causal path
        loras = _adapters(lane[0].request.adapter if lane else r.hole_adapters.get(i) for i, lane in enumerate(r.lanes))
        logits, r.cache = self.adapter.forward(r.next_ids[:, None], r.mask,
                                               r.lengths[:, None] if padded else None, r.cache, last_only=True,
                                               rows=loras)
        logits = logits[:, -1].float()
        stats.decode_rows += r.live
        groups: dict[int, tuple[Group, list[int], list[int]]] = {}
        for lane, row in enumerate(r.lanes):
            if row is None:
                continue
            g, choice = row
            entry = groups.get(id(g))
            if entry is None:
                entry = groups[id(g)] = (g, [], [])
            entry[1].append(choice)
            entry[2].append(lane)
        row_sums = logits.sum(-1)  # one reduction: a NaN or an infinity anywhere in a row makes its sum non-finite
        finite = None if bool(torch.isfinite(row_sums).all()) else torch.isfinite(logits).all(dim=-1).tolist()
        greedy = logits.argmax(-1).tolist() if any(g.params.temperature <= 0 for g, _, _ in groups.values()) else []
        next_ids = r.next_ids.tolist()
        by_request: dict[int, list[Event]] = {}
        for g, choices, lanes in groups.values():
            events = by_request.setdefault(id(g.request), [])
            if finite is not None and not all(finite[i] for i in lanes):
                self._nonfinite(g, events)
                continue
            rows = logits[lanes] if g.want_lp or g.params.temperature > 0 else None
            tokens = [greedy[i] for i in lanes] if g.params.temperature <= 0 else g.sample(rows).tolist()
            for i, t in zip(lanes, tokens, strict=True):
                next_ids[i] = t
            events.extend(g.accept(choices, tokens, rows))
            stats.generated += len(lanes)
        self._deliver([g for g, _, _ in groups.values()], by_request)
        r.next_ids = torch.tensor(next_ids)
        # a hole's position stays where it was: it must not walk past the model's context
        r.lengths = r.lengths + 1 if not r.holes else r.lengths + torch.tensor([lane is not None for lane in r.lanes])
        keep = [i for i, row in enumerate(r.lanes)
                if row is not None and not row[0].failed and row[0].rows[row[1]].finish is None]
        self.running = layout.keep(self.adapter, r, keep)
        if self.running is not None:
            self.running.width += 1
            if self.running.mask is not None:
                rows = len(self.running.lanes)
                self.running.mask = torch.cat([self.running.mask, torch.ones(rows, 1, dtype=torch.long)], dim=1)

    # -- events -----------------------------------------------------------------------------------
    @staticmethod
    def _nonfinite(g: Group, events: list[Event]) -> None:
        g.failed = True
        g.request.fail(ExpertUnavailableError("the model produced non-finite logits (NaN or inf) for this request"))

    @staticmethod
    def _deliver(groups: list[Group], by_request: dict[int, list[Event]]) -> None:
        seen: set[int] = set()
        for g in groups:
            key = id(g.request)
            if key not in seen and not g.request.cancelled:
                g.request.emit(by_request.get(key, []))
            seen.add(key)


def _adapters(adapters: Iterable[Any]) -> list[Any] | None:
    """Each row's LoRA adapter (a hole keeps the one it had, so the batch's binding stays the same), or None
    when no row has one (the bare model's path)."""
    rows = list(adapters)
    return rows if any(a is not None for a in rows) else None
