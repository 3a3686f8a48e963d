"""Many LoRA adapters on one resident base model (S-LoRA / Punica style).

An adapter is held as its factors per base module: A (r x d_in), B (d_out x r) and its scaling s
(dW = s B A). Nothing is merged into the base's weights: forward hooks on the base's target modules
add each row's own delta, y_b = W x_b + s_b B_b (A_b x_b), with two gathered batched matmuls over the
rows of the batch (a row without an adapter gets a zero delta). A batch can therefore mix rows of
different adapters, of request-time mixes and of the bare base. `AdapterCache` is the adapters' LRU,
bounded by bytes and separate from the models' cache.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from experts.errors import InvalidExpertError
from merging.lora import lora_modules, merge_lora

Factors = tuple[torch.Tensor, torch.Tensor, float]  # (A [r, d_in], B [d_out, r], scaling)


@dataclass(eq=False)
class LoraFactors:
    """One adapter (registered, or a mix made at request time) by base-module path."""

    key: str
    modules: dict[str, Factors]
    parts: tuple[str, ...] = ()  # the registered adapters it is made of (itself, or a mix's members)

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b, _ in self.modules.values())


def module_path(a_key: str) -> str:
    """"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight" -> "transformer.h.0.attn.c_attn"."""
    return a_key.split(".lora_A")[0].removeprefix("base_model.model.")


def _pattern_value(patterns: Mapping[str, Any], path: str, default: float) -> float:
    """peft's rank_pattern / alpha_pattern: the first key that matches the end of the module path."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?{pattern}$", path):
            return float(value)
    return default


def scaling_for(config: Mapping[str, Any], path: str, rank: int) -> float:
    """s = lora_alpha / r (or / sqrt(r) with rsLoRA), with peft's per-module alpha patterns."""
    alpha = _pattern_value(config.get("alpha_pattern") or {}, path, float(config.get("lora_alpha", rank)))
    return alpha / rank ** 0.5 if config.get("use_rslora") else alpha / rank


def read_adapter(key: str, adapter_dir: Path) -> LoraFactors:
    """Read a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors)."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    return factors_from(key, tensors, config, (key,))


def factors_from(key: str, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                 parts: tuple[str, ...]) -> LoraFactors:
    """An adapter's state dict and config as factors by base-module path."""
    modules: dict[str, Factors] = {}
    for a_key, b_key in lora_modules(tensors).values():
        if "lora_embedding" in a_key:
            raise InvalidExpertError("LoRA on embeddings cannot be served per row; merge it instead")
        path = module_path(a_key)
        a, b = tensors[a_key].float(), tensors[b_key].float()
        modules[path] = (a, b, scaling_for(config, path, a.shape[0]))
    if not modules:
        raise InvalidExpertError(f"adapter {key!r} has no LoRA factors")
    return LoraFactors(key, modules, parts)


def evo_factors(key: str, adapters: Sequence[LoraFactors], alpha: Sequence[float], beta: Sequence[float]
                ) -> LoraFactors:
    """The Evo-Merging operator on factors (merging.lora.evo_lora per module; the first adapter's scaling)."""
    modules: dict[str, Factors] = {}
    per_expert = [{"alpha": a, "beta": b} for a, b in zip(alpha, beta, strict=True)]
    for path in adapters[0].modules:
        a = [ad.modules[path][0] for ad in adapters]
        b = [ad.modules[path][1] for ad in adapters]
        ma, mb = merge_lora("evo", a, b, per_expert, {})
        modules[path] = (ma, mb, adapters[0].modules[path][2])
    return LoraFactors(key, modules, tuple(p for ad in adapters for p in ad.parts))


