"""Fresh GPT-2 models and atomic model directories: the I/O around training.

`new_gpt2` builds a seeded GPT-2, and `save_model_atomic` writes a model directory so readers never see a
half-written one. Token streams come from :func:`experts.data.tokens.tokenize_text`.
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

__all__ = ["new_gpt2", "save_model_atomic"]


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
