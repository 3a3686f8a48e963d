"""Scoring examples: encoding them for a model, packing them into batches, and the masked loss.

Prompt and completion are tokenized separately, so the boundary is exact; examples are packed into
right-padded batches with precomputed label positions, and :func:`mean_loss` is the mean token
cross-entropy over the scored tokens. Right padding never changes a causal LM's outputs at the real
positions, so no attention mask is passed; the vocabulary projection is applied only at the scored
positions when the model allows it. The examples themselves come from :mod:`experts.data.datasets`
(tasks) or from callers (inline examples).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from experts.errors import InvalidExpertError

__all__ = ["Batch", "Encoded", "encode_examples", "exact_match", "make_batches", "masked_ce_sum", "masked_ce_sums",
           "mean_loss",
           "validate_examples"]


def validate_examples(examples: Sequence[Mapping[str, Any]], *, max_examples: int = 100_000) -> None:
    """Each example is {"prompt", "completion"} (completion non-empty) or {"text"} (non-empty)."""
    if not examples:
        raise InvalidExpertError("no examples")
    if len(examples) > max_examples:
        raise InvalidExpertError(f"too many examples: {len(examples)} > {max_examples}")
    for i, e in enumerate(examples):
        if not isinstance(e, Mapping):
            raise InvalidExpertError(f"example {i} is not an object")
        has_text = e.get("text") is not None
        has_pair = e.get("prompt") is not None or e.get("completion") is not None
        if has_text == has_pair:
            raise InvalidExpertError(f"example {i}: give either 'text' or 'prompt' and 'completion'")
        if has_text and (not isinstance(e["text"], str) or not e["text"].strip()):
            raise InvalidExpertError(f"example {i}: 'text' must be a non-empty string")
        if has_pair:
            if not isinstance(e.get("prompt", ""), str) or not isinstance(e.get("completion"), str):
                raise InvalidExpertError(f"example {i}: 'prompt' and 'completion' must be strings")
            if not e["completion"]:
                raise InvalidExpertError(f"example {i}: 'completion' is empty")


@dataclass(frozen=True)
class Encoded:
    """Token ids of one example; positions >= `first_target` are scored (predicted from the prefix)."""

    ids: tuple[int, ...]
    first_target: int

    @property
    def n_targets(self) -> int:
        return len(self.ids) - self.first_target


def _encode(tokenizer: Any, s: str) -> list[int]:
    return list(tokenizer(s, add_special_tokens=False)["input_ids"]) if s else []


def encode_examples(
    tokenizer: Any, examples: Sequence[Mapping[str, Any]], *, max_tokens: int, append_eos: bool = False
) -> list[Encoded]:
    """Tokenize examples; a pair is prompt + completion tokenized separately (exact boundary).

    Truncation to `max_tokens`: a text keeps its first tokens; a pair drops prompt tokens from the
    left first (keeping at least one), then completion tokens from the right. An empty prompt is
    replaced by the EOS token, so the first completion token has a context. `append_eos` adds EOS
    after each completion (scored).
    """
    if max_tokens < 2:
        raise InvalidExpertError("max_tokens per example must be at least 2")
    validate_examples(examples)
    eos = tokenizer.eos_token_id
    out = []
    for i, e in enumerate(examples):
        if e.get("text") is not None:
            ids = _encode(tokenizer, e["text"])[:max_tokens]
            if len(ids) < 2:
                raise InvalidExpertError(f"example {i}: the text has fewer than 2 tokens")
            out.append(Encoded(tuple(ids), 1))
            continue
        p = _encode(tokenizer, e.get("prompt") or "")
        c = _encode(tokenizer, e["completion"])
        if append_eos and eos is not None:
            c.append(eos)
        if not p:
            if eos is None:
                raise InvalidExpertError(f"example {i}: empty prompt and the tokenizer has no EOS token")
            p = [eos]
        if not c:
            raise InvalidExpertError(f"example {i}: the completion has no tokens")
        if len(p) + len(c) > max_tokens:
            c = c[: max_tokens - 1]
            p = p[-(max_tokens - len(c)) :]
        out.append(Encoded(tuple(p + c), len(p)))
    return out


@dataclass
class Batch:
    """Right-padded ids (B, T); `mask` (B, T-1) marks positions whose next token is scored."""

    ids: torch.Tensor
    mask: torch.Tensor
    targets: torch.Tensor  # (K,) the scored next tokens, in mask order
    n_targets: int
    attention_mask: torch.Tensor  # (B, T), for callers that want one (the loss does not need it)


def make_batches(encoded: Sequence[Encoded], *, batch_tokens: int = 4096, pad_id: int = 0) -> list[Batch]:
    """Pack examples (longest first) into batches of at most `batch_tokens` padded tokens.

    The order is a pure function of the examples, so a loss computed over the batches is too.
    """
    if not encoded:
        raise InvalidExpertError("no examples to batch")
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i].ids), i))
    groups: list[list[int]] = []
    for i in order:
        if groups and len(encoded[groups[-1][0]].ids) * (len(groups[-1]) + 1) <= batch_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    batches = []
    for g in groups:
        width = len(encoded[g[0]].ids)
        ids = torch.full((len(g), width), pad_id, dtype=torch.long)
        att = torch.zeros((len(g), width), dtype=torch.long)
        mask = torch.zeros((len(g), width - 1), dtype=torch.bool)
        for row, i in enumerate(g):
            e = encoded[i]
            ids[row, : len(e.ids)] = torch.tensor(e.ids, dtype=torch.long)
            att[row, : len(e.ids)] = 1
            mask[row, e.first_target - 1 : len(e.ids) - 1] = True
        targets = ids[:, 1:][mask]
        batches.append(Batch(ids, mask, targets, int(mask.sum()), att))
    return batches


def _unwrap(model: Any) -> Any:
    """The transformers model under a peft wrapper (peft injects its layers into it in place)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def _backbone_and_head(model: Any) -> tuple[Any, Any] | None:
    prefix = getattr(model, "base_model_prefix", None)
    backbone = getattr(model, prefix, None) if prefix else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    cfg = getattr(model, "config", None)
    # Heads that post-process the logits (soft-capping, logit scales) need the full forward.
    post = ("final_logit_softcapping", "logit_scale")
    special = any(getattr(cfg, k, None) not in (None, 1.0) for k in post)
    if backbone is None or head is None or special:
        return None
    return backbone, head


