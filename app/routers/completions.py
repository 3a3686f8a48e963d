"""POST /v1/completions and /v1/chat/completions (OpenAI-compatible)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from app.deps import CompletionsDep, require_client
from app.disconnect import until_disconnect
from app.protocol.chat import ChatCompletionRequest, ChatCompletionResponse
from app.protocol.common import error_responses
from app.protocol.completions import CompletionRequest, CompletionResponse
from app.services.proxy import ProxyResult, ProxyStream

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(require_client)])
SSE_OR_JSON = {"content": {"text/event-stream": {}}, "description": "JSON, or SSE chunks when stream=true"}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _sse(result):
    if isinstance(result, ProxyStream):
        headers = {**SSE_HEADERS, **result.headers}
        return StreamingResponse(result.chunks, media_type="text/event-stream", headers=headers)
    return StreamingResponse(result, media_type="text/event-stream", headers=SSE_HEADERS)


def _json(result):
    return JSONResponse(result.body, headers=result.headers) if isinstance(result, ProxyResult) else result


@router.post("/completions", response_model=CompletionResponse, response_model_exclude_unset=False,
             responses={**error_responses(400, 401, 404, 413, 503),
                        200: SSE_OR_JSON},
             summary="Create a completion")
async def create_completion(body: CompletionRequest, service: CompletionsDep, request: Request):
    """Text completion with sampling, stop sequences, seeds, logprobs and echo; `stream=true` sends SSE
    chunks ending with `data: [DONE]`."""
    if body.stream:
        return _sse(await service.stream_completion(body))
    return _json(await until_disconnect(request, service.complete(body)))


@router.post("/chat/completions", response_model=ChatCompletionResponse,
             responses={**error_responses(400, 401, 404, 413, 503),
                        200: SSE_OR_JSON},
             summary="Create a chat completion")
async def create_chat_completion(body: ChatCompletionRequest, service: CompletionsDep, request: Request):
    """Chat completion; the prompt is built with the tokenizer's chat template, or the default
    template documented in docs/api.md."""
    if body.stream:
        return _sse(await service.stream_chat(body))
    return _json(await until_disconnect(request, service.chat(body)))
