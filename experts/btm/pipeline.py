"""The one-call BTM pipeline: seed -> (branch -> train -> merge) for every domain -> forest (+ averages).

The paper's protocol is the default (spec §1.2-1.4; experts/btm/protocol.py): the seed is the dense
model's run stopped at `seed_fraction` (0.5) of its updates, saved with its optimizer state and schedule;
every first-round expert is an exact copy of the seed that resumes them for the dense model's remaining
updates at 1/n of the batch (`batch_split="paper"`; "full": full batch, 1/n of the updates).
`branch_from="posterior"` is the older sequential variant: the first expert resumes the seed, every later
one starts (fresh optimizer) from the experts trained before it, averaged with their posterior on dev data.
The forest's prior is uniform unless `prior` names target data (a corpus, split and sequence count).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from experts.btm.forest import average_forest, create_forest, sample_sequences
from experts.btm.operations import BTM, ModelSize
from experts.btm.protocol import BRANCH_FROM, DEV_SEQUENCES, check_choice, plan_budget
from experts.training.config import TrainConfig

Progress = Callable[[float, str], None]


def run_pipeline(btm: BTM, prefix: str, domains: list[str], budget: TrainConfig, *,
                 size: ModelSize = ModelSize(),
                 seed_fraction: float = 0.5, top_k: int | None = None, averages: bool = True,
                 branch_from: str = "seed", batch_split: str = "paper", prior: dict[str, Any] | None = None,
                 progress: Progress | None = None,
                 should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    if not domains:
        raise ValueError("the pipeline needs at least one domain")
    check_choice(branch_from, BRANCH_FROM, "branch_from")
    plan = plan_budget(budget, len(domains), seed_fraction=seed_fraction, batch_split=batch_split)
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
    btm.seed(seed_id, domains, plan.seed, size, progress=stage("seed"), should_stop=should_stop)
    finish_step()
    members: list[str] = []
    for i, domain in enumerate(domains):
        if not members or branch_from == "seed":  # spec §1.3: an exact copy of the seed, resuming its state
            expert = btm.train(f"{prefix}-{domain}", seed_id, domain, plan.expert, progress=stage(domain),
                               should_stop=should_stop, seed_offset=i + 1, resume=True)
            branch_lineage = [{"id": seed_id, "weight": 1.0}]
        else:  # the sequential variant: branch from the posterior-weighted average, fresh optimizer
            init_id = f"{prefix}-{domain}-init"
            init = btm.branch(init_id, list(members), domain)
            branch_lineage = init.lineage["parents"]
            try:
                expert = btm.train(f"{prefix}-{domain}", init_id, domain, budget.scaled(1 - seed_fraction)
                                   .scaled(1 / len(domains)), progress=stage(domain), should_stop=should_stop,
                                   seed_offset=i + 1)
            finally:
                btm.repo.delete(init_id)
        lineage = {**(expert.lineage or {}), "op": "btm.branch-train", "parents": branch_lineage,
                   "recipe": {"corpus": domain, "branched_from": branch_lineage, "branch_from": branch_from}}
        btm.repo.registry.update_expert(expert.id, lineage=lineage)
        members.append(expert.id)
        finish_step()
    forest_id = f"{prefix}-forest"
    seqs, source = None, None
    if prior and prior.get("corpus"):
        tok = btm.repo.cache.get(members[0]).tokenizer
        split, count = prior.get("split", "validation"), int(prior.get("sequences", DEV_SEQUENCES))
        seqs = sample_sequences(btm.token_ids(tok, prior["corpus"], split), count, 128)
        source = {"corpus": prior["corpus"], "split": split, "sequences": count}
    create_forest(btm.repo, forest_id, members, top_k=top_k, prior_sequences=seqs, prior_source=source,
                  lineage={"op": "btm.pipeline", "parents": [{"id": m, "weight": 1 / len(members)} for m in members],
                           "recipe": {"domains": domains, "budget": asdict(budget), "seed_fraction": seed_fraction,
                                      "size": asdict(size), "seed": seed_id, "branch_from": branch_from,
                                      "batch_split": batch_split, "plan": {
                                          "total_steps": plan.total_steps, "seed_steps": plan.seed_steps,
                                          "expert_batch": plan.expert.batch_size,
                                          "expert_tokens": plan.expert.max_tokens}}})
    out = {"seed": seed_id, "experts": members, "forest": forest_id}
    if averages:
        weighting = "prior" if seqs else "uniform"
        out["average"] = average_forest(btm.repo, forest_id, f"{prefix}-average", weighting=weighting).id
        finish_step()
    if progress:
        progress(1.0, "done")
    return out
