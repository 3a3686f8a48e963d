"""Completions and chat completions: wire request -> expert call -> wire response or SSE chunks.

Generation is blocking torch code; it runs on a small dedicated thread pool (the same threads
every time: torch's OpenMP pools are per calling thread, so hopping across a large generic pool
would multiply spinning OpenMP teams), so
the event loop keeps serving (health checks, other requests) during a long generation. Streams
advance one token per thread hop, so a client that disconnects stops its generation at once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from app.errors import ApiError
from app.metrics import Metrics
from app.protocol.chat import ChatCompletionRequest
from app.protocol.completions import CompletionRequest
from app.services.blackbox import BlackBoxService
from app.services.openai_shapes import (chat_choice, chat_delta_choice, chat_head, completion_choice,
                                        completion_head, usage)
from app.services.proxy import ProxyResult, ProxyService, ProxyStream
from app.sse import SSE_DONE, sse_error, sse_event
from experts.base import Expert, GenerationParams, StreamDelta, StreamEnd
from experts.remote.expert import RemoteExpert
from experts.repository.repo import ExpertRepository
from experts.runtime import Runtime

_DONE = object()


class CompletionService:
    def __init__(self, repo: ExpertRepository, runtime: Runtime, metrics: Metrics, *, proxy: ProxyService,
                 blackbox: BlackBoxService, max_n: int) -> None:
        self.repo = repo
        self.runtime = runtime
        self.metrics = metrics
        self.max_n = max_n
        self.proxy = proxy  # remote experts are forwarded through it instead of generating locally
        self.blackbox = blackbox  # black-box ensembles (local + remote members) answer there

    # -- shared -------------------------------------------------------------------------------
    def _expert(self, model: str) -> Expert:
        return self.repo.get(model)

    def _check_n(self, n: int) -> None:
        if n > self.max_n:
            raise ApiError(400, f"n must be at most {self.max_n}", param="n")

    async def _call(self, fn: Any, *args: Any) -> Any:
        return await self.runtime.run_torch(fn, *args)
    async def _prompts(self, expert: Expert, prompt: Any) -> list[str]:
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise ApiError(400, "prompt must not be an empty list", param="prompt")
        if isinstance(prompt[0], str):
            return list(prompt)
        if not hasattr(expert, "detokenize"):
            raise ApiError(400, "token-id prompts need an expert with a local tokenizer", param="prompt")
        lists = [prompt] if isinstance(prompt[0], int) else prompt
        return [await self._call(expert.detokenize, ids) for ids in lists]

    async def _stream_events(self, expert: Expert, prompt: str, params: GenerationParams
                             ) -> AsyncIterator[StreamDelta | StreamEnd]:
        """Advance the blocking generator one event per thread hop. The first hop happens before the
        caller starts the HTTP response, so bad input (e.g. context length) still gets a 4xx status."""
        it: Iterator[StreamDelta | StreamEnd] = await self._call(expert.stream, prompt, params)
        first = await self._call(next, it, _DONE)
        try:
            ev = first
            while ev is not _DONE:
                yield ev
                ev = await self._call(next, it, _DONE)
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    # -- /v1/completions ----------------------------------------------------------------------
    def _params(self, req: CompletionRequest) -> GenerationParams:
        return GenerationParams(max_tokens=16 if req.max_tokens is None else req.max_tokens,
                                temperature=req.temperature, top_p=req.top_p, n=req.n, stop=tuple(req.stop),
                                seed=req.seed, logprobs=req.logprobs, echo=req.echo)

    async def complete(self, req: CompletionRequest) -> dict[str, Any] | ProxyResult:
        self._check_n(req.n)
        expert = self._expert(req.model)
        if self.blackbox.serves(expert):
            return await self.blackbox.complete(req, expert)
        if isinstance(expert, RemoteExpert):
            return await self.proxy.complete("/completions", req, expert, self._complete_local)
        return await self._complete_local(req, expert)

    async def _complete_local(self, req: CompletionRequest, expert: Expert) -> dict[str, Any]:
        params = self._params(req)
        prompts = await self._prompts(expert, req.prompt)
        choices, n_prompt, n_completion = [], 0, 0
        for p_idx, prompt in enumerate(prompts):
            result = await self._call(expert.generate, prompt, params)
            n_prompt += result.prompt_tokens
            n_completion += result.completion_tokens
            for c in result.choices:
                tokens = (c.prompt_tokens or []) + (c.tokens or []) if req.logprobs is not None else None
                choices.append(completion_choice(p_idx * req.n + c.index, c.text, c.finish_reason, tokens))
        self.metrics.count_tokens(req.model, n_prompt, n_completion)
        return {**completion_head(req.model), "choices": choices, "usage": usage(n_prompt, n_completion)}

    async def stream_completion(self, req: CompletionRequest) -> AsyncIterator[str] | ProxyStream:
        self._check_n(req.n)
        expert = self._expert(req.model)
        if self.blackbox.serves(expert):
            return await self.blackbox.stream_completion(req, expert)
        if isinstance(expert, RemoteExpert):
            return await self.proxy.stream("/completions", req, expert, self._stream_completion_local)
        return await self._stream_completion_local(req, expert)

    async def _stream_completion_local(self, req: CompletionRequest, expert: Expert) -> AsyncIterator[str]:
        params = self._params(req)
        prompts = await self._prompts(expert, req.prompt)
        head = completion_head(req.model)
        first_events = self._stream_events(expert, prompts[0], params)
        first = await anext(first_events)  # may raise: still before the response starts

        async def body() -> AsyncIterator[str]:
            n_prompt = n_completion = 0
            try:
                for p_idx, prompt in enumerate(prompts):
                    events = first_events if p_idx == 0 else self._stream_events(expert, prompt, params)
                    pending = [first] if p_idx == 0 else []
                    async for ev in _chain(pending, events):
                        if isinstance(ev, StreamEnd):
                            n_prompt += ev.prompt_tokens
                            n_completion += ev.completion_tokens
                            continue
                        choice = completion_choice(p_idx * req.n + ev.index, ev.text, ev.finish_reason,
                                                   ev.tokens if req.logprobs is not None else None)
                        yield sse_event({**head, "choices": [choice], "usage": None})
                self.metrics.count_tokens(req.model, n_prompt, n_completion)
                if req.stream_options and req.stream_options.include_usage:
                    yield sse_event({**head, "choices": [], "usage": usage(n_prompt, n_completion)})
            except Exception as e:  # noqa: BLE001 - mid-stream errors travel as an SSE event
                yield sse_error(e)
            yield SSE_DONE

        return body()

    # -- /v1/chat/completions -----------------------------------------------------------------
    def _chat_params(self, req: ChatCompletionRequest) -> GenerationParams:
        max_tokens = req.max_completion_tokens or req.max_tokens
        return GenerationParams(max_tokens=max_tokens if max_tokens is not None else 256, temperature=req.temperature,
                                top_p=req.top_p, n=req.n, stop=tuple(req.stop), seed=req.seed,
                                logprobs=(req.top_logprobs or 0) if req.logprobs else None)

    async def _chat_prompt(self, expert: Expert, req: ChatCompletionRequest) -> str:
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        return await self._call(expert.render_chat, messages)

    async def chat(self, req: ChatCompletionRequest) -> dict[str, Any] | ProxyResult:
        self._check_n(req.n)
        expert = self._expert(req.model)
        if self.blackbox.serves(expert):
            return await self.blackbox.chat(req, expert)
        if isinstance(expert, RemoteExpert):
            return await self.proxy.complete("/chat/completions", req, expert, self._chat_local)
        return await self._chat_local(req, expert)

    async def _chat_local(self, req: ChatCompletionRequest, expert: Expert) -> dict[str, Any]:
        prompt = await self._chat_prompt(expert, req)
        params = await self._fit_chat_params(expert, req, prompt)
        result = await self._call(expert.generate, prompt, params)
        self.metrics.count_tokens(req.model, result.prompt_tokens, result.completion_tokens)
        choices = [chat_choice(c.index, c.text, c.finish_reason, (c.tokens or []) if req.logprobs else None)
                   for c in result.choices]
        return {**chat_head(req.model), "choices": choices,
                "usage": usage(result.prompt_tokens, result.completion_tokens)}

    async def _fit_chat_params(self, expert: Expert, req: ChatCompletionRequest, prompt: str) -> GenerationParams:
        """Without an explicit limit, a chat answer may use the rest of the context window (up to 256)."""
        params = self._chat_params(req)
        if req.max_completion_tokens or req.max_tokens:
            return params
        ctx = expert.describe().get("context_length") or 2048
        used = await self._call(expert.count_tokens, prompt)
        room = max(1, min(256, ctx - max(used, 1)))
        return GenerationParams(**{**{f: getattr(params, f) for f in params.__slots__}, "max_tokens": room})

    async def stream_chat(self, req: ChatCompletionRequest) -> AsyncIterator[str] | ProxyStream:
        self._check_n(req.n)
        expert = self._expert(req.model)
        if self.blackbox.serves(expert):
            return await self.blackbox.stream_chat(req, expert)
        if isinstance(expert, RemoteExpert):
            return await self.proxy.stream("/chat/completions", req, expert, self._stream_chat_local)
        return await self._stream_chat_local(req, expert)

    async def _stream_chat_local(self, req: ChatCompletionRequest, expert: Expert) -> AsyncIterator[str]:
        prompt = await self._chat_prompt(expert, req)
        params = await self._fit_chat_params(expert, req, prompt)
        head = chat_head(req.model, chunk=True)
        events = self._stream_events(expert, prompt, params)
        first = await anext(events)

        async def body() -> AsyncIterator[str]:
            started: set[int] = set()
            try:
                async for ev in _chain([first], events):
                    if isinstance(ev, StreamEnd):
                        self.metrics.count_tokens(req.model, ev.prompt_tokens, ev.completion_tokens)
                        if req.stream_options and req.stream_options.include_usage:
                            yield sse_event({**head, "choices": [],
                                             "usage": usage(ev.prompt_tokens, ev.completion_tokens)})
                        continue
                    choice = chat_delta_choice(ev.index, ev.text, ev.finish_reason,
                                               ev.tokens if req.logprobs else None, first=ev.index not in started)
                    started.add(ev.index)
                    yield sse_event({**head, "choices": [choice], "usage": None})
            except Exception as e:  # noqa: BLE001
                yield sse_error(e)
            yield SSE_DONE

        return body()


async def _chain(first: list[Any], rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    for x in first:
        yield x
    async for x in rest:
        yield x
