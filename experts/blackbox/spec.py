"""Black-box ensembles: their stored spec, validation, registration and weight changes.

A black-box ensemble is an `ensemble` record whose spec has a `mode`:

    {"mode": "score_select" | "token_mix",
     "members": [{"id": ..., "weight": ...}, ...],   # weights normalised to sum 1
     "candidates": [member ids that generate],      # score_select only (default: all members)
     "top_logprobs": k}                              # token_mix only: alternatives asked per step

An `ensemble` record without `mode` is a BTM forest (experts/forest.py) and is served as before.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from experts.base import ExpertKind
from experts.errors import ExpertExistsError, InvalidExpertError
from experts.repository.registry import ExpertRecord
from experts.repository.repo import ExpertRepository
from experts.repository.store import check_expert_id

MODES = ("score_select", "token_mix")
MEMBER_KINDS = ("local", "lora", "remote", "ensemble")  # an `ensemble` member must be a BTM forest
MAX_MEMBERS = 16
DEFAULT_TOP_LOGPROBS = 5  # what OpenAI's legacy completions allow at most
MAX_TOP_LOGPROBS = 20


def is_blackbox(record: ExpertRecord) -> bool:
    return record.kind == ExpertKind.ENSEMBLE.value and record.spec.get("mode") in MODES


@dataclass(frozen=True, slots=True)
class MemberSpec:
    id: str
    weight: float


@dataclass(frozen=True, slots=True)
class BlackBoxSpec:
    mode: str
    members: tuple[MemberSpec, ...]
    candidates: tuple[str, ...]
    top_logprobs: int = DEFAULT_TOP_LOGPROBS

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BlackBoxSpec:
        members = tuple(MemberSpec(str(m["id"]), float(m.get("weight", 1.0))) for m in d.get("members", []))
        cands = tuple(d.get("candidates") or [m.id for m in members])
        return cls(str(d["mode"]), members, cands, int(d.get("top_logprobs") or DEFAULT_TOP_LOGPROBS))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"mode": self.mode, "members": [{"id": m.id, "weight": m.weight} for m in self.members]}
        if self.mode == "score_select":
            d["candidates"] = list(self.candidates)
        else:
            d["top_logprobs"] = self.top_logprobs
        return d

    def weight(self, member_id: str) -> float:
        return next(m.weight for m in self.members if m.id == member_id)


def _member_entries(members: Sequence[Any]) -> list[tuple[str, float | None]]:
    out: list[tuple[str, float | None]] = []
    for m in members:
        if isinstance(m, str):
            out.append((m, None))
        elif isinstance(m, dict) and isinstance(m.get("id"), str):
            w = m.get("weight")
            out.append((m["id"], None if w is None else float(w)))
        else:
            raise InvalidExpertError("members must be expert ids or {id, weight} objects")
    return out


def normalise_weights(weights: Sequence[float], n: int) -> list[float]:
    if len(weights) != n:
        raise InvalidExpertError(f"{n} members but {len(weights)} weights")
    ws = [float(w) for w in weights]
    if any(not math.isfinite(w) or w < 0 for w in ws) or sum(ws) <= 0:
        raise InvalidExpertError("weights must be finite, non-negative and not all zero")
    total = sum(ws)
    return [w / total for w in ws]


def _check_candidates(candidates: Sequence[str], ids: list[str]) -> tuple[str, ...]:
    if not candidates:
        raise InvalidExpertError("candidates must name at least one member")
    if len(set(candidates)) != len(candidates):
        raise InvalidExpertError("candidates lists each member once")
    stray = [c for c in candidates if c not in ids]
    if stray:
        raise InvalidExpertError(f"candidates must be members of the ensemble; {stray} are not")
    return tuple(candidates)


def build_spec(repo: ExpertRepository, mode: str, members: Sequence[Any], *, weights: Sequence[float] | None = None,
               candidates: Sequence[str] | None = None, top_logprobs: int | None = None
               ) -> tuple[BlackBoxSpec, list[ExpertRecord]]:
    """Validate and build a spec; all problems are InvalidExpertError (400)."""
    if mode not in MODES:
        raise InvalidExpertError(f"mode must be one of {list(MODES)}")
    entries = _member_entries(members)
    if not entries:
        raise InvalidExpertError("an ensemble needs at least one member")
    if len(entries) > MAX_MEMBERS:
        raise InvalidExpertError(f"an ensemble has at most {MAX_MEMBERS} members")
    ids = [i for i, _ in entries]
    if len(set(ids)) != len(ids):
        raise InvalidExpertError("an ensemble lists each member once")
    records = []
    for i in ids:
        if not repo.registry.has_expert(i):
            raise InvalidExpertError(f"member {i!r} is not a registered expert")
        r = repo.record(i)
        if r.kind not in MEMBER_KINDS or is_blackbox(r):
            raise InvalidExpertError(f"member {i!r} is a {'black-box ensemble' if is_blackbox(r) else r.kind}; "
                                     "members must be local, lora or remote experts or BTM forests")
        if r.status != "ready":
            raise InvalidExpertError(f"member {i!r} is {r.status}, not ready")
        records.append(r)
    if weights is None:
        given = [w for _, w in entries]
        weights = [1.0 if w is None else w for w in given] if any(w is not None for w in given) else [1.0] * len(ids)
    elif any(w is not None for _, w in entries):
        raise InvalidExpertError("give weights either in members or in weights, not both")
    ws = normalise_weights(weights, len(ids))
    if mode == "token_mix":
        if candidates is not None:
            raise InvalidExpertError("candidates is for score_select; in token_mix every member with a weight "
                                     "takes part in every step")
        fps = {r.tokenizer_fingerprint for r in records if r.kind != ExpertKind.REMOTE.value}
        if len(fps) > 1:
            raise InvalidExpertError("token_mix needs members that share one tokenizer; the local members' "
                                     "tokenizer fingerprints differ (use score_select across tokenizers)")
        k = DEFAULT_TOP_LOGPROBS if top_logprobs is None else int(top_logprobs)
        if not 1 <= k <= MAX_TOP_LOGPROBS:
            raise InvalidExpertError(f"top_logprobs must be between 1 and {MAX_TOP_LOGPROBS}")
        cands: tuple[str, ...] = tuple(ids)
    else:
        if top_logprobs is not None:
            raise InvalidExpertError("top_logprobs is for token_mix")
        k = DEFAULT_TOP_LOGPROBS
        cands = _check_candidates(list(candidates) if candidates is not None else ids, ids)
    spec = BlackBoxSpec(mode, tuple(MemberSpec(i, w) for i, w in zip(ids, ws)), cands, k)
    return spec, records


def _record(expert_id: str, spec: BlackBoxSpec, records: list[ExpertRecord], *, tags: list[str] | None,
            domain: str | None, base: ExpertRecord | None = None) -> ExpertRecord:
    local = [r for r in records if r.kind != ExpertKind.REMOTE.value]
    fps = {r.tokenizer_fingerprint for r in local}
    ctx = min((r.context_length for r in local if r.context_length), default=None)
    lineage = {"op": f"ensemble.{spec.mode}", "parents": [{"id": m.id, "weight": m.weight} for m in spec.members]}
    return ExpertRecord(
        id=expert_id, kind=ExpertKind.ENSEMBLE.value, status="ready", architecture=f"BlackBoxEnsemble:{spec.mode}",
        num_params=None, context_length=ctx,
        tokenizer_fingerprint=fps.pop() if spec.mode == "token_mix" and len(fps) == 1 else None,
        domain=domain if base is None else base.domain,
        tags=list(tags) if tags is not None else (base.tags if base is not None else ["ensemble", spec.mode]),
        lineage=lineage, spec=spec.to_dict())


def create_blackbox(repo: ExpertRepository, expert_id: str, mode: str, members: Sequence[Any], *,
                    weights: Sequence[float] | None = None, candidates: Sequence[str] | None = None,
                    top_logprobs: int | None = None, tags: list[str] | None = None,
                    domain: str | None = None) -> ExpertRecord:
    check_expert_id(expert_id)
    if repo.registry.has_expert(expert_id):
        raise ExpertExistsError(expert_id)
    spec, records = build_spec(repo, mode, members, weights=weights, candidates=candidates, top_logprobs=top_logprobs)
    return repo.insert_record(_record(expert_id, spec, records, tags=tags, domain=domain))


def update_blackbox(repo: ExpertRepository, expert_id: str, *, weights: Sequence[float] | None = None,
                    candidates: Sequence[str] | None = None, top_logprobs: int | None = None) -> ExpertRecord:
    """Change the weights (or candidates, or top_logprobs) of a black-box ensemble; members stay."""
    record = repo.record(expert_id)
    if not is_blackbox(record):
        raise InvalidExpertError(f"expert {expert_id!r} is not a black-box ensemble")
    old = BlackBoxSpec.from_dict(record.spec)
    ids = [m.id for m in old.members]
    if candidates is None and old.mode == "score_select":
        candidates = list(old.candidates)
    if top_logprobs is None and old.mode == "token_mix":
        top_logprobs = old.top_logprobs
    if weights is None:
        weights = [m.weight for m in old.members]
    spec, _ = build_spec(repo, old.mode, ids, weights=weights, candidates=candidates, top_logprobs=top_logprobs)
    lineage = {**(record.lineage or {}), "parents": [{"id": m.id, "weight": m.weight} for m in spec.members]}
    return repo.registry.update_expert(expert_id, spec=spec.to_dict(), lineage=lineage)
