"""Task datasets made from the local corpora, and the masked loss used to score them.

A *task* turns one built-in corpus split into examples: ``{"prompt", "completion"}`` pairs (only the
completion's tokens are scored) or ``{"text"}`` documents (every token but the first is scored).
Everything is deterministic: the examples are cut from the corpus split in text order, then shuffled
by a ``random.Random`` seeded with ``"<task>:<split>"``; train / validation / test come from the
corpus' own splits, so they never share a document.

``TASKS[name].pool`` says whether the demo LoRA pool (:mod:`experts.evo.pool`) trains on the task;
``HELD_OUT`` lists the others: target tasks that no pool adapter has seen (for the Evo-Merging
reproduction). ``lm-<domain>`` tasks are plain-text slices of a domain.

The second half of the module encodes examples for a model (prompt and completion tokenized
separately, so the boundary is exact), packs them into right-padded batches with precomputed label
positions, and computes the mean token cross-entropy over the scored tokens (:func:`mean_loss`).
Right padding never changes a causal LM's outputs at the real positions, so no attention mask is
passed; the vocabulary projection is applied only at the scored positions when the model allows it.
"""

from __future__ import annotations

import random
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from experts.errors import InvalidExpertError

__all__ = [
    "HELD_OUT",
    "POOL_TASKS",
    "TASKS",
    "Batch",
    "Encoded",
    "Task",
    "encode_examples",
    "load_task",
    "make_batches",
    "masked_ce_sum",
    "mean_loss",
    "task_names",
    "validate_examples",
]

SPLITS = ("train", "validation", "test")


# ------------------------------------------------------------------------------------------------
# builders: corpus split text -> examples in text order


