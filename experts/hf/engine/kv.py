"""Batch KV-cache operations: the rows of a batch share one column layout.

Rows are aligned on the right: every row's newest token is in the last column, and a row that
is shorter than the batch has padding columns on its left (attention mask 0, never attended to;
positions are per row, so padding changes nothing a row computes). Joining two batches pads the
shorter one on the left; rows leave by selection; columns that are padding in every row are
trimmed. A model can bring its own cache type by offering `engine_adapter()` (the BTM forest does).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from experts.hf.engine.columns import ROOM, joined, place_rows
from experts.hf.engine.gpt2 import PROJECTIONS, StackedGPT2Runner, StackedKV, stacked_unsupported
from experts.hf.generation import cache_arg
from experts.hf.multilora import MultiLora


class BatchAdapter(Protocol):
    """How the engine runs one model and handles its cache."""

    paddable: bool  # rows of different lengths can share a batch (the model takes position_ids)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor | None, cache: Any,
                last_only: bool, rows: Sequence[Any] | None = None) -> tuple[torch.Tensor, Any]:
        """Logits [B, T, V] (at least the last position) and the new cache. `mask` [B, past + T] and
        `positions` [B, T] are None when no row is padded; `rows[b]` is row b's LoRA adapter (or None)."""

    def select(self, cache: Any, rows: torch.Tensor) -> Any: ...

    def join(self, a: Any, pad_a: int, b: Any, pad_b: int) -> Any:
        """Rows of `a` then rows of `b`, `a` with `pad_a` padding columns on its left and `b` with `pad_b`
        (the two widths then agree): one copy of each, into a cache with room to grow."""

    def place(self, cache: Any, slots: torch.Tensor, new: Any, pad: int) -> Any:
        """`new`'s rows written over rows `slots` of `cache` (rows that left), right-aligned after `pad` zero
        columns: no other row is copied."""


    def trim_left(self, cache: Any, n: int) -> Any: ...

    def release(self) -> None:
        """Drop what is kept between steps outside the cache (the model has nothing to do)."""


class GrowingLayer(DynamicLayer):
    """A DynamicLayer that appends in place: K and V live in buffers with room to grow (doubling), so a
    decode step writes one column instead of copying the whole cache as `torch.cat` does."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.length = 0
        self._k = key_states.new_empty(*key_states.shape[:2], 0, key_states.shape[3])
        self._v = value_states.new_empty(*value_states.shape[:2], 0, value_states.shape[3])
        self.keys, self.values = self._k, self._v
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        t = key_states.shape[2]
        end = self.length + t
        if end > self._k.shape[2]:
            self._grow(max(end, 2 * self._k.shape[2], 16))
        self._k[:, :, self.length:end] = key_states
        self._v[:, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
        return self.keys, self.values

    def _grow(self, capacity: int) -> None:
        k = self._k.new_empty(*self._k.shape[:2], capacity, self._k.shape[3])
        v = self._v.new_empty(*self._v.shape[:2], capacity, self._v.shape[3])
        k[:, :, :self.length] = self._k[:, :, :self.length]
        v[:, :, :self.length] = self._v[:, :, :self.length]
        self._k, self._v = k, v

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def replace(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """New contents (rows selected or trimmed), with room for a few more columns."""
        b, h, n, d = keys.shape
        k, v = keys.new_empty(b, h, n + ROOM, d), values.new_empty(b, h, n + ROOM, d)
        k[:, :, :n] = keys
        v[:, :, :n] = values
        self.adopt(k, v, n)

    def adopt(self, k: torch.Tensor, v: torch.Tensor, n: int) -> None:
        """Buffers filled elsewhere, valid up to column `n`."""
        self._k, self._v, self.length = k, v, n
        self.keys, self.values = k[:, :, :n], v[:, :, :n]
        self.is_initialized = True

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep rows `rows`: one copy, of the spare columns too when there are few of them."""
        if self._k.shape[2] - self.length <= ROOM:
            self.adopt(self._k.index_select(0, rows), self._v.index_select(0, rows), self.length)
        else:
            self.replace(self.keys.index_select(0, rows), self.values.index_select(0, rows))


