"""Completions and chat completions: wire request -> expert call -> wire response or SSE chunks.

Local experts (local, lora, BTM forests) are served by the batching engine: the prompt is tokenized
and checked in a worker thread (so bad input is a 4xx before anything is queued or streamed), then
submitted; the engine's events are shaped into the OpenAI answer or SSE chunks as they come. A
request whose consumer goes away (client disconnect) is cancelled and leaves the batch at the next
step. Remote experts go through the proxy (with fallbacks), black-box ensembles through their service.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from app.errors import ApiError
from app.metrics import Metrics
from app.protocol.chat import ChatCompletionRequest
from app.protocol.completions import CompletionRequest
from app.services.blackbox import BlackBoxService
from app.services.openai_shapes import (
    chat_choice,
    chat_delta_choice,
    chat_head,
    completion_choice,
    completion_head,
    usage,
)
from app.services.proxy import ProxyResult, ProxyService, ProxyStream
from app.sse import SSE_DONE, sse_error, sse_event
from experts.base import Expert, GenerationParams, StreamEnd
from experts.hf.engine.engine import Prompt
from experts.hf.local import LocalExpert, collect_async
from experts.hf.threads import run_sync
from experts.remote.expert import RemoteExpert
from experts.repository.mixes import mix_id
from experts.repository.repo import ExpertRepository
from experts.runtime import Runtime

INLINE_PREPARE_CHARS = 4096  # prompts up to this size are tokenized on the event loop (tens of microseconds)


class CompletionService:
    def __init__(self, repo: ExpertRepository, runtime: Runtime, metrics: Metrics, *, proxy: ProxyService,
                 blackbox: BlackBoxService, max_n: int, max_choices: int = 128) -> None:
        self.repo = repo
        self.runtime = runtime
        self.metrics = metrics
        self.max_n = max_n
        self.max_choices = max_choices  # prompts x n per request
        self.proxy = proxy  # remote experts are forwarded through it instead of generating locally
        self.blackbox = blackbox  # black-box ensembles (local + remote members) answer there

    # -- shared -------------------------------------------------------------------------------
    def _expert(self, req: CompletionRequest | ChatCompletionRequest) -> Expert:
        if req.adapters is not None:  # a request-time mix: the same as its compact model id
            return self.repo.get(mix_id(req.model, req.adapters.as_spec()))
        return self.repo.get(req.model)

    def _check_n(self, n: int) -> None:
        if n > self.max_n:
            raise ApiError(400, f"n must be at most {self.max_n}", param="n")

    def _local(self, expert: Expert) -> LocalExpert:
        if not isinstance(expert, LocalExpert):
            raise ApiError(400, f"expert {expert.id!r} cannot generate here", param="model",
                           code="model_cannot_generate")
        return expert

    async def _prepare(self, expert: LocalExpert, prompt: Any, max_tokens: int, n: int) -> list[Prompt]:
        """Every prompt of the request tokenized and checked (in a worker thread), before anything runs."""
        if isinstance(prompt, str):
            raw: list[str | list[int]] = [prompt]
        elif not prompt:
            raise ApiError(400, "prompt must not be an empty list", param="prompt")
        elif isinstance(prompt[0], int):
            raw = [list(prompt)]
        else:
            raw = list(prompt)
        if len(raw) * n > self.max_choices:
            raise ApiError(400, f"{len(raw)} prompts x n={n} is {len(raw) * n} choices; the limit per request is "
                                f"{self.max_choices}", param="prompt", code="too_many_choices")
        if expert.is_loaded() and sum(len(p) for p in raw) <= INLINE_PREPARE_CHARS:
            return [expert.prepare(p, max_tokens) for p in raw]  # short: cheaper than a thread hop
        return await run_sync(lambda: [expert.prepare(p, max_tokens) for p in raw])

    # -- /v1/completions ----------------------------------------------------------------------
    def _params(self, req: CompletionRequest) -> GenerationParams:
        return GenerationParams(max_tokens=16 if req.max_tokens is None else req.max_tokens,
                                temperature=req.temperature, top_p=req.top_p, n=req.n, stop=tuple(req.stop),
                                seed=req.seed, logprobs=req.logprobs, echo=req.echo)

    async def complete(self, req: CompletionRequest) -> dict[str, Any] | ProxyResult:
        self._check_n(req.n)
        expert = self._expert(req)
        if self.blackbox.serves(expert):
            return await self.blackbox.complete(req, expert)
        if isinstance(expert, RemoteExpert):
            return await self.proxy.complete("/completions", req, expert, self._complete_local)
        return await self._complete_local(req, expert)

    async def _complete_local(self, req: CompletionRequest, expert: Expert) -> dict[str, Any]:
        local = self._local(expert)
        params = self._params(req)
        prompts = await self._prepare(local, req.prompt, params.max_tokens, req.n)
        result = await collect_async(local.stream(prompts, params, whole=True), params, n=len(prompts) * req.n)
        choices = []
        for c in result.choices:
            tokens = (c.prompt_tokens or []) + (c.tokens or []) if req.logprobs is not None else None
            choices.append(completion_choice(c.index, c.text, c.finish_reason, tokens))
        self.metrics.count_tokens(req.model, result.prompt_tokens, result.completion_tokens)
        return {**completion_head(req.model), "choices": choices,
                "usage": usage(result.prompt_tokens, result.completion_tokens)}

    async def stream_completion(self, req: CompletionRequest) -> AsyncIterator[str] | ProxyStream:
        self._check_n(req.n)
        expert = self._expert(req)
        if self.blackbox.serves(expert):
            return await self.blackbox.stream_completion(req, expert)
        if isinstance(expert, RemoteExpert):
            return await self.proxy.stream("/completions", req, expert, self._stream_completion_local)
        return await self._stream_completion_local(req, expert)

    async def _stream_completion_local(self, req: CompletionRequest, expert: Expert) -> AsyncIterator[str]:
        local = self._local(expert)
        params = self._params(req)
        prompts = await self._prepare(local, req.prompt, params.max_tokens, req.n)
        events = local.stream(prompts, params)  # queued now: a full queue is a 429 before the stream
        head = completion_head(req.model)

        async def body() -> AsyncIterator[str]:
            try:
                async for ev in events:
                    if isinstance(ev, StreamEnd):
                        self.metrics.count_tokens(req.model, ev.prompt_tokens, ev.completion_tokens)
                        if req.stream_options and req.stream_options.include_usage:
                            yield sse_event({**head, "choices": [],
                                             "usage": usage(ev.prompt_tokens, ev.completion_tokens)})
                        continue
                    choice = completion_choice(ev.index, ev.text, ev.finish_reason,
                                               ev.tokens if req.logprobs is not None else None)
                    yield sse_event({**head, "choices": [choice], "usage": None})
            except Exception as e:
                yield sse_error(e)
            finally:
                await events.aclose()  # type: ignore[attr-defined]
            yield SSE_DONE

        return body()

    # -- /v1/chat/completions -----------------------------------------------------------------
    def _chat_params(self, req: ChatCompletionRequest) -> GenerationParams:
        max_tokens = req.max_completion_tokens or req.max_tokens
        return GenerationParams(max_tokens=max_tokens if max_tokens is not None else 256, temperature=req.temperature,
                                top_p=req.top_p, n=req.n, stop=tuple(req.stop), seed=req.seed,
                                logprobs=(req.top_logprobs or 0) if req.logprobs else None)

    async def _chat_prompt(self, expert: LocalExpert, req: ChatCompletionRequest) -> tuple[Prompt, int]:
        """The rendered and tokenized chat prompt; without an explicit limit, the answer may use the rest of
        the context window (up to 256 tokens)."""
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        explicit = req.max_completion_tokens or req.max_tokens

        def render() -> tuple[Prompt, int]:
            text = expert.render_chat(messages)
            if explicit:
                return expert.prepare(text, explicit), explicit
            ctx = expert.describe().get("context_length") or 2048
            probe = expert.prepare(text, 0)
            room = max(1, min(256, ctx - max(len(probe.ids), 1)))
            return expert.prepare(text, room), room

        return await run_sync(render)

    async def chat(self, req: ChatCompletionRequest) -> dict[str, Any] | ProxyResult:
        self._check_n(req.n)
        expert = self._expert(req)
        if self.blackbox.serves(expert):
            return await self.blackbox.chat(req, expert)
        if isinstance(expert, RemoteExpert):
            return await self.proxy.complete("/chat/completions", req, expert, self._chat_local)
        return await self._chat_local(req, expert)

    def _chat_params_for(self, req: ChatCompletionRequest, max_tokens: int) -> GenerationParams:
        p = self._chat_params(req)
        return GenerationParams(max_tokens=max_tokens, temperature=p.temperature, top_p=p.top_p, n=p.n, stop=p.stop,
                                seed=p.seed, logprobs=p.logprobs)

    async def _chat_local(self, req: ChatCompletionRequest, expert: Expert) -> dict[str, Any]:
        local = self._local(expert)
        prompt, max_tokens = await self._chat_prompt(local, req)
        params = self._chat_params_for(req, max_tokens)
        result = await collect_async(local.stream([prompt], params, whole=True), params)
        self.metrics.count_tokens(req.model, result.prompt_tokens, result.completion_tokens)
        choices = [chat_choice(c.index, c.text, c.finish_reason, (c.tokens or []) if req.logprobs else None)
                   for c in result.choices]
        return {**chat_head(req.model), "choices": choices,
                "usage": usage(result.prompt_tokens, result.completion_tokens)}

    async def stream_chat(self, req: ChatCompletionRequest) -> AsyncIterator[str] | ProxyStream:
        self._check_n(req.n)
        expert = self._expert(req)
        if self.blackbox.serves(expert):
            return await self.blackbox.stream_chat(req, expert)
        if isinstance(expert, RemoteExpert):
            return await self.proxy.stream("/chat/completions", req, expert, self._stream_chat_local)
        return await self._stream_chat_local(req, expert)

    async def _stream_chat_local(self, req: ChatCompletionRequest, expert: Expert) -> AsyncIterator[str]:
        local = self._local(expert)
        prompt, max_tokens = await self._chat_prompt(local, req)
        params = self._chat_params_for(req, max_tokens)
        events = local.stream([prompt], params)
        head = chat_head(req.model, chunk=True)

        async def body() -> AsyncIterator[str]:
            started: set[int] = set()
            try:
                async for ev in events:
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
            except Exception as e:
                yield sse_error(e)
            finally:
                await events.aclose()  # type: ignore[attr-defined]
            yield SSE_DONE

        return body()
