"""The one-call BTM pipeline: seed -> (branch -> train -> merge) for every domain -> forest (+ averages).

The seed takes `seed_fraction` of the token (or time) budget (the paper uses 50%, §4.1); the rest
is split evenly between the domain experts. The first expert branches from the seed; every later
one from the weighted average of the experts already in the forest, weighted by their domain
posterior on a sample of the new domain (§3.1). The intermediate branch is not kept as an
expert: its parents and weights are recorded in the trained expert's lineage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from experts.btm.forest import average_forest, create_forest
from experts.btm.operations import BTM, ModelSize
from experts.training.config import TrainConfig

Progress = Callable[[float, str], None]


def run_pipeline(btm: BTM, prefix: str, domains: list[str], budget: TrainConfig, *,
                 size: ModelSize = ModelSize(),
                 seed_fraction: float = 0.5, top_k: int | None = None, averages: bool = True,
                 branch_from: str = "posterior", progress: Progress | None = None,
                 should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    if not domains:
        raise ValueError("the pipeline needs at least one domain")
    if not 0.0 < seed_fraction < 1.0:
        raise ValueError("seed_fraction must be strictly between 0 and 1")
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

    seed_id = f"{prefix}-seed"
    btm.seed(seed_id, domains, budget.scaled(seed_fraction), size, progress=stage("seed"), should_stop=should_stop)
    finish_step()
    expert_budget = budget.scaled((1 - seed_fraction) / len(domains))
    members: list[str] = []
    for i, domain in enumerate(domains):
        parents = [seed_id] if not members or branch_from == "seed" else list(members)
        init_id = f"{prefix}-{domain}-init"
        weights = None if len(parents) > 1 else [1.0]
        init = btm.branch(init_id, parents, domain, weights)
        branch_lineage = init.lineage["parents"]
        try:
            expert = btm.train(f"{prefix}-{domain}", init_id, domain, expert_budget, progress=stage(domain),
                               should_stop=should_stop, seed_offset=i + 1)
        finally:
            btm.repo.delete(init_id)
        lineage = {**(expert.lineage or {}), "op": "btm.branch-train", "parents": branch_lineage,
                   "recipe": {"corpus": domain, "branched_from": branch_lineage}}
        btm.repo.registry.update_expert(expert.id, lineage=lineage)
        members.append(expert.id)
        finish_step()
    forest_id = f"{prefix}-forest"
    create_forest(btm.repo, forest_id, members, top_k=top_k, prior_source={"kind": "uniform"},
                  lineage={"op": "btm.pipeline", "parents": [{"id": m, "weight": 1 / len(members)} for m in members],
                           "recipe": {"domains": domains, "budget": asdict(budget), "seed_fraction": seed_fraction,
                                      "size": asdict(size), "seed": seed_id}})
    out = {"seed": seed_id, "experts": members, "forest": forest_id}
    if averages:
        out["average"] = average_forest(btm.repo, forest_id, f"{prefix}-average", weighting="uniform").id
        finish_step()
    if progress:
        progress(1.0, "done")
    return out
