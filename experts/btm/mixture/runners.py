"""Ways to run k causal LMs on the same input ids, each with its own KV cache.

Every runner is called as `runner(input_ids[B, T], state, use_cache) -> (logits[k, B, T, V], state)`;
`state` is whatever the runner needs to continue (None on the first call).

- `LoopRunner`: a Python loop over the experts, each a normal HF forward with its own cache. Works
  for any model with the HF interface (the naive baseline, and the fallback).
- `StackedGPT2Runner`: "one batched model". The experts' GPT-2 weights are stacked along a leading
  expert axis and every layer runs once for all experts (batched matmuls, one SDPA call over
  experts x batch), with one stacked KV cache per layer. GPT-2 architectures only (experts.hf.engine.gpt2).
- `VmapRunner`: `torch.func.stack_module_state` + `functional_call` + `vmap` over the HF module,
  the cache passed in and out as stacked tensors (a DynamicCache is rebuilt inside each call).
  Kept for measurement: on the 2-core CPU it is slower than the loop (see bench/ensemble.py).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from experts.hf.engine.gpt2 import StackedGPT2Runner, stacked_unsupported
from experts.hf.engine.kv import HFAdapter
from experts.hf.generation import cache_arg

BACKENDS = ("auto", "stacked", "loop", "vmap")


def _cache_arg(model: Any) -> str:
    return cache_arg(type(model))


class LoopRunner:
    """Naive: one HF forward per expert, per-expert cache objects."""

    name = "loop"
    pads = True  # rows of different lengths (left padding) share a batch

    def __init__(self, models: list[Any]) -> None:
        self.models = models
        self._args = [_cache_arg(m) for m in models]
        self._hf = [HFAdapter(m) for m in models]

    def __call__(self, input_ids: torch.Tensor, state: list[Any] | None, use_cache: bool,
                 mask: torch.Tensor | None = None, positions: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, list[Any] | None]:
        logits, caches = [], []
        for j, (m, arg) in enumerate(zip(self.models, self._args)):
            kwargs: dict[str, Any] = {arg: state[j]} if state is not None else {}
            if mask is not None:
                kwargs["attention_mask"] = mask
            if positions is not None:
                kwargs["position_ids"] = positions
            out = m(input_ids=input_ids, use_cache=use_cache, **kwargs)
            logits.append(out.logits)
            caches.append(getattr(out, arg, None))
        return torch.stack(logits), (caches if use_cache else None)

    # the engine's row and column operations on the per-expert caches
    def select(self, state: list[Any], rows: torch.Tensor) -> list[Any]:
        return [a.select(c, rows) for a, c in zip(self._hf, state, strict=True)]

    def join(self, a: list[Any], pad_a: int, b: list[Any], pad_b: int) -> list[Any]:
        return [h.join(x, pad_a, y, pad_b) for h, x, y in zip(self._hf, a, b, strict=True)]

    def place(self, state: list[Any], slots: torch.Tensor, new: list[Any], pad: int) -> list[Any]:
        return [h.place(x, slots, y, pad) for h, x, y in zip(self._hf, state, new, strict=True)]

    def trim_left(self, state: list[Any], n: int) -> list[Any]:
        return [a.trim_left(c, n) for a, c in zip(self._hf, state, strict=True)]


# ---------------------------------------------------------------------------------------------
# torch.func vmap over the HF module


class VmapRunner:
    """`stack_module_state` + `functional_call` + `vmap` over an HF causal LM.

    The HF cache object cannot cross a vmap boundary, so the state is a pair of stacked tensors
    [k, layers, B, heads, T, head_dim] from which a DynamicCache is rebuilt inside every call."""

    name = "vmap"
    pads = False

    def select(self, state: tuple[torch.Tensor, torch.Tensor], rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return state[0].index_select(2, rows), state[1].index_select(2, rows)

    def __init__(self, models: list[Any]) -> None:
        from torch.func import stack_module_state

        with torch.no_grad():
            self.params, self.buffers = stack_module_state(models)
        self.params = {n: p.detach() for n, p in self.params.items()}
        # stack_module_state lists tied parameters once; functional_call on a meta copy does not re-tie them
        names = dict(models[0].named_parameters(remove_duplicate=False))
        for n, p in names.items():
            if n not in self.params:
                src = next(o for o, q in models[0].named_parameters() if q is p)
                self.params[n] = self.params[src]
        self.base = copy.deepcopy(models[0]).to("meta")
        if hasattr(self.base.config, "_attn_implementation"):  # SDPA has no vmap batching rule on CPU
            self.base.config._attn_implementation = "eager"
        self.arg = _cache_arg(models[0])
        self.n_layer = len(models[0].transformer.h) if hasattr(models[0], "transformer") else None

    def tensors(self) -> list[torch.Tensor]:
        return list({id(t): t for t in [*self.params.values(), *self.buffers.values()]}.values())

    def _one(self, params, buffers, ids, pk, pv, use_cache: bool):
        from torch.func import functional_call
        from transformers import DynamicCache

        kwargs: dict[str, Any] = {"use_cache": use_cache}
        if pk is not None:
            cache = DynamicCache()
            for layer in range(pk.shape[0]):
                cache.update(pk[layer], pv[layer], layer)
            kwargs[self.arg] = cache
        out = functional_call(self.base, (params, buffers), (ids,), kwargs)
        if not use_cache:
            return out.logits
        layers = getattr(out, self.arg).layers
        keys, values = torch.stack([la.keys for la in layers]), torch.stack([la.values for la in layers])
        return out.logits, keys, values

    def __call__(self, input_ids: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None,
                 use_cache: bool) -> tuple[torch.Tensor, Any]:
        from torch.func import vmap

        pk, pv = state if state is not None else (None, None)
        dims = (0, 0, None, 0 if pk is not None else None, 0 if pv is not None else None)
        fn = vmap(lambda p, b, i, k_, v_: self._one(p, b, i, k_, v_, use_cache), in_dims=dims)
        if not use_cache:
            return fn(self.params, self.buffers, input_ids, pk, pv), None
        logits, ks, vs = fn(self.params, self.buffers, input_ids, pk, pv)
        return logits, (ks, vs)


def make_runner(models: list[Any], backend: str = "auto") -> Any:
    """'auto' picks the stacked GPT-2 runner when it applies (fastest measured), else the loop."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use one of {BACKENDS}")
    if backend == "auto":
        backend = "stacked" if len(models) > 1 and stacked_unsupported(models) is None else "loop"
    return {"stacked": StackedGPT2Runner, "loop": LoopRunner, "vmap": VmapRunner}[backend](models)