class HFAdapter:
    """Any transformers causal LM whose cache is made of full-attention layers (a DynamicCache): the engine
    gives it a cache of `GrowingLayer`s and changes that cache in place."""

    def __init__(self, model: Any, *, kernel: bool = False) -> None:
        self.model = model
        self.arg = cache_arg(type(model))
        params = inspect.signature(type(model).forward).parameters
        self.paddable = "position_ids" in params and "attention_mask" in params
        self.keep_arg = "logits_to_keep" if "logits_to_keep" in params else None
        self.growing = _plain_layers(model)
        # a plain GPT-2 runs on the engine's own kernel (its weights shared), LoRA rows included when their
        # adapters change only the kernel's projections; otherwise a batch moves to the module's forward
        self.kernel = StackedGPT2Runner([model]) if kernel and self.growing and not stacked_unsupported([model]) \
            else None
        n_layer = self.kernel.n_layer if self.kernel is not None else 0
        self.kernel_paths = {_module_path(i, p) for i in range(n_layer) for p in PROJECTIONS}

    def release(self) -> None:
        MultiLora.release(self.model)  # the LoRA rows' stacks of its last batch

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor | None, cache: Any,
                last_only: bool, rows: Sequence[Any] | None = None) -> tuple[torch.Tensor, Any]:
        if self.kernel is not None and (cache is None or isinstance(cache, StackedKV)):
            if rows is None:
                logits, state = self.kernel(ids, cache, True, mask=mask, positions=positions, last_only=last_only)
                return logits[0], state
            ml = MultiLora.of(self.model)
            with ml.applied(rows):
                if ml.bound_paths() <= self.kernel_paths:  # every adapted module is one of the kernel's projections
                    b, t = ids.shape

                    def lora(layer: int, name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                        return ml.delta(_module_path(layer, name), x.view(b, t, -1), y.view(b, t, -1)).view(y.shape)

                    logits, state = self.kernel(ids, cache, True, mask=mask, positions=positions,
                                                last_only=last_only, lora=lora)
                    return logits[0], state
        cache = self._dynamic(cache)
        kwargs: dict[str, Any] = {"use_cache": True}
        if cache is None and self.growing:
            cache = DynamicCache.__new__(DynamicCache)
            Cache.__init__(cache, layer_class_to_replicate=GrowingLayer)
        if cache is not None:
            kwargs[self.arg] = cache
        if mask is not None and self.paddable:
            kwargs["attention_mask"] = mask
            kwargs["position_ids"] = positions
        if last_only and self.keep_arg is not None:
            kwargs[self.keep_arg] = 1
        if rows is None:
            out = self.model(input_ids=ids, **kwargs)
        else:
            with MultiLora.of(self.model).applied(rows):
                out = self.model(input_ids=ids, **kwargs)
        return out.logits, getattr(out, self.arg)

    @staticmethod
    def _dynamic(cache: Any) -> Any:
        """The kernel's state as a DynamicCache of GrowingLayers over the same buffers (no copy)."""
        if not isinstance(cache, StackedKV):
            return cache
        out = DynamicCache.__new__(DynamicCache)
        Cache.__init__(out, layer_class_to_replicate=GrowingLayer)
        for k, v in cache.layers:
            layer = GrowingLayer()
            layer.dtype, layer.device = k.dtype, k.device
            layer.adopt(k, v, cache.length)
            out.layers.append(layer)
        return out

    @staticmethod
    def _layers(cache: Any) -> list[Any]:
        layers = getattr(cache, "layers", None)
        if layers is None or not all(type(layer) in (DynamicLayer, GrowingLayer) for layer in layers):
            raise TypeError(f"the engine cannot batch a {type(cache).__name__} of non-plain layers")
        return layers

    def _apply(self, cache: Any, fn: Any) -> Any:
        for layer in self._layers(cache):
            keys, values = fn(layer.keys), fn(layer.values)
            if isinstance(layer, GrowingLayer):
                layer.replace(keys, values)
            else:
                layer.keys, layer.values = keys, values
        return cache

    def select(self, cache: Any, rows: torch.Tensor) -> Any:
        if isinstance(cache, StackedKV):
            assert self.kernel is not None
            return self.kernel.select(cache, rows)
        for layer in self._layers(cache):
            if isinstance(layer, GrowingLayer):
                layer.select_rows(rows)
            else:
                layer.keys, layer.values = layer.keys.index_select(0, rows), layer.values.index_select(0, rows)
        return cache

    def join(self, a: Any, pad_a: int, b: Any, pad_b: int) -> Any:
        if isinstance(a, StackedKV) and isinstance(b, StackedKV):
            assert self.kernel is not None
            return self.kernel.join(a, pad_a, b, pad_b)
        a, b = self._dynamic(a), self._dynamic(b)
        for la, lb in zip(self._layers(a), self._layers(b), strict=True):
            room = ROOM if isinstance(la, GrowingLayer) else 0
            k = joined([(la.keys, pad_a), (lb.keys, pad_b)], 0, 2, room)
            v = joined([(la.values, pad_a), (lb.values, pad_b)], 0, 2, room)
            n = k.shape[2] - room
            if isinstance(la, GrowingLayer):
                la.adopt(k, v, n)
            else:
                la.keys, la.values = k, v
        return a

    def place(self, cache: Any, slots: torch.Tensor, new: Any, pad: int) -> Any:
        if isinstance(cache, StackedKV) and isinstance(new, StackedKV):
            assert self.kernel is not None
            return self.kernel.place(cache, slots, new, pad)
        cache, new = self._dynamic(cache), self._dynamic(new)
        for la, lb in zip(self._layers(cache), self._layers(new), strict=True):
            place_rows(la.keys, slots, lb.keys, pad, 0, 2)
            place_rows(la.values, slots, lb.values, pad, 0, 2)
        return cache

    def trim_left(self, cache: Any, n: int) -> Any:
        if n > 0 and isinstance(cache, StackedKV):
            assert self.kernel is not None
            return self.kernel.trim_left(cache, n)
        return cache if n <= 0 else self._apply(cache, lambda t: t[:, :, n:])


def _module_path(layer: int, projection: str) -> str:
    """A GPT-2 projection's module path (one of gpt2.PROJECTIONS in block `layer`), as LoRA adapters name it."""
    return f"transformer.h.{layer}.{projection}"


def _plain_layers(model: Any) -> bool:
    """The model's own cache would be DynamicLayers only (full attention everywhere): GrowingLayer fits."""
    try:
        probe = DynamicCache(config=model.config)
    except Exception:
        return False
    return all(type(layer) is DynamicLayer for layer in probe.layers)


def adapter_for(model: Any, *, kernel: bool = True) -> BatchAdapter:
    """The model's own adapter (a forest's), or an HFAdapter (`kernel`: plain GPT-2s on the engine's kernel)."""
    own = getattr(model, "engine_adapter", None)
    return own() if callable(own) else HFAdapter(model, kernel=kernel)
