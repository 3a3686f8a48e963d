"""Loading models from disk and keeping a bounded LRU of loaded ones.

`ModelCache` is thread-safe: generation threads, admin calls and jobs share it. Loading a model
happens outside the cache lock, under a per-key lock, so a slow load blocks only callers of that
same expert. Pinned entries are never evicted.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel (or a peft model)
    tokenizer: Any
    nbytes: int
    extra: dict[str, Any] = field(default_factory=dict)


def load_hf_model(model_dir: Path, *, dtype: str | None = None) -> LoadedModel:
    """Load any Hugging Face causal-LM directory (safetensors only), in eval mode, on the CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"local_files_only": True, "use_safetensors": True}
    if dtype is not None:
        kwargs["dtype"] = DTYPES[dtype]
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    model.eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    return LoadedModel(model, tokenizer, model_nbytes(model))


def model_nbytes(model: torch.nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


class ModelCache:
    """LRU of loaded models bounded by count and bytes; pinned entries stay resident."""

    def __init__(self, loader: Callable[[str], LoadedModel], *, max_models: int, max_bytes: int) -> None:
        self._loader = loader
        self.max_models = max_models
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, LoadedModel] = OrderedDict()
        self._pinned: set[str] = set()
        self._lock = threading.Lock()
        self._key_locks: dict[str, threading.Lock] = {}
        self.on_change: Callable[[], None] | None = None

    def get(self, key: str) -> LoadedModel:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    return entry
            entry = self._loader(key)
            with self._lock:
                self._entries[key] = entry
                self._evict_locked(keep=key)
        self._changed()
        return entry

    def _evict_locked(self, keep: str) -> None:
        def over() -> bool:
            return len(self._entries) > self.max_models or self.total_bytes_locked() > self.max_bytes

        for key in list(self._entries):
            if not over():
                break
            if key != keep and key not in self._pinned:
                del self._entries[key]

    def total_bytes_locked(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def is_loaded(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def is_pinned(self, key: str) -> bool:
        with self._lock:
            return key in self._pinned

    def pin(self, key: str, pinned: bool = True) -> None:
        with self._lock:
            (self._pinned.add if pinned else self._pinned.discard)(key)

    def unload(self, key: str) -> bool:
        with self._lock:
            removed = self._entries.pop(key, None) is not None
        if removed:
            self._changed()
        return removed

    def forget(self, key: str) -> None:
        """Drop an entry and its pin (the expert was deleted)."""
        with self._lock:
            self._entries.pop(key, None)
            self._pinned.discard(key)
            self._key_locks.pop(key, None)
        self._changed()

    def loaded(self) -> dict[str, int]:
        with self._lock:
            return {k: e.nbytes for k, e in self._entries.items()}

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()
