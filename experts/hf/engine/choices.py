"""What one request is to the engine: its prompts (groups), each prompt's n choices (rows), and the
events they emit.

Per-request semantics live here and nowhere else, so they are the same alone or in any batch,
streamed or not: each prompt samples its choices with its own generator (seeded with the request's
`seed`, the same for every prompt of the request); stop strings are never emitted (text that could
start one is held back); an incomplete UTF-8 sequence is held back until it completes; `echo` sends
the prompt (and its logprobs) first; `finish_reason` is "stop" (EOS or a stop string) or "length".
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from experts.base import GenerationParams, StreamDelta, StreamEnd, TokenLogprob
from experts.hf.generation import find_stop, sample, text_decoder, token_bytes, token_text, top_logprobs

Event = StreamDelta | StreamEnd | BaseException
Sink = Callable[[list[Event]], None]


@dataclass
class Row:
    """One choice being generated."""

    ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of `text` already sent
    pending: list[TokenLogprob] = field(default_factory=list)
    finish: str | None = None
    sampled: int = 0  # tokens sampled, including a final EOS


class Group:
    """One prompt of a request and its n choices, sampled with one generator."""

    def __init__(self, request: Request, index: int, prompt: str, ids: list[int], n_prompt: int) -> None:
        p = request.params
        self.request = request
        self.index_base = index * p.n  # choice index of row 0 on the wire
        self.prompt = prompt
        self.ids = ids
        self.n_prompt = n_prompt
        seed = p.sampling_seed()
        self.gen = torch.Generator().manual_seed(seed)
        self.k = p.logprobs or 0
        self.want_lp = p.logprobs is not None
        self.echo_lp = p.echo and self.want_lp  # prompt logprobs are computed during the prefill
        self.holdback = max((len(s) for s in p.stop), default=1) - 1
        self.rows = [Row() for _ in range(p.n)]
        self.steps = 0  # tokens sampled per row so far
        self.prompt_chosen: dict[int, float] = {}  # position -> logprob of the prompt token there
        self.prompt_top: dict[int, tuple[tuple[str, float], ...]] = {}
        self.failed = False

    @property
    def params(self) -> GenerationParams:
        return self.request.params

    @property
    def n(self) -> int:
        return len(self.rows)

    @property
    def done(self) -> bool:
        return self.failed or all(r.finish is not None for r in self.rows)

    @property
    def tokenizer(self) -> Any:
        return self.request.tokenizer

    def live(self) -> list[int]:
        return [i for i, r in enumerate(self.rows) if r.finish is None]

    # -- prefill ------------------------------------------------------------------------------
    def record_prompt_logprobs(self, positions: Sequence[int], lp: torch.Tensor) -> None:
        """`lp[j]` is the log-distribution after prompt position `positions[j]`: it scores token p+1."""
        for j, pos in enumerate(positions):
            nxt = pos + 1
            if nxt >= len(self.ids):
                continue
            self.prompt_chosen[nxt] = float(lp[j, self.ids[nxt]])
            if self.k:
                self.prompt_top[nxt] = top_logprobs(self.tokenizer, lp[j], self.k)

    def echo_events(self) -> list[Event]:
        if not self.params.echo:
            return []
        tokens: tuple[TokenLogprob, ...] = ()
        if self.want_lp:
            out, offset = [], 0
            for i, tid in enumerate(self.ids):
                text = token_text(self.tokenizer, tid)
                chosen = self.prompt_chosen.get(i) if i else None
                top = self.prompt_top.get(i, ()) if i else ()
                out.append(TokenLogprob(text, tid, chosen, top, offset, token_bytes(self.tokenizer, tid)))
                offset += len(text)
            tokens = tuple(out)
        return [StreamDelta(self.index_base + i, self.prompt, tokens) for i in range(self.n)]

    # -- decoding -----------------------------------------------------------------------------
    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """Next tokens for the live rows (in row order), from their logits [live, V]."""
        return sample(logits, self.params, self.gen)

    def accept(self, rows: Sequence[int], tokens: Sequence[int], logits: torch.Tensor | None) -> list[Event]:
        """Take one sampled token per live row (`logits` [rows, V]: needed only for logprobs); returns the
        events (finished rows get their last delta)."""
        p = self.params
        lp = torch.log_softmax(logits, dim=-1) if self.want_lp and logits is not None else None
        eos = self.tokenizer.eos_token_id
        last = self.steps + 1 >= p.max_tokens
        self.steps += 1
        events: list[Event] = []
        for j, (i, tid) in enumerate(zip(rows, tokens, strict=True)):
            row = self.rows[i]
            row.sampled += 1
            if eos is not None and tid == eos:
                row.finish = "stop"
                events.extend(self._flush(i, final=True))
                continue
            before = len(row.text)
            row.ids.append(tid)
            row.text = self.request.decode(row.ids)
            if lp is not None:
                base = len(self.prompt) if p.echo else 0
                row.pending.append(TokenLogprob(token_text(self.tokenizer, tid), tid, float(lp[j, tid]),
                                                top_logprobs(self.tokenizer, lp[j], self.k), base + before,
                                                token_bytes(self.tokenizer, tid)))
            cut = find_stop(row.text, p.stop, before - self.holdback) if p.stop else None
            if cut is not None:
                row.text, row.finish = row.text[:cut], "stop"
                events.extend(self._flush(i, final=True))
            elif last:
                row.finish = "length"
                events.extend(self._flush(i, final=True))
            else:
                events.extend(self._flush(i, final=False))
        return events

    def finish_length(self) -> list[Event]:
        """max_tokens == 0: every choice ends at once."""
        events: list[Event] = []
        for i, row in enumerate(self.rows):
            if row.finish is None:
                row.finish = "length"
                events.extend(self._flush(i, final=True))
        return events

    def _flush(self, i: int, *, final: bool) -> list[Event]:
        row = self.rows[i]
        end = len(row.text) if final else max(row.emitted, len(row.text) - self.holdback)
        if not final:
            while end > row.emitted and row.text[end - 1] == "\ufffd":  # an incomplete UTF-8 sequence
                end -= 1
        text = row.text[row.emitted:end]
        if not (text or final):
            return []
        tokens = tuple(row.pending)
        row.pending = []
        row.emitted = end
        return [StreamDelta(self.index_base + i, text, tokens, row.finish if final else None)]

    @property
    def completion_tokens(self) -> int:
        return sum(r.sampled for r in self.rows)


class Request:
    """A request to one model: its groups, where its events go, and whether it was cancelled.

    Events are delivered in batches (one call of `sink` per engine step) and end with one
    `StreamEnd` (token counts of all groups) or an exception (the request failed)."""

    def __init__(self, params: GenerationParams, tokenizer: Any, sink: Sink, adapter: Any = None) -> None:
        self.params = params
        self.tokenizer = tokenizer
        self.decode = text_decoder(tokenizer)  # ids -> text, as every step needs it
        self.adapter = adapter  # LoRA factors applied to this request's rows (None: the bare model)
        self.sink = sink
        self.groups: list[Group] = []
        self.created = time.monotonic()
        self.admitted: float | None = None  # when its first group started prefilling
        self._cancelled = threading.Event()
        self.finished = False

    def add_prompt(self, prompt: str, ids: list[int], n_prompt: int) -> Group:
        g = Group(self, len(self.groups), prompt, ids, n_prompt)
        self.groups.append(g)
        return g

    def cancel(self) -> None:
        """Thread-safe: the engine drops the request's rows at its next step and sends nothing more."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def emit(self, events: list[Event]) -> None:
        if self.finished or not events:
            return
        if all(g.done for g in self.groups):
            self.finished = True
            events = events + [StreamEnd(sum(g.n_prompt for g in self.groups),
                                         sum(g.completion_tokens for g in self.groups))]
        self.sink(events)

    def fail(self, error: BaseException) -> None:
        if self.finished:
            return
        self.finished = True
        self._cancelled.set()  # its other prompts leave the batch too
        for g in self.groups:
            g.failed = True
        self.sink([error])
