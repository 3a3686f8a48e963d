"""Token streams, fresh GPT-2 models and atomic model directories: the I/O around training.

`tokenize_text` turns large texts into a token stream quickly, `new_gpt2` builds a seeded GPT-2, and
`save_model_atomic` writes a model directory so readers never see a half-written one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from experts.repository.store import fsync_dir as _fsync_dir

if TYPE_CHECKING:  # pragma: no cover
    from transformers import GPT2LMHeadModel, PreTrainedModel

__all__ = ["new_gpt2", "save_model_atomic", "tokenize_text"]


def _chunk_bounds(text: str, chunk_chars: int) -> list[tuple[int, int]]:
    """Cut `text` into pieces of at most about `chunk_chars` characters at boundaries that do not change a
    GPT-2-style byte-level pre-tokenisation: just before a single space that sits between two non-space
    characters (" word" stays one pre-token). Falls back to a line break, then to a hard cut."""
    n = len(text)
    bounds = []
    start = 0
    while n - start > chunk_chars:
        hi = start + chunk_chars
        lo = start + chunk_chars // 2
        cut = -1
        pos = hi
        while True:
            pos = text.rfind(" ", lo, pos)
            if pos <= lo:
                break
            if not text[pos - 1].isspace() and pos + 1 < n and not text[pos + 1].isspace():
                cut = pos
                break
        if cut < 0:
            nl = text.rfind("\n", lo, hi)
            cut = nl + 1 if nl > lo else hi
        bounds.append((start, cut))
        start = cut
    if start < n:
        bounds.append((start, n))
    return bounds


def tokenize_text(tokenizer: Any, text: str, *, chunk_chars: int = 20_000) -> torch.Tensor:
    """Encode `text` into a 1-D LongTensor of token ids, without special tokens.

    One huge string is slow to encode (5 MB take 7.5 s); the text is cut into pieces of about `chunk_chars`
    characters at word boundaries that keep a byte-level BPE's tokenisation identical to encoding the whole
    string, and encoded through the tokenizer's batch call. No end-of-text tokens are inserted: to separate
    documents, encode them separately and concatenate with `tokenizer.eos_token_id` between them. `tokenizer`
    is a transformers tokenizer or a raw `tokenizers.Tokenizer`.
    """
    if chunk_chars <= 0:
        raise ValueError("chunk_chars must be positive")
    if not text:
        return torch.zeros(0, dtype=torch.long)
    chunks = [text[a:b] for a, b in _chunk_bounds(text, chunk_chars)]
    if hasattr(tokenizer, "encode_batch") and not callable(getattr(tokenizer, "batch_encode_plus", None)):
        encoded = [e.ids for e in tokenizer.encode_batch(chunks, add_special_tokens=False)]
    else:
        encoded = tokenizer(chunks, add_special_tokens=False, verbose=False)["input_ids"]
    total = sum(len(e) for e in encoded)
    out = torch.empty(total, dtype=torch.long)
    pos = 0
    for e in encoded:
        out[pos : pos + len(e)] = torch.as_tensor(e, dtype=torch.long)
        pos += len(e)
    return out


def new_gpt2(
    vocab_size: int,
    *,
    n_layer: int = 4,
    n_embd: int = 256,
    n_head: int = 4,
    n_positions: int = 256,
    bos_token_id: int,
    eos_token_id: int,
    seed: int = 0,
    dropout: float = 0.0,
) -> GPT2LMHeadModel:
    """A freshly initialised GPT-2 (tied embeddings), deterministic for a given seed; the global RNG is left
    as it was. Dropout defaults to 0: every run here is token-starved (far less than one epoch), where dropout
    only slows learning."""
    from transformers import GPT2Config, GPT2LMHeadModel  # heavy: imported on first use

    if vocab_size <= 0:
        raise ValueError("vocab_size must be positive")
    for name, value in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id)):
        if not 0 <= value < vocab_size:
            raise ValueError(f"{name} {value} is outside the vocabulary (size {vocab_size})")
    if n_embd % n_head:
        raise ValueError(f"n_embd {n_embd} is not divisible by n_head {n_head}")
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    model.eval()
    return model


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(root)


def save_model_atomic(model: PreTrainedModel, tokenizer: Any, out_dir: Path) -> None:
    """Write `model` (safetensors, via `save_pretrained`) and `tokenizer` (if not None) to `out_dir` so that
    readers see either the previous complete directory or the new complete one.

    Everything is written into a hidden temporary directory next to `out_dir` (same file system) and fsynced;
    then an existing `out_dir` is renamed away, the new directory renamed in, and the old one deleted. If the
    swap fails the old directory is put back; the temporary directory never survives the call.
    """
    out_dir = Path(out_dir)
    parent = out_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=parent))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _fsync_tree(tmp)
        if out_dir.exists() or out_dir.is_symlink():
            old = parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:12]}"
            os.rename(out_dir, old)
            try:
                os.rename(tmp, out_dir)
            except BaseException:
                os.rename(old, out_dir)
                raise
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
        else:
            os.rename(tmp, out_dir)
        _fsync_dir(parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
