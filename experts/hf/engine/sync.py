"""The engine's path stepped in the caller's thread: one request on a private scheduler.

For library use and tests (`LocalExpert.generate`, benches): the same per-request semantics and the
same batch code as the serving engine, so a request gives the same answer here as through the gateway.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from experts.base import Choice, GenerationParams, GenerationResult, StreamDelta, StreamEnd
from experts.hf.engine.choices import Event, Request
from experts.hf.engine.scheduler import Limits, ModelScheduler
from experts.hf.generation import check_fits, start_ids


def stream_generate(model: Any, tokenizer: Any, prompt: str, params: GenerationParams,
                    limits: Limits | None = None, adapter: Any = None) -> Iterator[StreamDelta | StreamEnd]:
    """Text increments per choice, then a StreamEnd with the token counts."""
    ids, n_prompt = start_ids(tokenizer, prompt)
    check_fits(model, len(ids), params.max_tokens)
    out: list[Event] = []
    request = Request(params, tokenizer, out.extend, adapter)
    request.add_prompt(prompt, ids, n_prompt)
    sched = ModelScheduler(model, tokenizer, limits)
    sched.add(request)
    try:
        while sched.has_work():
            sched.step()
            while out:
                ev = out.pop(0)
                if isinstance(ev, BaseException):
                    raise ev
                yield ev
    finally:
        request.cancel()


def generate(model: Any, tokenizer: Any, prompt: str, params: GenerationParams, adapter: Any = None,
             limits: Limits | None = None) -> GenerationResult:
    """Collect `stream_generate` into whole choices."""
    return collect(stream_generate(model, tokenizer, prompt, params, limits, adapter=adapter), params)


def collect(events: Iterator[StreamDelta | StreamEnd], params: GenerationParams, n: int | None = None
            ) -> GenerationResult:
    """Whole choices from a request's events (`n` choices; default `params.n`)."""
    count = params.n if n is None else n
    choices = new_choices(count, params)
    end: StreamEnd | None = None
    seen_echo = [False] * count
    for ev in events:
        if isinstance(ev, StreamEnd):
            end = ev
            continue
        add_event(choices, seen_echo, ev, params)
    assert end is not None
    return GenerationResult(choices, end.prompt_tokens, end.completion_tokens)


def new_choices(count: int, params: GenerationParams) -> list[Choice]:
    return [Choice(i, "", "length", [] if params.logprobs is not None else None) for i in range(count)]


def add_event(choices: list[Choice], seen_echo: list[bool], ev: StreamDelta, params: GenerationParams) -> None:
    """Fold one delta into its choice (the first delta of a choice with `echo` is the prompt)."""
    c = choices[ev.index]
    if params.echo and not seen_echo[ev.index]:
        seen_echo[ev.index] = True
        c.prompt_tokens = list(ev.tokens) if params.logprobs is not None else None
        c.text += ev.text
        return
    c.text += ev.text
    if c.tokens is not None:
        c.tokens.extend(ev.tokens)
    if ev.finish_reason is not None:
        c.finish_reason = ev.finish_reason
