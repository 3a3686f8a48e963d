"""The pieces of generation for Hugging Face causal LMs: tokenizing, the context check, one forward with
the KV cache, token texts and bytes, log-probabilities (scoring, echo), sampling and stop strings.

The serving loop itself is the batching engine (:mod:`experts.hf.engine`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from experts.base import GenerationParams, TokenLogprob
from experts.errors import GenerationInputError

try:  # transformers 5: every fast tokenizer is a TokenizersBackend
    from transformers.tokenization_utils_tokenizers import TokenizersBackend as _Backend
except ImportError:  # pragma: no cover - older transformers
    from transformers import PreTrainedTokenizerFast as _Backend

_BACKEND_DECODE = getattr(_Backend, "_decode", None)
_BACKEND_API = _Backend.decode
_BACKEND_ENCODE = getattr(_Backend, "_encode_plus", None)
_BACKEND_CALL = _Backend.__call__


def encode(tokenizer: Any, text: str) -> list[int]:
    """`tokenizer(text, add_special_tokens=False)["input_ids"]`, through the Rust tokenizer directly when that is
    all the call does: the Python wrapper costs several times the encoding itself, on the event loop's thread
    for every request."""
    backend = _plain_backend(tokenizer)
    if backend is not None:
        return backend.encode(text, add_special_tokens=False).ids
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _plain_backend(tokenizer: Any) -> Any:
    """The Rust tokenizer of a fast tokenizer whose call adds nothing to it: neither its class nor its settings
    (split special tokens; truncation or padding, which the wrapper switches off) change the ids."""
    t = type(tokenizer)
    if _BACKEND_ENCODE is None or getattr(t, "_encode_plus", None) is not _BACKEND_ENCODE \
            or t.__call__ is not _BACKEND_CALL or getattr(tokenizer, "split_special_tokens", False):
        return None
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or getattr(backend, "truncation", 1) is not None or getattr(backend, "padding", 1) is not None:
        return None
    return backend


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


def check_fits(model: Any, n_prompt_ids: int, max_tokens: int) -> None:
    """The prompt plus the tokens asked for must fit the model's context (400 otherwise)."""
    ctx = context_length(model)
    if n_prompt_ids + max_tokens > ctx:
        raise GenerationInputError(
            f"this model's maximum context length is {ctx} tokens; the prompt has {n_prompt_ids} and "
            f"max_tokens asks for {max_tokens} more",
            code="context_length_exceeded",
            param="max_tokens",
        )


def forward(model: Any, input_ids: torch.Tensor, cache: Any = None) -> tuple[torch.Tensor, Any]:
    """One forward pass with the KV cache; returns (logits, cache).

    transformers 5 calls the cache argument `cache` (older releases: `past_key_values`)."""
    name = cache_arg(type(model))
    kwargs = {name: cache} if cache is not None else {}
    out = model(input_ids=input_ids, use_cache=True, **kwargs)
    return out.logits, getattr(out, name)


_CACHE_ARGS: dict[type, str] = {}


def cache_arg(cls: type) -> str:
    """The name of a model class's KV-cache argument: transformers 5 says `cache`, older releases
    `past_key_values`."""
    if cls not in _CACHE_ARGS:
        params = inspect.signature(cls.forward).parameters
        _CACHE_ARGS[cls] = "cache" if "cache" in params else "past_key_values"
    return _CACHE_ARGS[cls]


def text_decoder(tokenizer: Any) -> Callable[[list[int]], str]:
    """`ids -> text` as `tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)`
    gives it, through the Rust tokenizer directly when that is all the tokenizer's decode does (a fast
    tokenizer that does not override it): a third of the cost per call, which the engine pays per row per
    step."""
    backend = getattr(tokenizer, "_tokenizer", None)
    plain = getattr(type(tokenizer), "_decode", None) is _BACKEND_DECODE and type(tokenizer).decode is _BACKEND_API
    if plain and _BACKEND_DECODE is not None and callable(getattr(backend, "decode", None)):
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def token_text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def token_bytes(tokenizer: Any, token_id: int) -> bytes:
    tok = tokenizer.convert_ids_to_tokens(token_id)
    try:  # byte-level BPE: map the unicode stand-ins back to bytes
        from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

        inv = {v: k for k, v in bytes_to_unicode().items()}
        return bytes(inv[c] for c in tok)
    except (KeyError, TypeError, ImportError):
        return token_text(tokenizer, token_id).encode("utf-8")


def top_logprobs(tokenizer: Any, logprobs: torch.Tensor, k: int) -> tuple[tuple[str, float], ...]:
    if k <= 0:
        return ()
    vals, idx = torch.topk(logprobs, min(k, logprobs.shape[-1]))
    return tuple((token_text(tokenizer, int(i)), float(v)) for v, i in zip(vals.tolist(), idx.tolist()))


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
    return prompt_logprobs(tokenizer, ids, lp, top_logprobs)


def prompt_logprobs(tokenizer: Any, ids: list[int], lp: torch.Tensor, k: int) -> list[TokenLogprob]:
    out, offset = [], 0
    chosen = lp[:-1].gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1).tolist() if len(ids) > 1 else []
    for i, tid in enumerate(ids):
        text = token_text(tokenizer, tid)
        logprob = None if i == 0 else chosen[i - 1]
        top = () if i == 0 else top_logprobs(tokenizer, lp[i - 1], k)
        out.append(TokenLogprob(text, tid, logprob, top, offset, token_bytes(tokenizer, tid)))
        offset += len(text)
    return out


def find_stop(text: str, stops: tuple[str, ...], start: int) -> int | None:
    hits = [p for s in stops if (p := text.find(s, max(0, start))) != -1]
    return min(hits) if hits else None


def sample(logits: torch.Tensor, params: GenerationParams, gen: torch.Generator) -> torch.Tensor:
    if params.temperature <= 0:
        return torch.argmax(logits, dim=-1)
    # shifted so the largest logit is 0 before dividing: a tiny temperature sends the others to -inf (probability
    # 0), never to +inf; floored at the dtype's smallest normal number, as a float32 0 would make 0/0 = NaN
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    probs = torch.softmax(shifted / max(params.temperature, torch.finfo(logits.dtype).tiny), dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        drop = (torch.cumsum(sorted_p, dim=-1) - sorted_p) >= params.top_p  # keep the smallest nucleus
        drop[..., 0] = False  # and always the most likely token (a top_p that rounds to 0 would drop them all)
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)
