"""The one-call BTM pipeline: seed -> (branch -> train -> merge) for every domain -> forest (+ averages).

The seed takes `seed_fraction` of the token (or time) budget (the paper uses 50%, §4.1); the rest
is split evenly between the domain experts. The first expert branches from the seed; every later
one from the weighted average of the experts already in the forest, weighted by their domain
posterior on a sample of the new domain (§3.1). The intermediate branch is not kept as an
expert: its parents and weights are recorded in the trained expert's lineage.

Pipelines are resumable. Every stage is registered with the pipeline's key (a hash of everything
that defines the request) in its lineage, in the same write as the stage itself. Running the same
request again after a crash or a cancel continues from the stages that exist, checking that each
was made by this very request; an expert of the same id made otherwise is a conflict (409), never
overwritten or reused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from experts.btm.forest import average_forest, create_forest
from experts.btm.operations import BTM, ModelSize
from experts.errors import InvalidExpertError, PipelineConflictError
from experts.repository.repo import ExpertRepository
from experts.repository.store import check_expert_id
from experts.training.config import TrainConfig

Progress = Callable[[float, str], None]


def pipeline_key(domains: list[str], budget: TrainConfig, size: ModelSize, seed_fraction: float,
                 top_k: int | None, averages: bool, branch_from: str) -> str:
    """What defines a pipeline's output, hashed: a stage made under another key is not this pipeline's."""
    spec = {"domains": domains, "budget": asdict(budget), "size": asdict(size), "seed_fraction": seed_fraction,
            "top_k": top_k, "averages": averages, "branch_from": branch_from}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def stage_ids(prefix: str, domains: list[str], averages: bool) -> list[str]:
    """Every id the pipeline registers, the intermediate branches (`-init`, removed after training) included."""
    ids = [f"{prefix}-seed"]
    for d in domains:
        ids += [f"{prefix}-{d}-init", f"{prefix}-{d}"]
    return ids + [f"{prefix}-forest"] + ([f"{prefix}-average"] if averages else [])


def existing_stages(repo: ExpertRepository, prefix: str, domains: list[str], averages: bool, key: str) -> list[str]:
    """The stages of this pipeline already registered (to resume from); PipelineConflictError (409) if an id
    is taken by an expert this pipeline request did not make, InvalidExpertError if an id is invalid."""
    if len(set(domains)) != len(domains):
        raise InvalidExpertError("the pipeline's domains must be distinct")
    found = []
    for i in stage_ids(prefix, domains, averages):
        check_expert_id(i)
        if not repo.registry.has_expert(i):
            continue
        r = repo.record(i)
        made_by = (r.lineage or {}).get("pipeline", {})
        if made_by.get("key") != key:
            why = "was made with other pipeline settings" if made_by else "was not made by a pipeline"
            raise PipelineConflictError(i, f"expert {i!r} already exists and {why}: delete it, or use another "
                                           "prefix (re-running the same request resumes it)")
        if r.status != "ready":
            raise PipelineConflictError(i, f"expert {i!r} of this pipeline is {r.status}: delete it to rebuild it")
        found.append(i)
    return found


def run_pipeline(btm: BTM, prefix: str, domains: list[str], budget: TrainConfig, *,
                 size: ModelSize = ModelSize(),
                 seed_fraction: float = 0.5, top_k: int | None = None, averages: bool = True,
                 branch_from: str = "posterior", progress: Progress | None = None,
                 should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Run (or resume) the pipeline; returns its ids, and under `resumed` the stages that already existed."""
    if not domains:
        raise ValueError("the pipeline needs at least one domain")
    if not 0.0 < seed_fraction < 1.0:
        raise ValueError("seed_fraction must be strictly between 0 and 1")
    key = pipeline_key(domains, budget, size, seed_fraction, top_k, averages, branch_from)
    have = set(existing_stages(btm.repo, prefix, domains, averages, key))
    repo = btm.repo
    for d in domains:
        btm.ensure_corpus(d)
    n_steps = 1 + len(domains) + (1 if averages else 0)
    done = {"steps": 0}

    def stage(name: str) -> Progress:
        base = done["steps"] / n_steps

        def report(f: float, msg: str) -> None:
            if progress:
                progress(base + f / n_steps, f"[{name}] {msg}")
        return report

    def finish_step() -> None:
        done["steps"] += 1

    def tag(name: str) -> dict[str, Any]:
        return {"pipeline": {"key": key, "prefix": prefix, "stage": name}}

    seed_id = f"{prefix}-seed"
    if seed_id not in have:
        btm.seed(seed_id, domains, budget.scaled(seed_fraction), size, progress=stage("seed"),
                 should_stop=should_stop, lineage=tag("seed"))
    finish_step()
    expert_budget = budget.scaled((1 - seed_fraction) / len(domains))
    members: list[str] = []
    for i, domain in enumerate(domains):
        expert_id, init_id = f"{prefix}-{domain}", f"{prefix}-{domain}-init"
        if expert_id not in have:
            parents = [seed_id] if not members or branch_from == "seed" else list(members)
            weights = None if len(parents) > 1 else [1.0]
            init = repo.record(init_id) if init_id in have else btm.branch(init_id, parents, domain, weights,
                                                                           lineage=tag("init"))
            branch_lineage = init.lineage["parents"]
            lineage = {"op": "btm.branch-train", "parents": branch_lineage,
                       "recipe": {"corpus": domain, "branched_from": branch_lineage}, **tag(domain)}
            btm.train(expert_id, init_id, domain, expert_budget, progress=stage(domain), should_stop=should_stop,
                      seed_offset=i + 1, lineage=lineage)
        if repo.registry.has_expert(init_id):
            repo.delete(init_id)  # the intermediate branch is not kept (also one a crash left behind)
        members.append(expert_id)
        finish_step()
    forest_id = f"{prefix}-forest"
    if forest_id not in have:
        create_forest(repo, forest_id, members, top_k=top_k, prior_source={"kind": "uniform"},
                      lineage={"op": "btm.pipeline", "parents": [{"id": m, "weight": 1 / len(members)}
                                                                 for m in members],
                               "recipe": {"domains": domains, "budget": asdict(budget),
                                          "seed_fraction": seed_fraction, "size": asdict(size), "seed": seed_id},
                               **tag("forest")})
    out: dict[str, Any] = {"seed": seed_id, "experts": members, "forest": forest_id}
    if averages:
        out["average"] = f"{prefix}-average"
        if out["average"] not in have:
            average_forest(repo, forest_id, out["average"], weighting="uniform", lineage=tag("average"))
        finish_step()
    out["resumed"] = [i for i in stage_ids(prefix, domains, averages) if i in have and not i.endswith("-init")]
    if progress:
        progress(1.0, "done")
    return out
