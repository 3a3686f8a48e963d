"""Batch KV-cache operations: the rows of a batch share one column layout.

Rows are aligned on the right: every row's newest token is in the last column, and a row that
is shorter than the batch has padding columns on its left (attention mask 0, never attended to;
positions are per row, so padding changes nothing a row computes). Joining two batches pads the
shorter one on the left; rows leave by selection; columns that are padding in every row are
trimmed. A model can bring its own cache type by offering `engine_adapter()` (the BTM forest does).
"""

from __future__ import annotations

import inspect
from typing import Any, Protocol

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from experts.hf.generation import cache_arg


class BatchAdapter(Protocol):
    """How the engine runs one model and handles its cache."""

    paddable: bool  # rows of different lengths can share a batch (the model takes position_ids)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor | None, cache: Any,
                last_only: bool) -> tuple[torch.Tensor, Any]:
        """Logits [B, T, V] (at least the last position) and the new cache. `mask` [B, past + T] and
        `positions` [B, T] are None when no row is padded."""

    def select(self, cache: Any, rows: torch.Tensor) -> Any: ...

    def pad_left(self, cache: Any, n: int) -> Any: ...

    def concat(self, a: Any, b: Any) -> Any: ...

    def trim_left(self, cache: Any, n: int) -> Any: ...


class HFAdapter:
    """Any transformers causal LM whose cache is a DynamicCache of plain layers."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.arg = cache_arg(type(model))
        params = inspect.signature(type(model).forward).parameters
        self.paddable = "position_ids" in params and "attention_mask" in params
        self.keep_arg = "logits_to_keep" if "logits_to_keep" in params else None

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor | None, cache: Any,
                last_only: bool) -> tuple[torch.Tensor, Any]:
        kwargs: dict[str, Any] = {"use_cache": True}
        if cache is not None:
            kwargs[self.arg] = cache
        if mask is not None and self.paddable:
            kwargs["attention_mask"] = mask
            kwargs["position_ids"] = positions
        if last_only and self.keep_arg is not None:
            kwargs[self.keep_arg] = 1
        out = self.model(input_ids=ids, **kwargs)
        return out.logits, getattr(out, self.arg)

    @staticmethod
    def _layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
        layers = getattr(cache, "layers", None)
        if layers is None or not all(type(layer) is DynamicLayer for layer in layers):
            raise TypeError(f"the engine cannot batch a {type(cache).__name__} of non-plain layers")
        return [(layer.keys, layer.values) for layer in layers]

    @staticmethod
    def _build(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
        return DynamicCache(ddp_cache_data=layers)

    def select(self, cache: Any, rows: torch.Tensor) -> Any:
        return self._build([(k.index_select(0, rows), v.index_select(0, rows)) for k, v in self._layers(cache)])

    def pad_left(self, cache: Any, n: int) -> Any:
        if n <= 0:
            return cache
        return self._build([(_pad(k, n), _pad(v, n)) for k, v in self._layers(cache)])

    def concat(self, a: Any, b: Any) -> Any:
        return self._build([(torch.cat([ka, kb]), torch.cat([va, vb]))
                            for (ka, va), (kb, vb) in zip(self._layers(a), self._layers(b), strict=True)])

    def trim_left(self, cache: Any, n: int) -> Any:
        if n <= 0:
            return cache
        return self._build([(k[:, :, n:].contiguous(), v[:, :, n:].contiguous()) for k, v in self._layers(cache)])


def _pad(t: torch.Tensor, n: int) -> torch.Tensor:
    """Zeros on the left of the sequence axis (dim 2 of [batch, heads, seq, head_dim])."""
    return torch.cat([t.new_zeros(t.shape[0], t.shape[1], n, *t.shape[3:]), t], dim=2)


def adapter_for(model: Any) -> BatchAdapter:
    own = getattr(model, "engine_adapter", None)
    return own() if callable(own) else HFAdapter(model)
