"""Black-box merge sessions: the provider side of Evo-Merging (Chen et al. 2025, arXiv:2509.12951).

A session binds a base expert, an ordered pool of N LoRA adapters on it (equal rank and target
modules) and the client's validation data. The client sends merge coefficients (alpha in [0, 1]^N,
beta in [-1.5, 1.5]^N) and gets back one number: the mean token cross-entropy of the Evo-merged model

    A = sum_i beta_i S_{alpha_i}(A_i),  B = sum_i beta_i B_i,  W = W0 + s B A   (s = lora_alpha / r)

on its validation data (completion tokens only for prompt/completion pairs). No weights, logits or
gradients leave the session. `materialize` (an admin right over HTTP, one query of the budget) registers
the same merge as a servable `lora` expert (an `evo` recipe through
:class:`experts.repository.merges.MergeRunner`, so the lineage holds the coefficients).

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
A population (``evaluate_many``, ``evaluate_batch`` over HTTP) in dense mode is evaluated batched instead
(:class:`experts.evo.batched.BatchedRun`): every candidate's factors from the same EvoPlan, stacked, and
rows = candidates x validation examples in forwards of at most ``forward_tokens`` padded tokens, each
candidate's rows getting its own LoRA delta per row (``MultiLora.segments``) on the unmerged base; the
losses equal the per-candidate path's to float rounding (~1e-6). Peft mode and single queries take the
per-candidate path.
A query's loss is a pure function of (alpha, beta): the plan does not cache masks across calls, batches
have a fixed order, so concurrent and sequential queries give identical numbers; the same population gives
the same numbers too (its grouping is a function of its size), and a candidate's batched loss differs from
its single-query loss only by float rounding (so an in-process search and one over HTTP, both sending
populations, agree exactly). Each session has a
lock: concurrent evaluations serialise. Queries are counted when accepted (`reserve`, after every vector
was checked and only if the whole batch fits the budget) and refunded if they are not evaluated.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from experts.data.datasets import load_task
from experts.errors import InvalidExpertError
from experts.evo.options import (
    ALPHA_RANGE,
    BETA_RANGE,
    DEFAULT_REGISTERED_EXAMPLES,
    MAX_BATCH_CANDIDATES,
    MAX_POOL,
    BudgetExhaustedError,
    InvalidCandidateError,
    LossOptions,
    MergeSessionError,
    SessionLimitError,
    SessionNotFoundError,
    ValidationSpec,
    _cap,
)
from experts.evo.session import MergeSession
from experts.repository.merges import MergeRunner
from experts.repository.registry import ExpertRecord
from merging.recipe import load_recipe

__all__ = [
    "ALPHA_RANGE",
    "BETA_RANGE",
    "MAX_BATCH_CANDIDATES",
    "BudgetExhaustedError",
    "InvalidCandidateError",
    "LossOptions",
    "MergeSession",
    "MergeSessionError",
    "MergeSessionManager",
    "SessionLimitError",
    "SessionNotFoundError",
    "ValidationSpec",
    "load_session",
]


# ------------------------------------------------------------------------------------------------
# loading


def load_session(session_id: str, base: str, base_dir: Path, experts: list[str], adapter_dirs: list[Path],
                 examples: Callable[[Any], list[dict[str, Any]]] | list[dict[str, Any]], *,
                 validation: ValidationSpec, loss: LossOptions, budget: int, mode: str,
                 batched: bool = True) -> MergeSession:
    """A session from artifact dirs: the base loaded privately, the adapters stacked, the examples (a list,
    or a function of the tokenizer) tokenized. Runs in the gateway or in a Ray actor (the same numbers)."""
    # heavy: imported when the first session is created (the app starts without them)
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True, dtype=torch.float32,
                                                 use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
    adapters = [load_file(str(d / "adapter_model.safetensors")) for d in adapter_dirs]
    cfg = json.loads((adapter_dirs[0] / "adapter_config.json").read_text())
    rows = examples(tokenizer) if callable(examples) else examples
    return MergeSession(session_id, base, experts, model=model, tokenizer=tokenizer, adapters=adapters,
                        adapter_config=cfg, examples=rows, validation=validation, loss=loss, budget=budget, mode=mode,
                        batched=batched)


# ------------------------------------------------------------------------------------------------
# the manager


class MergeSessionManager:
    """The gateway's sessions: create (bounded count, idle expiry), get, delete, materialize."""

    def __init__(self, repo: Any, *, btm: Any = None, max_sessions: int = 8, idle_timeout_s: float = 3600.0,
                 mode: str = "auto", batched: bool = True) -> None:
        self.repo = repo
        self.btm = btm
        self.max_sessions = max_sessions
        self.idle_timeout_s = idle_timeout_s
        self.mode = mode
        self.batched = batched  # populations as batched runs where a session can (see MergeSession.batched)
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

    def examples(self, spec: ValidationSpec, tokenizer: Any, loss: LossOptions) -> list[dict[str, Any]]:
        """The validation examples of a session: inline, a task's, or windows of a corpus."""
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
            session = load_session(f"msess-{uuid.uuid4().hex[:20]}", base, self.repo.artifact_dir(
                self.repo.record(base)), [r.id for r in records], [self.repo.artifact_dir(r) for r in records],
                lambda tok: self.examples(validation, tok, loss), validation=validation, loss=loss, budget=budget,
                mode=mode or self.mode, batched=self.batched)
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
        """Register the merge for (alpha, beta) as a `lora` expert via an `evo` recipe; its lineage (recipe,
        session, `extra_lineage`) is written with the record, in one step.

        Materialising counts as one query of the session's budget (BudgetExhaustedError when it is spent),
        refunded if the merge fails: a session cannot register experts without limit."""
        s = self.get(session_id)
        a, b = s.check_vectors(alpha, beta)
        experts = [{"id": e, "alpha": x, "beta": y} for e, x, y in zip(s.experts, a, b, strict=True)]
        recipe = load_recipe({"method": "evo", "base": s.base, "experts": experts})
        s.reserve(1)
        try:
            extra = {"session": {"id": s.id, "queries_used": s.used, "validation": s.validation.describe()},
                     **(extra_lineage or {})}
            return MergeRunner(self.repo).run(recipe, name, tags=list(tags), domain=domain, extra_lineage=extra)
        except BaseException:
            s.refund(1)
            raise
