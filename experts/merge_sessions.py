"""Black-box merge sessions: the provider side of Evo-Merging (Chen et al. 2025, arXiv:2509.12951).

A session binds a base expert, an ordered pool of N LoRA adapters on it (equal rank and target
modules) and the client's validation data. The client sends merge coefficients (alpha in [0, 1]^N,
beta in [-1.5, 1.5]^N) and gets back one number: the mean token cross-entropy of the Evo-merged model

    A = sum_i beta_i S_{alpha_i}(A_i),  B = sum_i beta_i B_i,  W = W0 + s B A   (s = lora_alpha / r)

on its validation data (completion tokens only for prompt/completion pairs). No weights, logits or
gradients leave the session. `materialize` registers the same merge as a servable `lora` expert (an
`evo` recipe through :class:`experts.merges.MergeRunner`, so the lineage holds the coefficients).

Speed (see ``bench/merge_sessions.py``): at creation the base is loaded once into a private resident
copy (never the served cache entry), the adapters' factors are stacked once into an
:class:`merging.evo.EvoPlan` (sorted magnitudes: S_alpha is a threshold lookup), and the validation
set is tokenized once into length-sorted, right-padded batches with precomputed label positions. A
query then writes the candidate's factors with ``EvoPlan.apply`` (no disk, no allocation), and either
  * ``dense`` (default): W = W0 + s B A for every targeted module with one ``addmm`` into the
    resident weights, so the forward pass is exactly the base model's; or
  * ``peft``: the factors go straight into a peft LoRA structure attached to the resident copy
    (used automatically when a module is not Linear/Conv1D or the config has rank/alpha patterns);
and runs one forward pass per batch with the output head applied only at the scored positions.
A query's loss is a pure function of (alpha, beta): the plan does not cache masks across calls, batches
have a fixed order, so concurrent and sequential queries give identical numbers. Each session has a
lock: concurrent evaluations serialise. Queries are counted when accepted (`reserve`, after every vector
was checked and only if the whole batch fits the budget) and refunded if they are not evaluated.
"""

from __future__ import annotations

import json
import math
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from experts.errors import ExpertError, InvalidExpertError
from experts.registry import ExpertRecord
from experts.tasks import Batch, encode_examples, load_task, make_batches, masked_ce_sum, validate_examples

__all__ = [
    "ALPHA_RANGE",
    "BETA_RANGE",
    "BudgetExhaustedError",
    "InvalidCandidateError",
    "LossOptions",
    "MergeSession",
    "MergeSessionError",
    "MergeSessionManager",
    "SessionLimitError",
    "SessionNotFoundError",
    "ValidationSpec",
]

ALPHA_RANGE = (0.0, 1.0)
BETA_RANGE = (-1.5, 1.5)
MAX_POOL = 1024
MAX_BATCH_CANDIDATES = 1000
DEFAULT_REGISTERED_EXAMPLES = 32  # corpus and task sources without max_examples


# ------------------------------------------------------------------------------------------------
# errors (mapped to HTTP in app/errors.py)


class MergeSessionError(ExpertError):
    """Base class of merge-session errors."""


class SessionNotFoundError(MergeSessionError, KeyError):
    """404: no such session (never created, deleted, or expired)."""

    def __init__(self, session_id: str) -> None:
        super().__init__(f"merge session {session_id!r} does not exist (deleted or expired?)")
        self.session_id = session_id

    def __str__(self) -> str:
        return str(self.args[0])


class BudgetExhaustedError(MergeSessionError):
    """429: the session's query budget cannot cover the request; nothing was evaluated."""

    def __init__(self, session_id: str, budget: int, used: int, requested: int) -> None:
        left = budget - used
        super().__init__(f"merge session {session_id!r}: query budget exhausted ({used} of {budget} used, "
                         f"{left} left, {requested} requested)")
        self.budget, self.used, self.requested = budget, used, requested


