"""Perplexity and bits per byte of any causal LM (expert, ensemble or average) on a text.

Sliding windows (the standard protocol for fixed-context LMs): windows of `context_length`
tokens start every `stride` tokens; each window scores only the tokens that the previous window
did not, so every token is scored exactly once, with at least `context_length - stride` tokens
of context (except at the start). Bits per byte divides the total negative log-likelihood (in
bits) by the UTF-8 bytes of the text, so it is comparable across tokenizers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from experts.data.tokens import tokenize_text

DEFAULT_CONTEXT = 128
DEFAULT_STRIDE = 64


@dataclass(frozen=True)
class EvalResult:
    tokens: int
    bytes: int
    nll: float  # total, nats
    loss: float  # mean nats per token
    perplexity: float
    bits_per_byte: float
    context_length: int
    stride: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first scored position) of each window over n tokens: every position 1..n-1 is
    scored exactly once, each with at least min(position, context - stride) tokens of context
    (at least one, also when stride == context)."""
    overlap = max(1, context - stride)
    out, prev_end = [], 1
    while prev_end < n:
        start = max(0, prev_end - overlap)
        end = min(start + context, n)
        out.append((start, end, prev_end))
        prev_end = end
    return out


def evaluate_ids(model: Any, ids: torch.Tensor, n_bytes: int, *, context_length: int = DEFAULT_CONTEXT,
                 stride: int = DEFAULT_STRIDE, batch_size: int = 8,
                 progress: Callable[[float], None] | None = None) -> EvalResult:
    if not 0 < stride <= context_length:
        raise ValueError("stride must be in 1..context_length")
    if ids.numel() < 2:
        raise ValueError("the text is too short to evaluate (fewer than 2 tokens)")
    spans = windows(int(ids.numel()), context_length, stride)
    nll, count = 0.0, 0
    with torch.inference_mode():
        for b in range(0, len(spans), batch_size):
            group = spans[b:b + batch_size]
            width = max(e - s for s, e, _ in group)
            same = all(e - s == width for s, e, _ in group)
            batches = [group] if same else [[g] for g in group]  # the last window may be shorter
            for chunk in batches:
                x = torch.stack([ids[s:e] for s, e, _ in chunk])
                logp = torch.log_softmax(model(input_ids=x).logits.float(), dim=-1)
                for row, (s, e, first) in enumerate(chunk):
                    tgt = ids[first:e]
                    lp = logp[row, first - s - 1:e - s - 1].gather(1, tgt.unsqueeze(1))
                    nll -= float(lp.sum())
                    count += int(tgt.numel())
            if progress:
                progress(min(1.0, (b + len(group)) / len(spans)))
    loss = nll / count
    return EvalResult(count, n_bytes, nll, loss, math.exp(min(loss, 700)), nll / math.log(2) / max(n_bytes, 1),
                      context_length, stride)


def evaluate_text(model: Any, tokenizer: Any, text: str, **kw: Any) -> EvalResult:
    ids = tokenize_text(tokenizer, text)
    # Bytes of the text the scored tokens cover: all but the first token (which nothing predicts).
    first = tokenizer.decode(ids[:1].tolist()) if ids.numel() else ""
    n_bytes = len(text.encode("utf-8")) - len(first.encode("utf-8"))
    return evaluate_ids(model, ids, n_bytes, **kw)
