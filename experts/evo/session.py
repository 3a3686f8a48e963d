"""`MergeSession`: one client's resident model, stacked adapter factors and tokenized validation batches.

See :mod:`experts.evo.sessions` for the contract and the speed notes; it re-exports this class.
Populations are evaluated in steps by :mod:`experts.evo.batched` (rows = candidates x examples).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import torch

from experts.data.scoring import Batch, encode_examples, make_batches, masked_ce_sum, masked_ce_sums
from experts.errors import InvalidExpertError
from experts.evo.batched import BatchedRun, Population
from experts.evo.options import (
    ALPHA_RANGE,
    BATCH_FORWARD_TOKENS,
    BETA_RANGE,
    MAX_BATCH_CANDIDATES,
    BudgetExhaustedError,
    InvalidCandidateError,
    LossOptions,
    ValidationSpec,
)
from experts.hf.multilora import MultiLora
from merging.evo import EvoPlan
from merging.lora import lora_modules, lora_scaling

__all__ = ["MergeSession"]


def _module_path(a_key: str) -> str:
    """"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight" -> "transformer.h.0.attn.c_attn"."""
    path = a_key.split(".lora_A")[0]
    return path.removeprefix("base_model.model.")


def _peft_param_name(key: str, adapter: str = "default") -> str:
    """The adapter file's key -> peft's parameter name (".lora_A.weight" -> ".lora_A.default.weight")."""
    for ab in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
        tag = f".{ab}."
        if tag in key:
            head, tail = key.split(tag, 1)
            if tail == "weight" or tail == "":
                return f"{head}.{ab}.{adapter}.weight" if tail == "weight" else f"{head}.{ab}.{adapter}"
    return key


class MergeSession:
    """One client's black-box merge session over a fixed pool (see the module docstring)."""

    def __init__(self, session_id: str, base: str, experts: list[str], *, model: Any, tokenizer: Any,
                 adapters: list[dict[str, torch.Tensor]], adapter_config: Mapping[str, Any],
                 examples: list[dict[str, Any]], validation: ValidationSpec, loss: LossOptions, budget: int,
                 mode: str = "auto", batched: bool = True, forward_tokens: int = BATCH_FORWARD_TOKENS) -> None:
        self.id = session_id
        self.base = base
        self.experts = list(experts)
        self.n = len(experts)
        self.budget = int(budget)
        self.used = 0
        self.created_at = time.time()
        self.last_used_at = self.created_at
        self.validation = validation
        self.loss_options = loss
        self._lock = threading.Lock()
        self._model = model
        self._model.eval()
        self._model.requires_grad_(False)
        self.plan = EvoPlan.lora(adapters, cache_masked=False)  # pure: no state carried between queries
        self.mode = self._choose_mode(mode, adapters[0], adapter_config)
        if self.mode == "dense":
            self._setup_dense(adapters[0], adapter_config)
        else:
            self._setup_peft(adapter_config)
        self._setup_batches(tokenizer, examples, loss)
        self._fast = self._check_fast_path()
        # populations as rows of batched forwards: on the base's own weights with per-row LoRA deltas, so
        # only where the dense mode holds W0 (peft mode, and single queries, take the per-candidate path)
        self.batched = bool(batched) and self.mode == "dense"
        self.forward_tokens = max(1, int(forward_tokens))
        self._weights_dirty = False  # W holds a candidate's merge (dense mode), not W0

    # -- set-up helpers -----------------------------------------------------------------------
    def _choose_mode(self, mode: str, first: Mapping[str, torch.Tensor], cfg: Mapping[str, Any]) -> str:
        patterns = bool(cfg.get("rank_pattern") or cfg.get("alpha_pattern"))
        modules = lora_modules(first.keys()).values()
        dense_ok = not patterns and all(self._dense_module(a) is not None for a, _ in modules)
        if mode == "auto":
            return "dense" if dense_ok else "peft"
        if mode not in ("dense", "peft"):
            raise InvalidExpertError(f"mode must be 'auto', 'dense' or 'peft', got {mode!r}")
        if mode == "dense" and not dense_ok:
            raise InvalidExpertError("dense evaluation needs Linear/Conv1D LoRA modules and no rank/alpha "
                                     "patterns")
        return mode

    def _setup_dense(self, first: Mapping[str, torch.Tensor], cfg: Mapping[str, Any]) -> None:
        """Targets: the plan's own float32 buffers; per module (W, W0 copy, A, B, transposed, scaling)."""
        self._targets = self.plan.allocate_targets()
        s = lora_scaling(cfg)
        self._dense = []
        self._dense_paths: list[str] = []
        for a_key, b_key in lora_modules(first.keys()).values():
            module, transposed = self._dense_module(a_key)
            w = module.weight.data
            a, b = self._targets[a_key], self._targets[b_key]
            self._dense.append((w, w.detach().clone(), a, b, transposed, s))
            self._dense_paths.append(_module_path(a_key))

    def _setup_peft(self, adapter_config: Mapping[str, Any]) -> None:
        """Attach a peft LoRA structure like the pool's; targets: its LoRA parameters."""
        from peft import LoraConfig, get_peft_model  # heavy: imported when a session uses peft mode

        known = set(LoraConfig.__dataclass_fields__)
        skip = ("peft_type", "base_model_name_or_path", "task_type")
        cfg = {k: v for k, v in adapter_config.items() if k in known and k not in skip}
        cfg["lora_dropout"] = 0.0
        self._model = get_peft_model(self._model, LoraConfig(**cfg))
        self._model.eval()
        self._model.requires_grad_(False)
        params = dict(self._model.named_parameters())
        self._targets = {}
        for name in self.plan.names:
            pname = _peft_param_name(name)
            if pname not in params:
                raise InvalidExpertError(f"the pool's tensor {name!r} has no LoRA parameter in the base")
            self._targets[name] = params[pname].data

    def _setup_batches(self, tokenizer: Any, examples: list[dict[str, Any]], loss: LossOptions) -> None:
        """The validation set, tokenized once into length-sorted padded batches."""
        cfg = self._model.config
        n_pos = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
        max_tok = min(loss.max_tokens_per_example, int(n_pos)) if n_pos else loss.max_tokens_per_example
        enc = encode_examples(tokenizer, examples, max_tokens=max_tok, append_eos=loss.append_eos)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.batches: list[Batch] = make_batches(enc, batch_tokens=loss.batch_tokens, pad_id=pad)
        self.n_examples = len(enc)
        self.n_tokens = sum(b.n_targets for b in self.batches)

    def _dense_module(self, a_key: str) -> tuple[Any, bool] | None:
        from transformers.pytorch_utils import Conv1D  # heavy: imported on first use

        if ".lora_A" not in a_key or "lora_embedding" in a_key:
            return None
        try:
            module = self._model.get_submodule(_module_path(a_key))
        except AttributeError:
            return None
        if isinstance(module, Conv1D):
            return module, True
        if type(module) is torch.nn.Linear:
            return module, False
        return None

    def _check_fast_path(self) -> bool:
        """Head-at-scored-positions must equal the full forward on the first batch; else use the full one."""
        b = self.batches[0]
        with torch.inference_mode():
            fast = float(masked_ce_sum(self._model, b, fast=True))
            full = float(masked_ce_sum(self._model, b, fast=False))
        return abs(fast - full) <= 1e-5 * max(1.0, abs(full))

    # -- queries ------------------------------------------------------------------------------
    @property
    def remaining(self) -> int:
        return self.budget - self.used

    def check_vectors(self, alpha: Sequence[float], beta: Sequence[float],
                      where: str = "") -> tuple[list[float], list[float]]:
        """Validate one candidate: lengths N, finite, alpha in [0, 1], beta in [-1.5, 1.5]."""
        out = []
        for name, vec, (lo, hi) in (("alpha", alpha, ALPHA_RANGE), ("beta", beta, BETA_RANGE)):
            param = f"{where}{name}"
            try:
                items = list(vec)  # lists, tuples, numpy arrays
            except TypeError:
                items = None
            if items is None or isinstance(vec, str | bytes | Mapping):
                raise InvalidCandidateError(f"{param} must be a list of {self.n} numbers", param=param)
            if len(items) != self.n:
                raise InvalidCandidateError(
                    f"{param} has {len(items)} values; this session merges {self.n} experts", param=param)
            vals = []
            for i, x in enumerate(items):
                try:
                    v = float(x) if not isinstance(x, str | bytes | bool) else math.nan
                except (TypeError, ValueError):
                    v = math.nan
                if not math.isfinite(v):
                    raise InvalidCandidateError(f"{param}[{i}] is not a finite number", param=param)
                if not lo <= v <= hi:
                    raise InvalidCandidateError(f"{param}[{i}] = {x} is outside [{lo}, {hi}]", param=param)
                vals.append(v)
            out.append(vals)
        return out[0], out[1]

    def _apply(self, alpha: list[float], beta: list[float]) -> None:
        self.plan.apply(alpha, beta, self._targets)
        if self.mode == "dense":
            self._weights_dirty = True
            with torch.no_grad():
                for w, w0, a, b, transposed, s in self._dense:
                    if transposed:  # Conv1D stores (in, out): W = W0 + s (B A)^T = W0 + s A^T B^T
                        torch.addmm(w0, a.t(), b.t(), alpha=s, out=w)
                    else:  # Linear (out, in): W = W0 + s B A
                        torch.addmm(w0, b, a, alpha=s, out=w)

    def _loss(self) -> float:
        total = torch.zeros((), dtype=torch.float64)
        with torch.inference_mode():
            for b in self.batches:
                total += masked_ce_sum(self._model, b, fast=self._fast)
        return float(total.item() / self.n_tokens)

    def evaluate(self, alpha: Sequence[float], beta: Sequence[float]) -> float:
        """Mean token cross-entropy of the merged model for (alpha, beta); counts one query."""
        return self.evaluate_many([(alpha, beta)])[0]

    def check_candidates(self, candidates: Sequence[tuple[Sequence[float], Sequence[float]]]
                         ) -> list[tuple[list[float], list[float]]]:
        """Validate a population (at least 1, at most MAX_BATCH_CANDIDATES candidates)."""
        if not candidates:
            raise InvalidCandidateError("no candidates", param="candidates")
        if len(candidates) > MAX_BATCH_CANDIDATES:
            raise InvalidCandidateError(f"at most {MAX_BATCH_CANDIDATES} candidates per call",
                                        param="candidates")
        many = len(candidates) > 1
        return [self.check_vectors(a, b, f"candidates[{i}]." if many else "")
                for i, (a, b) in enumerate(candidates)]

    def reserve(self, k: int) -> None:
        """Count k queries now, or raise BudgetExhaustedError (nothing counted) if they do not fit."""
        with self._lock:
            if self.used + k > self.budget:
                raise BudgetExhaustedError(self.id, self.budget, self.used, k)
            self.used += k
            self.last_used_at = time.time()

    def refund(self, k: int) -> None:
        """Give back reserved queries that were not evaluated (a failure or a cancelled request)."""
        with self._lock:
            self.used = max(0, self.used - k)

    def loss_of(self, alpha: list[float], beta: list[float]) -> float:
        """The loss of one checked, already counted candidate (holds the session lock while it runs)."""
        with self._lock:
            self._apply(alpha, beta)
            loss = self._loss()
            self.last_used_at = time.time()
            return loss

    def evaluate_many(self, candidates: Sequence[tuple[Sequence[float], Sequence[float]]], *,
                      batched: bool | None = None) -> list[float]:
        """Evaluate a population in one call: every vector is checked and the budget must cover all of
        them before anything is evaluated; one query per candidate (refunded if not evaluated).

        More than one candidate goes through the batched path where the session has one
        (:class:`BatchedRun`); `batched=False` forces the per-candidate reference path."""
        with self.population(candidates, batched=batched) as pop:
            while not pop.done:
                pop.step()
            return pop.losses()

    def population(self, candidates: Sequence[tuple[Sequence[float], Sequence[float]]], *,
                   batched: bool | None = None) -> Population:
        """Check and count a population (see :class:`experts.evo.batched.Population`); use it as a context
        manager."""
        return Population(self, candidates, batched=batched)

    def batched_run(self, checked: Sequence[tuple[list[float], list[float]]]) -> BatchedRun | None:
        """A :class:`BatchedRun` for checked, already counted candidates; None where the per-candidate
        path applies (one candidate, or no batched path in this session)."""
        if not self.batched or len(checked) < 2:
            return None
        return BatchedRun(self, checked)

    def _restore_base(self) -> None:
        """W0 back into the dense modules (a per-candidate query left its merge there)."""
        if self._weights_dirty:
            with torch.no_grad():
                for w, w0, *_ in self._dense:
                    w.copy_(w0)
            self._weights_dirty = False

    def factor_stacks(self, candidates: Sequence[tuple[list[float], list[float]]]
                      ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per module path: At [G, in, r] = A_k^T and Bt [G, r, out] = (s B_k)^T of G checked candidates,
        written by the session's EvoPlan (the per-candidate path's operator and buffers). Call it holding
        the session's lock."""
        stacks = {path: (a.new_empty(len(candidates), a.shape[1], a.shape[0]),
                         b.new_empty(len(candidates), b.shape[1], b.shape[0]))
                  for (_, _, a, b, _, _), path in zip(self._dense, self._dense_paths, strict=True)}
        with torch.no_grad():
            for k, (alpha, beta) in enumerate(candidates):
                self.plan.apply(alpha, beta, self._targets)
                for (_, _, a, b, _, scale), path in zip(self._dense, self._dense_paths, strict=True):
                    at, bt = stacks[path]
                    at[k].copy_(a.t())
                    torch.mul(b.t(), scale, out=bt[k])
        return stacks

    def batched_sums(self, stacks: Mapping[str, tuple[torch.Tensor, torch.Tensor]], batch: Batch) -> torch.Tensor:
        """Masked cross-entropy sums (float64) of the batch under each of the G stacked candidates, in one
        forward on the base's own weights (batch.ids repeated G times, candidate k's delta on its rows).
        Call it holding the session's lock."""
        self._restore_base()
        copies = next(iter(stacks.values()))[0].shape[0]
        with torch.inference_mode(), MultiLora.of(self._model).segments(stacks, batch.ids.shape[0]):
            return masked_ce_sums(self._model, batch, copies, fast=self._fast)

    def view(self) -> dict[str, Any]:
        return {"id": self.id, "object": "merge.session", "base": self.base, "n": self.n,
                "experts": list(self.experts), "budget": self.budget, "used": self.used,
                "remaining": self.remaining,
                "created_at": self.created_at, "last_used_at": self.last_used_at,
                "validation": {**self.validation.describe(), "examples": self.n_examples,
                               "scored_tokens": self.n_tokens},
                "loss": {"type": "mean_token_cross_entropy", **asdict(self.loss_options)},
                "alpha_range": list(ALPHA_RANGE), "beta_range": list(BETA_RANGE)}
