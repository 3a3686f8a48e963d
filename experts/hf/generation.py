"""Token generation for Hugging Face causal LMs: KV cache, sampling, stop strings, logprobs, echo.

`stream_generate` is the one implementation; `generate` collects it, so streamed and
non-streamed answers are identical for the same seed. All `n` choices of a prompt run as one
batch (same prompt, same length, so no padding is needed).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from experts.base import Choice, GenerationParams, GenerationResult, StreamDelta, StreamEnd, TokenLogprob
from experts.errors import GenerationInputError


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def context_length(model: Any) -> int:
    cfg = model.config
    return int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048)


def start_ids(tokenizer: Any, prompt: str) -> tuple[list[int], int]:
    """Prompt ids and how many of them count as prompt tokens (an empty prompt starts from BOS/EOS)."""
    ids = encode(tokenizer, prompt)
    if ids:
        return ids, len(ids)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise GenerationInputError("the prompt is empty and the tokenizer has no BOS/EOS token", param="prompt")
    return [int(start)], 0


def _forward(model: Any, input_ids: torch.Tensor, cache: Any = None) -> tuple[torch.Tensor, Any]:
    """One forward pass with the KV cache; returns (logits, cache).

    transformers 5 calls the cache argument `cache` (older releases: `past_key_values`)."""
    name = _cache_arg(type(model))
    kwargs = {name: cache} if cache is not None else {}
    out = model(input_ids=input_ids, use_cache=True, **kwargs)
    return out.logits, getattr(out, name)


_CACHE_ARGS: dict[type, str] = {}


def _cache_arg(cls: type) -> str:
    if cls not in _CACHE_ARGS:
        import inspect

        params = inspect.signature(cls.forward).parameters
        _CACHE_ARGS[cls] = "cache" if "cache" in params else "past_key_values"
    return _CACHE_ARGS[cls]


def _token_text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _token_bytes(tokenizer: Any, token_id: int) -> bytes:
    tok = tokenizer.convert_ids_to_tokens(token_id)
    try:  # byte-level BPE: map the unicode stand-ins back to bytes
        from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

        inv = {v: k for k, v in bytes_to_unicode().items()}
        return bytes(inv[c] for c in tok)
    except (KeyError, TypeError, ImportError):
        return _token_text(tokenizer, token_id).encode("utf-8")


def _top(tokenizer: Any, logprobs: torch.Tensor, k: int) -> tuple[tuple[str, float], ...]:
    if k <= 0:
        return ()
    vals, idx = torch.topk(logprobs, min(k, logprobs.shape[-1]))
    return tuple((_token_text(tokenizer, int(i)), float(v)) for v, i in zip(vals.tolist(), idx.tolist()))


def score_ids(model: Any, tokenizer: Any, ids: list[int], *, top_logprobs: int = 0) -> list[TokenLogprob]:
    """Logprob of every token given the ones before it (the first gets None). One forward pass."""
    if len(ids) > context_length(model):
        raise GenerationInputError(
            f"the text is {len(ids)} tokens, over the model's context of {context_length(model)}",
            code="context_length_exceeded",
        )
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
        lp = torch.log_softmax(logits, dim=-1)
    return _prompt_logprobs(tokenizer, ids, lp, top_logprobs)


def _prompt_logprobs(tokenizer: Any, ids: list[int], lp: torch.Tensor, k: int) -> list[TokenLogprob]:
    out, offset = [], 0
    chosen = lp[:-1].gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1).tolist() if len(ids) > 1 else []
    for i, tid in enumerate(ids):
        text = _token_text(tokenizer, tid)
        logprob = None if i == 0 else chosen[i - 1]
        top = () if i == 0 else _top(tokenizer, lp[i - 1], k)
        out.append(TokenLogprob(text, tid, logprob, top, offset, _token_bytes(tokenizer, tid)))
        offset += len(text)
    return out


@dataclass
class _Row:
    ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of `text` already sent
    pending: list[TokenLogprob] = field(default_factory=list)
    finish: str | None = None
    sampled: int = 0  # tokens sampled, including a final EOS


def _sample(logits: torch.Tensor, params: GenerationParams, gen: torch.Generator) -> torch.Tensor:
    if params.temperature <= 0:
        return torch.argmax(logits, dim=-1)
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        drop = (torch.cumsum(sorted_p, dim=-1) - sorted_p) >= params.top_p  # keep the smallest nucleus
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def _find_stop(text: str, stops: tuple[str, ...], start: int) -> int | None:
    hits = [p for s in stops if (p := text.find(s, max(0, start))) != -1]
    return min(hits) if hits else None


def stream_generate(
    model: Any, tokenizer: Any, prompt: str, params: GenerationParams
) -> Iterator[StreamDelta | StreamEnd]:
    """Yield text increments per choice, then a StreamEnd with token counts.

    With `echo`, each choice's first delta carries the prompt (and its logprobs when asked for).
    Stop strings are never emitted: text that might be the start of a stop string is held back.
    """
    ids, n_prompt = start_ids(tokenizer, prompt)
    ctx = context_length(model)
    if len(ids) + params.max_tokens > ctx:
        raise GenerationInputError(
            f"this model's maximum context length is {ctx} tokens; the prompt has {len(ids)} and "
            f"max_tokens asks for {params.max_tokens} more",
            code="context_length_exceeded",
            param="max_tokens",
        )
    seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
    gen = torch.Generator().manual_seed(seed)
    k = params.logprobs or 0
    want_lp = params.logprobs is not None
    eos = tokenizer.eos_token_id
    holdback = max((len(s) for s in params.stop), default=1) - 1
    rows = [_Row() for _ in range(params.n)]
    with torch.inference_mode():
        all_logits, past = _forward(model, torch.tensor([ids] * params.n))
        logits = all_logits[:, -1].float()
        if params.echo:
            echo_tokens: list[TokenLogprob] = []
            if want_lp:
                echo_tokens = _prompt_logprobs(tokenizer, ids, torch.log_softmax(all_logits[0].float(), -1), k)
            echo_text = prompt
            for i in range(params.n):
                yield StreamDelta(i, echo_text, tuple(echo_tokens))
        del all_logits
        for step in range(params.max_tokens):
            lp = torch.log_softmax(logits, dim=-1)
            nxt = _sample(logits, params, gen)
            for i, row in enumerate(rows):
                if row.finish is not None:
                    continue
                tid = int(nxt[i])
                row.sampled += 1
                if eos is not None and tid == eos:
                    row.finish = "stop"
                    yield from _flush(row, i, final=True)
                    continue
                before = len(row.text)
                row.ids.append(tid)
                row.text = tokenizer.decode(row.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
                if want_lp:
                    base_off = len(prompt) if params.echo else 0
                    row.pending.append(
                        TokenLogprob(_token_text(tokenizer, tid), tid, float(lp[i, tid]), _top(tokenizer, lp[i], k),
                                     base_off + before, _token_bytes(tokenizer, tid))
                    )
                cut = _find_stop(row.text, params.stop, before - holdback) if params.stop else None
                if cut is not None:
                    row.text, row.finish = row.text[:cut], "stop"
                    yield from _flush(row, i, final=True)
                elif step + 1 == params.max_tokens:
                    row.finish = "length"
                    yield from _flush(row, i, final=True)
                else:
                    yield from _flush(row, i, final=False, holdback=holdback)
            if all(r.finish is not None for r in rows):
                break
            step_logits, past = _forward(model, nxt.unsqueeze(1), past)
            logits = step_logits[:, -1].float()
        for i, row in enumerate(rows):
            if row.finish is None:  # max_tokens == 0
                row.finish = "length"
                yield from _flush(row, i, final=True)
    yield StreamEnd(n_prompt, sum(r.sampled for r in rows))


def _flush(row: _Row, index: int, *, final: bool, holdback: int = 0) -> Iterator[StreamDelta]:
    end = len(row.text) if final else max(row.emitted, len(row.text) - holdback)
    if not final:
        while end > row.emitted and row.text[end - 1] == "\ufffd":  # an incomplete UTF-8 sequence
            end -= 1
    text = row.text[row.emitted:end]
    if text or final:
        tokens = tuple(row.pending)
        row.pending = []
        row.emitted = end
        yield StreamDelta(index, text, tokens, row.finish if final else None)


def generate(model: Any, tokenizer: Any, prompt: str, params: GenerationParams) -> GenerationResult:
    """Collect `stream_generate` into whole choices."""
    choices = [Choice(i, "", "length", [] if params.logprobs is not None else None) for i in range(params.n)]
    end: StreamEnd | None = None
    seen_echo = [False] * params.n
    for ev in stream_generate(model, tokenizer, prompt, params):
        if isinstance(ev, StreamEnd):
            end = ev
            continue
        c = choices[ev.index]
        if params.echo and not seen_echo[ev.index]:
            seen_echo[ev.index] = True
            c.prompt_tokens = list(ev.tokens) if params.logprobs is not None else None
            c.text += ev.text
            continue
        c.text += ev.text
        if c.tokens is not None:
            c.tokens.extend(ev.tokens)
        if ev.finish_reason is not None:
            c.finish_reason = ev.finish_reason
    assert end is not None
    return GenerationResult(choices, end.prompt_tokens, end.completion_tokens)