def masked_ce_sum(model: Any, batch: Batch, *, fast: bool = True) -> torch.Tensor:
    """Sum (float64) of the next-token cross-entropy at the batch's scored positions.

    `fast`: run the model's backbone and apply the output head only at the scored positions (the
    same numbers as the full logits up to float rounding); falls back to the full forward when the
    model's structure is not the usual backbone + head.
    """
    hf = _unwrap(model)
    parts = _backbone_and_head(hf) if fast else None
    if parts is not None:
        backbone, head = parts
        hidden = backbone(input_ids=batch.ids, use_cache=False).last_hidden_state  # (B, T, H)
        logits = head(hidden[:, :-1][batch.mask])  # (K, V)
    else:
        logits = model(input_ids=batch.ids, use_cache=False).logits[:, :-1][batch.mask]
    return F.cross_entropy(logits.float(), batch.targets, reduction="sum").double()


def masked_ce_sums(model: Any, batch: Batch, copies: int, *, fast: bool = True) -> torch.Tensor:
    """:func:`masked_ce_sum` of `copies` stacked copies of the batch, one sum (float64) per copy.

    The model runs once on ``batch.ids`` repeated `copies` times (copy k: rows [k*B, (k+1)*B)), so whatever
    the caller binds per copy (e.g. :meth:`experts.hf.multilora.MultiLora.segments`, one LoRA delta per
    copy) is scored in one forward pass. Each copy's loss is reduced exactly as :func:`masked_ce_sum` does
    (the head at the copy's scored positions, then one float32 sum).
    """
    hf = _unwrap(model)
    parts = _backbone_and_head(hf) if fast else None
    ids = batch.ids.repeat(copies, 1)
    rows = batch.ids.shape[0]
    out = torch.empty(copies, dtype=torch.float64)
    if parts is not None:
        backbone, head = parts
        hidden = backbone(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]  # (copies*B, T-1, H)
        for k in range(copies):
            logits = head(hidden[k * rows:(k + 1) * rows][batch.mask])
            out[k] = F.cross_entropy(logits.float(), batch.targets, reduction="sum").double()
        return out
    logits_all = model(input_ids=ids, use_cache=False).logits[:, :-1]
    for k in range(copies):
        logits = logits_all[k * rows:(k + 1) * rows][batch.mask]
        out[k] = F.cross_entropy(logits.float(), batch.targets, reduction="sum").double()
    return out


def mean_loss(model: Any, batches: Sequence[Batch], *, fast: bool = True) -> float:
    """Mean token cross-entropy (nats) over all scored tokens of `batches`; no gradients."""
    total = torch.zeros((), dtype=torch.float64)
    n = 0
    with torch.inference_mode():
        for b in batches:
            total += masked_ce_sum(model, b, fast=fast).cpu()
            n += b.n_targets
    return float(total.item() / max(n, 1))


def exact_match(model: Any, batches: Sequence[Batch]) -> tuple[float, float]:
    """(exact match, token accuracy) over the examples of `batches`, teacher-forced; no gradients.

    An example matches when every scored token is the model's argmax given the reference prefix, i.e.
    greedy decoding from the prompt reproduces the completion token for token (a completion that ends
    with a stop token, e.g. a newline, then also stops there). Padding rows never count.
    """
    hits = tokens = exact = examples = 0
    with torch.inference_mode():
        for b in batches:
            logits = model(input_ids=b.ids, use_cache=False).logits[:, :-1][b.mask]  # (K, V)
            hit = logits.argmax(-1) == b.targets
            rows = b.mask.nonzero()[:, 0]  # the example of each scored position (mask order)
            wrong = torch.zeros(b.ids.shape[0]).index_add_(0, rows, (~hit).float())
            hits, tokens = hits + int(hit.sum()), tokens + b.n_targets
            exact, examples = exact + int((wrong == 0).sum()), examples + b.ids.shape[0]
    return exact / max(examples, 1), hits / max(tokens, 1)