class AdapterCache:
    """LRU of adapters' factors, bounded by bytes (thread-safe; a load runs outside the lock)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, LoraFactors] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str, load: Callable[[], LoraFactors]) -> LoraFactors:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return entry
            self.misses += 1
        entry = load()
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while self.nbytes_locked() > self.max_bytes and len(self._entries) > 1:
                self._entries.popitem(last=False)
        return entry

    def nbytes_locked(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def forget(self, expert_id: str) -> None:
        """Drop an adapter and every mix made with it (it was deleted or changed)."""
        with self._lock:
            for key in [k for k, e in self._entries.items() if expert_id in e.parts]:
                del self._entries[key]

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"adapters": len(self._entries), "bytes": self.nbytes_locked(), "hits": self.hits,
                    "misses": self.misses}


@dataclass
class _Binding:
    rows: tuple[int, ...]
    per_module: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # At [S,in,r], Bt [S,r,out]
    group: int = 1  # consecutive rows per stack entry: S = batch rows / group


class MultiLora:
    """Forward hooks on one base model that add the rows' LoRA deltas while a batch is bound."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self._hooks: dict[str, Any] = {}
        self._active: _Binding | None = None
        self._last: _Binding | None = None

    @staticmethod
    def of(model: Any) -> MultiLora:
        ml = getattr(model, "_mergegate_multilora", None)
        if ml is None:
            ml = MultiLora(model)
            model._mergegate_multilora = ml
        return ml

    @staticmethod
    def release(model: Any) -> None:
        """Drop the per-row stacks kept for `model`'s last batch (at 32 rows of rank 8 on every projection of a
        4 x 256 GPT-2, about 11 MB); the engine calls it when the model goes idle."""
        ml = getattr(model, "_mergegate_multilora", None)
        if ml is not None and ml._active is None:
            ml._last = None

    def _hook(self, path: str) -> None:
        if path in self._hooks:
            return
        try:
            module = self.model.get_submodule(path)
        except AttributeError:
            raise InvalidExpertError(f"the base model has no module {path!r} for this adapter") from None

        def add_delta(_: Any, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor | None:
            return self._delta(path, args[0], out)

        self._hooks[path] = module.register_forward_hook(add_delta)

    def _delta(self, path: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
        """`out` with the bound rows' deltas of module `path` added (x: its input), or None when none applies."""
        binding = self._active
        if binding is None or path not in binding.per_module:
            return None
        at, bt = binding.per_module[path]
        g = binding.group
        if x.shape[0] != at.shape[0] * g:  # not the bound batch (a call from elsewhere): leave it alone
            return None
        # segments of g rows share an entry: one [g*T, in] matrix per entry (g = 1: a row per entry)
        xa = torch.bmm(x.reshape(at.shape[0], -1, x.shape[-1]).to(at.dtype), at)
        if out.dtype == bt.dtype and out.is_contiguous():  # the add fused into the second matmul
            out.view(bt.shape[0], -1, bt.shape[-1]).baddbmm_(xa, bt)
            return out
        return out + torch.bmm(xa, bt).reshape(out.shape).to(out.dtype)

    def delta(self, path: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """For a forward that does not call the modules (the engine's GPT-2 kernel): module `path`'s output `out`
        [rows, T, out] for its input `x` [rows, T, in], with the bound rows' deltas."""
        got = self._delta(path, x, out)
        return out if got is None else got

    def bound_paths(self) -> set[str]:
        """The module paths the bound batch has deltas for (empty when nothing is bound)."""
        return set(self._active.per_module) if self._active is not None else set()

    def _bind(self, rows: Sequence[LoraFactors | None]) -> _Binding:
        key = tuple(id(r) if r is not None else 0 for r in rows)
        if self._last is not None and self._last.rows == key:
            return self._last
        self._last = None  # its per-row stacks go before the new ones are built (peak: one binding, not two)
        uniq: list[LoraFactors] = []
        index: list[int] = []
        for r in rows:
            if r is None:
                index.append(0)
                continue
            if not any(u is r for u in uniq):
                uniq.append(r)
            index.append(1 + next(i for i, u in enumerate(uniq) if u is r))
        idx = torch.tensor(index)
        binding = _Binding(key)
        for path in {p for u in uniq for p in u.modules}:
            self._hook(path)
            present = [u.modules.get(path) for u in uniq]
            first = next(f for f in present if f is not None)
            rank = max(f[0].shape[0] for f in present if f is not None)
            a_stack = first[0].new_zeros(len(uniq) + 1, first[0].shape[1], rank)  # A^T: [in, r]
            b_stack = first[1].new_zeros(len(uniq) + 1, rank, first[1].shape[0])  # (s B)^T: [r, out]
            for i, f in enumerate(present, start=1):
                if f is not None:
                    a, b, s = f
                    a_stack[i, :, :a.shape[0]] = a.t()
                    b_stack[i, :b.shape[1]] = (b * s).t()
            binding.per_module[path] = (a_stack[idx], b_stack[idx])
        self._last = binding
        return binding

    @contextmanager
    def segments(self, per_module: Mapping[str, tuple[torch.Tensor, torch.Tensor]], group: int) -> Iterator[None]:
        """While the block runs, rows [k*group, (k+1)*group) of the batch get entry k's delta: per base-module
        path, At [S, in, r] = A_k^T and Bt [S, r, out] = (s_k B_k)^T stacked over the S entries (no per-row
        copies: one [group*T, in] matrix per entry). For batches laid out entry-major, e.g. a merge session's
        candidates x validation examples."""
        for path in per_module:
            self._hook(path)
        self._active = _Binding((), dict(per_module), group)
        try:
            yield
        finally:
            self._active = None

    @contextmanager
    def applied(self, rows: Sequence[LoraFactors | None]) -> Iterator[None]:
        """While the block runs, the base's forward adds row b's adapter delta to row b (rows of the batch
        in order; None: the bare base). The stacks are reused while the rows stay the same."""
        if all(r is None for r in rows):
            yield
            return
        self._active = self._bind(rows)
        try:
            yield
        finally:
            self._active = None