class InvalidCandidateError(MergeSessionError, ValueError):
    """400: a coefficient vector has the wrong length, a non-finite value, or a value out of range."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class SessionLimitError(MergeSessionError):
    """429: the gateway holds its maximum number of sessions."""


# ------------------------------------------------------------------------------------------------
# options


@dataclass(frozen=True)
class LossOptions:
    """How the validation loss is computed.

    max_examples: cap on validation examples (the first ones, in the source's deterministic order).
    max_tokens_per_example: truncation (see :func:`experts.tasks.encode_examples`), capped at the
        base's context length. batch_tokens: padded tokens per forward pass. append_eos: score an EOS
        after each completion.
    """

    max_examples: int | None = None
    max_tokens_per_example: int = 128
    batch_tokens: int = 1024
    append_eos: bool = False


@dataclass(frozen=True)
class ValidationSpec:
    """The session's validation data: exactly one of inline `examples`, a `corpus` or a `task`.

    Inline: {"prompt", "completion"} pairs or {"text"} (all of them unless `max_examples`). Corpus: the
    split's token stream cut into consecutive windows of max_tokens_per_example tokens (text examples),
    the first `max_examples` (default 32). Task: :func:`experts.tasks.load_task` on the split, the first
    `max_examples` (default 32).
    """

    examples: tuple[Mapping[str, Any], ...] | None = None
    corpus: str | None = None
    task: str | None = None
    split: str = "validation"
    max_examples: int | None = None

    def check(self) -> None:
        if sum(x is not None for x in (self.examples, self.corpus, self.task)) != 1:
            raise InvalidExpertError("validation: give exactly one of examples, corpus or task")
        if self.examples is not None:
            validate_examples(self.examples, max_examples=10_000)
        if self.max_examples is not None and self.max_examples < 1:
            raise InvalidExpertError("validation.max_examples must be >= 1")

    def describe(self) -> dict[str, Any]:
        if self.examples is not None:
            return {"source": "inline", "max_examples": self.max_examples}
        src = {"corpus": self.corpus} if self.corpus is not None else {"task": self.task}
        return {"source": "corpus" if self.corpus is not None else "task", **src, "split": self.split,
                "max_examples": self.max_examples}


def _cap(a: int | None, b: int | None) -> int | None:
    vals = [x for x in (a, b) if x is not None]
    return min(vals) if vals else None


# ------------------------------------------------------------------------------------------------
# the session


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
                 mode: str = "auto") -> None:
        from merging.evo import EvoPlan

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

    # -- set-up helpers -----------------------------------------------------------------------
    def _choose_mode(self, mode: str, first: Mapping[str, torch.Tensor], cfg: Mapping[str, Any]) -> str:
        from merging.lora import lora_modules

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
        from merging.lora import lora_modules, lora_scaling

        self._targets = self.plan.allocate_targets()
        s = lora_scaling(cfg)
        self._dense = []
        for a_key, b_key in lora_modules(first.keys()).values():
            module, transposed = self._dense_module(a_key)
            w = module.weight.data
            a, b = self._targets[a_key], self._targets[b_key]
            self._dense.append((w, w.detach().clone(), a, b, transposed, s))

    def _setup_peft(self, adapter_config: Mapping[str, Any]) -> None:
        """Attach a peft LoRA structure like the pool's; targets: its LoRA parameters."""
        from peft import LoraConfig, get_peft_model

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
        from transformers.pytorch_utils import Conv1D

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

    def evaluate_many(self, candidates: Sequence[tuple[Sequence[float], Sequence[float]]]) -> list[float]:
        """Evaluate a population in one call: every vector is checked and the budget must cover all of
        them before anything is evaluated; one query per candidate (refunded if not evaluated)."""
        checked = self.check_candidates(candidates)
        self.reserve(len(checked))
        losses: list[float] = []
        try:
            for a, b in checked:
                losses.append(self.loss_of(a, b))
        finally:
            self.refund(len(checked) - len(losses))
        return losses

    def view(self) -> dict[str, Any]:
        return {"id": self.id, "object": "merge.session", "base": self.base, "n": self.n,
                "experts": list(self.experts), "budget": self.budget, "used": self.used,
                "remaining": self.remaining,
                "created_at": self.created_at, "last_used_at": self.last_used_at,
                "validation": {**self.validation.describe(), "examples": self.n_examples,
                               "scored_tokens": self.n_tokens},
                "loss": {"type": "mean_token_cross_entropy", **asdict(self.loss_options)},
                "alpha_range": list(ALPHA_RANGE), "beta_range": list(BETA_RANGE)}


# ------------------------------------------------------------------------------------------------
# the manager


class MergeSessionManager:
    """The gateway's sessions: create (bounded count, idle expiry), get, delete, materialize."""

    def __init__(self, repo: Any, *, btm: Any = None, max_sessions: int = 8, idle_timeout_s: float = 3600.0,
                 mode: str = "auto") -> None:
        self.repo = repo
        self.btm = btm
        self.max_sessions = max_sessions
        self.idle_timeout_s = idle_timeout_s
        self.mode = mode
        self._sessions: dict[str, MergeSession] = {}
        self._pending = 0
        self._lock = threading.Lock()

    # -- pool resolution ----------------------------------------------------------------------
    def resolve_pool(self, base: str, pool: Sequence[str] | Mapping[str, Any]) -> list[ExpertRecord]:
        """Adapter records in order: ids as given, or every lora expert on `base` carrying all the tags
        of a {"tags": [...]} selector, sorted by id. All must be lora experts on `base` with equal rank
        and target modules."""
        base_rec = self.repo.record(base)  # 404 for an unknown base
        if base_rec.kind != "local":
            raise InvalidExpertError(f"the base must be a local expert; {base!r} is {base_rec.kind}")
        if isinstance(pool, Mapping):
            tags = list(pool.get("tags") or [])
            if not tags:
                raise InvalidExpertError("a pool selector needs at least one tag: {\"tags\": [...]}")
            records = sorted((r for r in self.repo.list(kind="lora") if r.spec.get("base") == base
                              and set(tags) <= set(r.tags) and r.status == "ready"), key=lambda r: r.id)
            if not records:
                raise InvalidExpertError(f"no lora experts on {base!r} carry the tags {tags}")
        else:
            ids = list(pool)
            if not ids:
                raise InvalidExpertError("the pool is empty")
            dup = sorted({i for i in ids if ids.count(i) > 1})
            if dup:
                raise InvalidExpertError(f"expert {dup[0]!r} is listed more than once in the pool")
            records = [self.repo.record(i) for i in ids]
        if len(records) > MAX_POOL:
            raise InvalidExpertError(f"a pool holds at most {MAX_POOL} adapters, got {len(records)}")
        for r in records:
            if r.kind != "lora":
                raise InvalidExpertError(f"pool expert {r.id!r} is of kind {r.kind!r}; a pool holds lora "
                                         "adapters")
            if r.spec.get("base") != base:
                raise InvalidExpertError(f"pool expert {r.id!r} is an adapter on {r.spec.get('base')!r}, "
                                         f"not on {base!r}; a session merges adapters on one base")
        first = records[0]
        for r in records[1:]:
            for key in ("rank", "target_modules"):
                if r.spec.get(key) != first.spec.get(key):
                    raise InvalidExpertError(
                        f"pool expert {r.id!r} has {key} {r.spec.get(key)!r}, but {first.id!r} has "
                        f"{first.spec.get(key)!r}; a session needs equal rank and target modules")
        return records

    def _examples(self, spec: ValidationSpec, tokenizer: Any, loss: LossOptions) -> list[dict[str, Any]]:
        cap = _cap(spec.max_examples, loss.max_examples)
        if spec.examples is not None:
            ex = [dict(e) for e in spec.examples]
            return ex if cap is None else ex[:cap]
        cap = DEFAULT_REGISTERED_EXAMPLES if cap is None else cap
        if self.btm is None:
            raise InvalidExpertError("registered datasets need the gateway's corpora; send inline examples")
        if spec.task is not None:
            return load_task(self.btm, spec.task, spec.split, cap)
        ids = self.btm.token_ids(tokenizer, spec.corpus, spec.split)
        w = loss.max_tokens_per_example
        n = min(ids.numel() // w, cap)
        if n < 1:
            raise InvalidExpertError(f"corpus {spec.corpus!r} ({spec.split}) is shorter than one example")
        # decode windows back to text so every source takes the same encoding path
        return [{"text": tokenizer.decode(ids[i * w:(i + 1) * w].tolist())} for i in range(n)]

    # -- life cycle ---------------------------------------------------------------------------
    def _prune(self) -> None:
        if self.idle_timeout_s <= 0:
            return
        now = time.time()
        for sid, s in list(self._sessions.items()):
            if now - s.last_used_at > self.idle_timeout_s and not s._lock.locked():
                del self._sessions[sid]

    def create(self, base: str, pool: Sequence[str] | Mapping[str, Any], validation: ValidationSpec, *,
               loss: LossOptions = LossOptions(), budget: int = 2000,
               mode: str | None = None) -> MergeSession:
        """Check everything, load the base privately, build the plan and the batches; register the session."""
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if budget < 1:
            raise InvalidExpertError("budget must be >= 1")
        validation.check()
        records = self.resolve_pool(base, pool)
        with self._lock:
            self._prune()
            if len(self._sessions) + self._pending >= self.max_sessions:
                raise SessionLimitError(f"the gateway holds its maximum of {self.max_sessions} merge "
                                        "sessions; delete one first")
            self._pending += 1
        try:
            base_dir = self.repo.artifact_dir(self.repo.record(base))
            model = AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True, dtype=torch.float32,
                                                         use_safetensors=True)
            tokenizer = AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
            dirs = [self.repo.artifact_dir(r) for r in records]
            adapters = [load_file(str(d / "adapter_model.safetensors")) for d in dirs]
            cfg = json.loads((dirs[0] / "adapter_config.json").read_text())
            examples = self._examples(validation, tokenizer, loss)
            session = MergeSession(f"msess-{uuid.uuid4().hex[:20]}", base, [r.id for r in records],
                                   model=model, tokenizer=tokenizer, adapters=adapters, adapter_config=cfg,
                                   examples=examples, validation=validation, loss=loss, budget=budget,
                                   mode=mode or self.mode)
            with self._lock:
                self._sessions[session.id] = session
            return session
        finally:
            with self._lock:
                self._pending -= 1

    def get(self, session_id: str) -> MergeSession:
        with self._lock:
            s = self._sessions.get(session_id)
        if s is None:
            raise SessionNotFoundError(session_id)
        return s

    def list(self) -> list[MergeSession]:
        with self._lock:
            return list(self._sessions.values())

    def delete(self, session_id: str) -> None:
        with self._lock:
            if self._sessions.pop(session_id, None) is None:
                raise SessionNotFoundError(session_id)

    def close(self) -> None:
        with self._lock:
            self._sessions.clear()

    # -- materialize --------------------------------------------------------------------------
    def materialize(self, session_id: str, alpha: Sequence[float], beta: Sequence[float], name: str, *,
                    tags: Sequence[str] = (), domain: str | None = None,
                    extra_lineage: Mapping[str, Any] | None = None) -> ExpertRecord:
        """Register the merge for (alpha, beta) as a `lora` expert via an `evo` recipe (no query counted);
        its lineage (recipe, session, `extra_lineage`) is written with the record, in one step."""
        from experts.merges import MergeRunner
        from merging.recipe import load_recipe

        s = self.get(session_id)
        a, b = s.check_vectors(alpha, beta)
        experts = [{"id": e, "alpha": x, "beta": y} for e, x, y in zip(s.experts, a, b, strict=True)]
        recipe = load_recipe({"method": "evo", "base": s.base, "experts": experts})
        extra = {"session": {"id": s.id, "queries_used": s.used, "validation": s.validation.describe()},
                 **(extra_lineage or {})}
        return MergeRunner(self.repo).run(recipe, name, tags=list(tags), domain=domain, extra_lineage=extra)