def _words(s: str) -> list[str]:
    return s.split()


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def _code_functions(text: str) -> Iterable[tuple[list[str], int]]:
    """(lines, index of a `def` line) for every function header with a body below it."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if re.match(r"^\s*(async\s+)?def \w+\(.*\):\s*$", line):
            yield lines, i


def _body(lines: list[str], i: int, limit: int = 40) -> list[str]:
    """The non-blank lines of the function whose header is lines[i] (deeper indented), up to `limit`."""
    indent = len(lines[i]) - len(lines[i].lstrip())
    out = []
    for line in lines[i + 1 : i + 1 + 4 * limit]:
        if not line.strip():
            continue
        if len(line) - len(line.lstrip()) <= indent:
            break
        out.append(line)
        if len(out) >= limit:
            break
    return out


def _code_continue(text: str) -> list[dict[str, str]]:
    """Continue a Python function: the def line and its first 2 lines -> the next 3 lines."""
    out = []
    for lines, i in _code_functions(text):
        body = _body(lines, i, limit=5)
        if len(body) >= 5:
            prompt = "\n".join([lines[i], *body[:2]]) + "\n"
            out.append({"prompt": prompt, "completion": "\n".join(body[2:5])})
    return out


def _code_return(text: str) -> list[dict[str, str]]:
    """Write the return statement: the def line and the lines before the first `return` -> that line."""
    out = []
    for lines, i in _code_functions(text):
        body = _body(lines, i, limit=8)
        k = next((j for j, b in enumerate(body) if b.lstrip().startswith("return ")), None)
        if k is not None and 1 <= k <= 6:
            out.append({"prompt": "\n".join([lines[i], *body[:k]]) + "\n", "completion": body[k]})
    return out


_DICT_LINE = re.compile(r"^(?P<word>[^()\n]{1,60}?) \((?P<pos>[^)\n]{0,20})\) (?P<defn>.+)$")


def _dictionary_define(text: str) -> list[dict[str, str]]:
    """Define a word in dictionary style: "word (pos)" -> " definition" (at most 40 words)."""
    out = []
    for line in text.split("\n"):
        m = _DICT_LINE.match(line.strip())
        if m and len(_words(m["defn"])) >= 3:
            defn = " ".join(_words(m["defn"])[:40])
            out.append({"prompt": f"{m['word']} ({m['pos']})", "completion": " " + defn})
    return out


def _dictionary_word(text: str) -> list[dict[str, str]]:
    """Name the word (reverse dictionary): "definition\\nWord:" -> " word"."""
    out = []
    for line in text.split("\n"):
        m = _DICT_LINE.match(line.strip())
        if m and 4 <= len(_words(m["defn"])) <= 40 and len(_words(m["word"])) == 1:
            out.append({"prompt": f"{m['defn'].strip()}\nWord:", "completion": f" {m['word']}"})
    return out


def _legal_continue(text: str) -> list[dict[str, str]]:
    """Continue a licence clause: 20 words of a paragraph -> the next 16 (windows every 60 words)."""
    out = []
    for para in _paragraphs(text):
        w = _words(para)
        for start in range(0, len(w) - 36 + 1, 60):
            prompt, completion = " ".join(w[start : start + 20]), " ".join(w[start + 20 : start + 36])
            out.append({"prompt": prompt, "completion": " " + completion})
    return out


def _verses(text: str) -> list[list[str]]:
    """Chapters of verses (the "Book N" heading dropped)."""
    chapters = []
    for para in _paragraphs(text):
        lines = [ln.strip() for ln in para.split("\n") if ln.strip()]
        if len(lines) >= 2:
            chapters.append(lines[1:])
    return chapters


def _verse_continue(text: str) -> list[dict[str, str]]:
    """Continue a verse: its first half (in words) -> the second half."""
    out = []
    for chapter in _verses(text):
        for verse in chapter:
            w = _words(verse)
            if len(w) >= 8:
                h = len(w) // 2
                out.append({"prompt": " ".join(w[:h]), "completion": " " + " ".join(w[h:])})
    return out


def _verse_next(text: str) -> list[dict[str, str]]:
    """The next verse: a verse and a line break -> the following verse of the chapter."""
    out = []
    for chapter in _verses(text):
        for a, b in zip(chapter, chapter[1:]):
            if len(_words(b)) <= 60:
                out.append({"prompt": a + "\n", "completion": b})
    return out


def _jargon_define(text: str) -> list[dict[str, str]]:
    """Define a hacker term: "term:" -> " definition" (at most 40 words)."""
    out = []
    for para in _paragraphs(text):
        m = re.match(r"^(?P<term>[^:\n]{1,60}):\s+(?P<defn>.+)", para, re.S)
        if m and len(_words(m["defn"])) >= 3:
            out.append({"prompt": f"{m['term']}:", "completion": " " + " ".join(_words(m["defn"])[:40])})
    return out


_IDENT = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*$")


def _docstring_summary(text: str) -> list[dict[str, str]]:
    """Summarise an API: a qualified name line -> the first line of its docstring."""
    out = []
    for para in _paragraphs(text):
        lines = para.split("\n")
        if len(lines) >= 2 and _IDENT.match(lines[0].strip()) and len(_words(lines[1])) >= 3:
            out.append({"prompt": lines[0].strip() + "\n", "completion": lines[1].strip()})
    return out


def _lm_slices(text: str, chars: int = 600) -> list[dict[str, str]]:
    """Plain-text pieces of about `chars` characters, cut at line breaks."""
    out, start, n = [], 0, len(text)
    while start < n:
        end = min(n, start + chars)
        if end < n:
            nl = text.rfind("\n", start + chars // 2, end)
            end = nl + 1 if nl > start else end
        piece = text[start:end].strip()
        if len(piece) >= 40:
            out.append({"text": piece})
        start = end
    return out


@dataclass(frozen=True)
class Task:
    name: str
    domain: str  # the corpus it is cut from
    description: str
    build: Callable[[str], list[dict[str, str]]]
    pool: bool  # the demo LoRA pool trains on it (False: held out for target tasks)

    @property
    def kind(self) -> str:
        return "text" if self.name.startswith("lm-") else "pairs"


_TASK_LIST = [
    Task("code_continue", "code", "continue a Python function", _code_continue, True),
    Task("docstring_summary", "python_docs", "summarise an API from its qualified name", _docstring_summary,
         True),
    Task("dictionary_define", "dictionary", "define a word in dictionary style", _dictionary_define, True),
    Task("legal_continue", "legal", "continue a licence clause", _legal_continue, True),
    Task("verse_continue", "scripture", "continue a verse", _verse_continue, True),
    Task("code_return", "code", "write a function's return statement", _code_return, False),
    Task("dictionary_word", "dictionary", "name the word for a definition", _dictionary_word, False),
    Task("verse_next", "scripture", "write the next verse", _verse_next, False),
    Task("jargon_define", "jargon", "define a hacker-slang term", _jargon_define, False),
]
for _d in ("code", "python_docs", "legal", "scripture", "dictionary", "jargon"):
    _TASK_LIST.append(Task(f"lm-{_d}", _d, f"plain text from the {_d} corpus", _lm_slices, False))

TASKS: dict[str, Task] = {t.name: t for t in _TASK_LIST}
POOL_TASKS = [t.name for t in _TASK_LIST if t.pool]
HELD_OUT = [t.name for t in _TASK_LIST if not t.pool and t.kind == "pairs"]


def task_names() -> list[str]:
    return list(TASKS)


_cache: dict[tuple[str, str, str], list[dict[str, str]]] = {}
_cache_lock = threading.Lock()


def load_task(btm: Any, name: str, split: str = "validation",
              max_examples: int | None = None) -> list[dict[str, str]]:
    """The examples of task `name` on a corpus split (deterministic order), at most `max_examples`.

    Args:
        btm: an :class:`experts.btm.operations.BTM` (gives the corpora root and builds missing corpora).
        name: a key of :data:`TASKS`.
        split: "train", "validation" or "test".
    """
    from experts.data.corpora import load_split

    task = TASKS.get(name)
    if task is None:
        raise InvalidExpertError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    if split not in SPLITS:
        raise InvalidExpertError(f"split must be one of {list(SPLITS)}, got {split!r}")
    key = (str(btm.corpora_root), name, split)
    with _cache_lock:
        cached = _cache.get(key)
    if cached is None:
        btm.ensure_corpus(task.domain)
        examples = task.build(load_split(btm.corpora_root, task.domain, split))
        random.Random(f"{name}:{split}").shuffle(examples)
        if not examples:
            raise InvalidExpertError(f"task {name!r} has no examples in the {split} split of {task.domain!r}")
        with _cache_lock:
            cached = _cache.setdefault(key, examples)
    out = cached if max_examples is None else cached[:max_examples]
    return [dict(e) for e in out]


# ------------------------------------------------------------------------------------------------
# encoding and the masked loss


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


def mean_loss(model: Any, batches: Sequence[Batch], *, fast: bool = True) -> float:
    """Mean token cross-entropy (nats) over all scored tokens of `batches`; no gradients."""
    total = torch.zeros((), dtype=torch.float64)
    n = 0
    with torch.inference_mode():
        for b in batches:
            total += masked_ce_sum(model, b, fast=fast).cpu()
            n += b.n_targets
    return float(total.item() / max(n, 1))
