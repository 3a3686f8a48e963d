"""Black-box ensembles: registration, and serving them through /v1/completions and /v1/chat/completions.

An `ensemble` record with a `mode` is served by `BlackBoxEnsemble` (the `blackbox` entry of the kinds
table, :mod:`experts.runtime`); one without is a BTM forest. Answers are
relayed as JSONResponse / StreamingResponse (ProxyResult / ProxyStream) so that the `ensemble` report
(candidates, scores, member usage) reaches the client alongside the OpenAI fields.

Usage in the answer: `prompt_tokens` is the prompt as counted by the member that produced the answer
(score_select: the selected candidate's generator; token_mix: the first local member with a weight,
else the first remote member's upstream count); `completion_tokens` is the answer's tokens (score_select:
as its generator counted them; token_mix: the steps taken, an end-of-text included). Everything the
members were asked for (calls, prompt and completion tokens per member, generation and scoring) is in
`ensemble.member_usage` and `ensemble.upstream`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from app.errors import ApiError
from app.metrics import Metrics
from app.protocol.blackbox import PatchEnsembleRequest, RegisterEnsembleRequest
from app.protocol.chat import ChatCompletionRequest
from app.protocol.completions import CompletionRequest
from app.services.openai_shapes import (
    chat_choice,
    chat_delta_choice,
    chat_head,
    completion_choice,
    completion_head,
    usage,
)
from app.services.proxy import ProxyResult, ProxyStream
from app.sse import SSE_DONE, sse_error, sse_event
from experts.base import ExpertKind, GenerationParams, StreamDelta
from experts.blackbox import BlackBoxEnsemble, EnsembleEnd, create_blackbox, is_blackbox, update_blackbox
from experts.hf.threads import run_sync
from experts.repository.repo import ExpertRepository
from experts.runtime import Runtime

ENSEMBLE = ExpertKind.ENSEMBLE.value
CHAT_DEFAULT_MAX_TOKENS = 256


class BlackBoxService:
    def __init__(self, repo: ExpertRepository, runtime: Runtime, metrics: Metrics) -> None:
        self.repo = repo
        self.runtime = runtime  # the torch thread all local members' work shares
        self.metrics = metrics

    @staticmethod
    def serves(expert: Any) -> bool:
        return isinstance(expert, BlackBoxEnsemble)

    # -- admin ----------------------------------------------------------------------------------------
    async def register(self, req: RegisterEnsembleRequest) -> dict[str, Any]:
        record = await run_sync(lambda: create_blackbox(
            self.repo, req.id, req.mode, req.member_list(), weights=req.weights, candidates=req.candidates,
            top_logprobs=req.top_logprobs, tags=req.tags, domain=req.domain))
        return self.repo.describe(record.id)

    async def patch(self, expert_id: str, req: PatchEnsembleRequest) -> dict[str, Any]:
        await run_sync(lambda: update_blackbox(self.repo, expert_id, weights=req.weights, candidates=req.candidates,
                                               top_logprobs=req.top_logprobs))
        return self.repo.describe(expert_id)

    def list(self) -> list[dict[str, Any]]:
        return [{**r.to_dict(), "loaded": False} for r in self.repo.list(kind=ENSEMBLE) if is_blackbox(r)]

    # -- request checks -------------------------------------------------------------------------------
    @staticmethod
    def _check(ens: BlackBoxEnsemble, n: int, logprobs: int | None, echo: bool = False) -> None:
        if n != 1:
            raise ApiError(400, "black-box ensembles answer with n=1", param="n")
        if echo:
            raise ApiError(400, "echo is not supported by black-box ensembles", param="echo")
        if logprobs is not None and ens.mode == "score_select":
            raise ApiError(400, "logprobs are not available from a score_select ensemble (its answer is one "
                                "member's text); token_mix ensembles return the mixture's logprobs", param="logprobs")

    @staticmethod
    def _prompt(prompt: Any) -> str:
        if isinstance(prompt, str):
            return prompt
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            return prompt[0]
        raise ApiError(400, "black-box ensembles take one text prompt (not token ids or several prompts)",
                       param="prompt")

    def _headers(self, ens: BlackBoxEnsemble, end: EnsembleEnd | None) -> dict[str, str]:
        h = {"x-mergegate-ensemble-mode": ens.mode, "x-mergegate-expert": ens.id}
        if end is not None:
            h["x-mergegate-upstream-calls"] = str(end.report["upstream"]["calls"])
            if "selected" in end.report:
                h["x-mergegate-selected"] = end.report["selected"]
        return h

    def _count(self, ens: BlackBoxEnsemble, end: EnsembleEnd) -> None:
        self.metrics.count_tokens(ens.id, end.prompt_tokens, end.completion_tokens)

    # -- /v1/completions ------------------------------------------------------------------------------
    def _completion_input(self, req: CompletionRequest, ens: BlackBoxEnsemble
                          ) -> tuple[str, GenerationParams, dict[str, Any]]:
        self._check(ens, req.n, req.logprobs, req.echo)
        prompt = self._prompt(req.prompt)
        params = GenerationParams(max_tokens=16 if req.max_tokens is None else req.max_tokens,
                                  temperature=req.temperature, top_p=req.top_p, stop=tuple(req.stop), seed=req.seed,
                                  logprobs=req.logprobs)
        body = req.model_dump(exclude_unset=True, exclude={"model", "stream", "stream_options"})
        body.update(prompt=prompt, max_tokens=params.max_tokens)  # the same request, for each remote candidate
        return prompt, params, body

    async def complete(self, req: CompletionRequest, ens: BlackBoxEnsemble) -> ProxyResult:
        prompt, params, body = self._completion_input(req, ens)
        end = await ens.answer(prompt, params, body)
        self._count(ens, end)
        tokens = end.tokens if req.logprobs is not None else None
        out = {**completion_head(ens.id), "choices": [completion_choice(0, end.text, end.finish_reason, tokens)],
               "usage": usage(end.prompt_tokens, end.completion_tokens), "ensemble": end.report}
        return ProxyResult(out, self._headers(ens, end))

    async def stream_completion(self, req: CompletionRequest, ens: BlackBoxEnsemble) -> ProxyStream:
        prompt, params, body = self._completion_input(req, ens)
        head = completion_head(ens.id)
        events = await ens.events(prompt, params, body)
        with_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(ev: StreamDelta) -> dict[str, Any]:
            tokens = ev.tokens if req.logprobs is not None else None
            return {**head, "choices": [completion_choice(0, ev.text, ev.finish_reason, tokens)], "usage": None}

        return ProxyStream(self._sse(ens, events, head, chunk, with_usage), self._headers(ens, None))

    # -- /v1/chat/completions -------------------------------------------------------------------------
    async def _chat_input(self, req: ChatCompletionRequest, ens: BlackBoxEnsemble
                          ) -> tuple[str, GenerationParams, dict[str, Any]]:
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        self._check(ens, req.n, logprobs)
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        prompt = await self.runtime.run_torch(ens.render_chat, messages)
        max_tokens = req.max_completion_tokens or req.max_tokens
        if max_tokens is None:
            max_tokens = await ens.room(prompt, CHAT_DEFAULT_MAX_TOKENS)
        params = GenerationParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                                  stop=tuple(req.stop), seed=req.seed, logprobs=logprobs)
        # Remote members get the rendered prompt on /v1/completions.
        body: dict[str, Any] = {"prompt": prompt, "max_tokens": max_tokens, "temperature": req.temperature,
                                "top_p": req.top_p}
        if req.stop:
            body["stop"] = list(req.stop)
        if req.seed is not None:
            body["seed"] = req.seed
        if req.user is not None:
            body["user"] = req.user
        return prompt, params, body

    async def chat(self, req: ChatCompletionRequest, ens: BlackBoxEnsemble) -> ProxyResult:
        prompt, params, body = await self._chat_input(req, ens)
        end = await ens.answer(prompt, params, body)
        self._count(ens, end)
        tokens = end.tokens if req.logprobs else None
        out = {**chat_head(ens.id), "choices": [chat_choice(0, end.text, end.finish_reason, tokens)],
               "usage": usage(end.prompt_tokens, end.completion_tokens), "ensemble": end.report}
        return ProxyResult(out, self._headers(ens, end))

    async def stream_chat(self, req: ChatCompletionRequest, ens: BlackBoxEnsemble) -> ProxyStream:
        prompt, params, body = await self._chat_input(req, ens)
        head = chat_head(ens.id, chunk=True)
        events = await ens.events(prompt, params, body)
        with_usage = bool(req.stream_options and req.stream_options.include_usage)
        started = [False]

        def chunk(ev: StreamDelta) -> dict[str, Any]:
            choice = chat_delta_choice(0, ev.text, ev.finish_reason, ev.tokens if req.logprobs else None,
                                       first=not started[0])
            started[0] = True
            return {**head, "choices": [choice], "usage": None}

        return ProxyStream(self._sse(ens, events, head, chunk, with_usage), self._headers(ens, None))

    # -- SSE ------------------------------------------------------------------------------------------
    async def _sse(self, ens: BlackBoxEnsemble, events: AsyncIterator[Any], head: dict[str, Any], chunk: Any,
                   include_usage: bool) -> AsyncIterator[str]:
        """Chunks as the ensemble produces them; with include_usage a last chunk carries the usage and the
        ensemble report; errors after the first byte travel as an SSE error event."""
        try:
            async for ev in events:
                if isinstance(ev, EnsembleEnd):
                    self._count(ens, ev)
                    if include_usage:
                        yield sse_event({**head, "choices": [], "usage": usage(ev.prompt_tokens, ev.completion_tokens),
                                         "ensemble": ev.report})
                    continue
                yield sse_event(chunk(ev))
        except Exception as e:
            yield sse_error(e)
        finally:
            await events.aclose()  # type: ignore[attr-defined]
        yield SSE_DONE
