"""ELMforests: named sets of experts served as a posterior-weighted ensemble (kind `ensemble`).

The spec of an `ensemble` record: `members` (ids and domains), the cached `prior` over them
(BTM §2: an EMA, decay 0.3, of posteriors over a few held-out sequences of the target data,
then frozen; uniform when no target data is given), `top_k`, and the `posterior` form
("paper": from the whole context; "reference": previous token's likelihood × prior).
"""

from __future__ import annotations

from typing import Any

import torch

from experts.btm.mixture import EnsembleLM, estimate_prior
from experts.errors import InvalidExpertError
from experts.hf.loading import LoadedModel, model_nbytes
from experts.repository.merges import MergeRunner
from experts.repository.registry import ExpertRecord
from experts.repository.repo import ExpertRepository
from experts.repository.store import check_expert_id
from merging.recipe import MergeRecipe

MEMBER_KINDS = ("local", "lora")


def _members(repo: ExpertRepository, ids: list[str]) -> list[ExpertRecord]:
    if not ids:
        raise InvalidExpertError("a forest needs at least one member")
    if len(set(ids)) != len(ids):
        raise InvalidExpertError("a forest lists each member once")
    records = [repo.record(i) for i in ids]
    for r in records:
        if r.kind not in MEMBER_KINDS:
            raise InvalidExpertError(f"forest members must be local or lora experts; {r.id!r} is {r.kind}")
    fps = {r.tokenizer_fingerprint for r in records}
    if len(fps) > 1:
        raise InvalidExpertError("forest members must share one tokenizer (their tokenizer fingerprints differ)")
    return records


def estimate_forest_prior(repo: ExpertRepository, ids: list[str], sequences: list[list[int]], *,
                          mode: str = "paper") -> list[float]:
    models = [repo.cache.get(i).model for i in ids]
    return [float(x) for x in estimate_prior(models, sequences, decay=0.3, mode=mode)]


def sample_sequences(ids: torch.Tensor, n: int, length: int) -> list[list[int]]:
    """n evenly spaced held-out sequences of `length` tokens."""
    total = int(ids.numel())
    if total < 2:
        raise InvalidExpertError("the target data is too short to estimate a prior")
    n = max(1, min(n, total // max(length, 1) or 1))
    step = max(1, total // n)
    return [ids[i * step:i * step + length].tolist() for i in range(n)]


def create_forest(repo: ExpertRepository, forest_id: str, member_ids: list[str], *,
                  prior: list[float] | None = None, prior_sequences: list[list[int]] | None = None,
                  prior_source: dict[str, Any] | None = None, top_k: int | None = None, mode: str = "paper",
                  tags: list[str] | None = None, lineage: dict[str, Any] | None = None) -> ExpertRecord:
    check_expert_id(forest_id)
    records = _members(repo, member_ids)
    if mode not in ("paper", "reference"):
        raise InvalidExpertError("posterior must be 'paper' or 'reference'")
    if top_k is not None and not 1 <= top_k <= len(records):
        raise InvalidExpertError(f"top_k must be between 1 and {len(records)}")
    # what the prior really is, recorded as such: `prior_source` only adds details (corpus, split)
    if prior is not None:
        kind: dict[str, Any] = {"kind": "explicit"}
    elif prior_sequences:
        prior = estimate_forest_prior(repo, member_ids, prior_sequences, mode=mode)
        kind = {"kind": "estimated", "sequences": len(prior_sequences)}  # spec §2.3: EMA over dev sequences
    else:
        prior = [1.0 / len(records)] * len(records)
        kind = {"kind": "uniform"}
    if len(prior) != len(records) or any(p < 0 for p in prior) or sum(prior) <= 0:
        raise InvalidExpertError("prior must have one non-negative weight per member, not all zero")
    total = sum(prior)
    spec = {"members": [{"id": r.id, "domain": r.domain} for r in records], "prior": [p / total for p in prior],
            "top_k": top_k, "posterior": mode,
            "prior_source": {**(prior_source or {}), **kind}}
    ctx = min(r.context_length or 0 for r in records) or None
    record = ExpertRecord(id=forest_id, kind="ensemble", status="ready", architecture="ELMforest",
                          num_params=sum(r.num_params or 0 for r in records), dtype=records[0].dtype,
                          context_length=ctx, tokenizer_fingerprint=records[0].tokenizer_fingerprint,
                          tags=list(tags or ["btm", "forest"]), spec=spec,
                          lineage=lineage or {"op": "btm.forest", "parents": [
                              {"id": r.id, "weight": w} for r, w in zip(records, spec["prior"])]})
    return repo.insert_record(record)


def load_forest(repo: ExpertRepository, record: ExpertRecord) -> LoadedModel:
    members = [repo.cache.get(m["id"]) for m in record.spec["members"]]
    ens = EnsembleLM([m.model for m in members], torch.tensor(record.spec["prior"]), top_k=record.spec.get("top_k"),
                     mode=record.spec.get("posterior", "paper"))
    ens.eval()
    return LoadedModel(ens, members[0].tokenizer, model_nbytes(ens) if isinstance(ens, torch.nn.Module) else 0)


def average_forest(repo: ExpertRepository, forest_id: str, output_id: str, *, weighting: str = "uniform",
                   progress: Any = None, lineage: dict[str, Any] | None = None) -> ExpertRecord:
    """Collapse a forest into one model: uniform or prior-weighted parameter average (BTM §4.4)."""
    forest = repo.record(forest_id)
    if forest.kind != "ensemble":
        raise InvalidExpertError(f"{forest_id!r} is not a forest")
    if weighting not in ("uniform", "prior"):
        raise InvalidExpertError("weighting must be 'uniform' or 'prior'")
    ids = [m["id"] for m in forest.spec["members"]]
    weights = forest.spec["prior"] if weighting == "prior" else [1.0 / len(ids)] * len(ids)
    recipe = MergeRecipe.model_validate({"method": "linear", "parameters": {"normalize": True},
                                         "experts": [{"id": i, "weight": w} for i, w in zip(ids, weights)]})
    extra = {"op": f"btm.average.{weighting}", "forest": forest_id, **(lineage or {})}
    return MergeRunner(repo).run(recipe, output_id, tags=["btm", "average", weighting], progress=progress,
                                 extra_lineage=extra)
