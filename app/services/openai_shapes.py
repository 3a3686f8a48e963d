"""OpenAI response shaping shared by every answer path (local experts, black-box ensembles).

Pure functions from the domain's values (`TokenLogprob`, token counts) to the wire's JSON fields,
so that a completion looks the same whichever kind of expert produced it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

from experts.base import TokenLogprob

FINGERPRINT = "mergegate-0.1"


def legacy_logprobs(tokens: Sequence[TokenLogprob]) -> dict[str, Any]:
    """`choices[].logprobs` of /v1/completions."""
    return {
        "tokens": [t.token for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [None if t.logprob is None else dict(t.top) for t in tokens],
        "text_offset": [t.text_offset for t in tokens],
    }


def chat_logprobs(tokens: Sequence[TokenLogprob]) -> dict[str, Any]:
    """`choices[].logprobs` of /v1/chat/completions."""
    return {"content": [
        {"token": t.token, "logprob": t.logprob, "bytes": list(t.raw),
         "top_logprobs": [{"token": s, "logprob": lp, "bytes": list(s.encode())} for s, lp in t.top]}
        for t in tokens
    ]}


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_head(model: str) -> dict[str, Any]:
    """The fields every /v1/completions answer or chunk starts with."""
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": model, "system_fingerprint": FINGERPRINT}


def chat_head(model: str, *, chunk: bool = False) -> dict[str, Any]:
    """The fields every /v1/chat/completions answer (or, with `chunk`, stream chunk) starts with."""
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk" if chunk else "chat.completion",
            "created": int(time.time()), "model": model, "system_fingerprint": FINGERPRINT}


def completion_choice(index: int, text: str, finish_reason: str | None,
                      tokens: Sequence[TokenLogprob] | None) -> dict[str, Any]:
    """One /v1/completions choice (or chunk choice); `tokens` None: no logprobs were asked for."""
    lp = legacy_logprobs(tokens) if tokens is not None else None
    return {"index": index, "text": text, "logprobs": lp, "finish_reason": finish_reason}


def chat_choice(index: int, text: str, finish_reason: str | None, tokens: Sequence[TokenLogprob] | None
                ) -> dict[str, Any]:
    """One whole /v1/chat/completions choice; `tokens` None: no logprobs were asked for."""
    return {"index": index, "message": {"role": "assistant", "content": text},
            "logprobs": chat_logprobs(tokens) if tokens is not None else None, "finish_reason": finish_reason}


def chat_delta_choice(index: int, text: str, finish_reason: str | None, tokens: Sequence[TokenLogprob] | None,
                      *, first: bool) -> dict[str, Any]:
    """One chat stream chunk's choice; the first delta of a choice carries the role."""
    delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {"content": text}
    return {"index": index, "delta": delta, "finish_reason": finish_reason,
            "logprobs": chat_logprobs(tokens) if tokens is not None else None}
