"""The one-call BTM pipeline: seed -> (branch -> train -> merge) for every domain -> forest (+ averages).

The paper's protocol is the default (spec §1.2-1.4; experts/btm/protocol.py): the seed is the dense
model's run stopped at `seed_fraction` (0.5) of its updates, saved with its optimizer state and schedule;
every first-round expert is an exact copy of the seed that resumes them for the dense model's remaining
updates at 1/n of the batch (`batch_split="paper"`; "full": full batch, 1/n of the updates).
`branch_from="posterior"` is the older sequential variant: the first expert resumes the seed, every later
one starts (fresh optimizer) from the experts trained before it, averaged with their posterior on dev data;
that intermediate branch is not kept as an expert (its parents and weights are in the trained expert's
lineage). With a runner on the BTM (`MERGEGATE_RUNNER=ray`), the paper protocol's first-round experts,
independent of one another, are trained as parallel tasks (`train_first_round`), each into a staging dir
of the shared data dir, and registered here, in domain order, once all of them are trained; the
sequential variant stays sequential.
The forest's prior is uniform unless `prior` names target data (a corpus, split and sequence count).

Pipelines are resumable. Every stage is registered with the pipeline's key (a hash of everything
that defines the request) in its lineage, in the same write as the stage itself. Running the same
request again after a crash or a cancel continues from the stages that exist, checking that each
was made by this very request; an expert of the same id made otherwise is a conflict (409), never
overwritten or reused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

from experts.btm.forest import average_forest, create_forest, sample_sequences
from experts.btm.operations import BTM, ModelSize, TrainTask, run_train_task
from experts.btm.protocol import BRANCH_FROM, DEV_SEQUENCES, check_choice, plan_budget
from experts.errors import InvalidExpertError, PipelineConflictError
from experts.repository.repo import ExpertRepository
from experts.repository.store import check_expert_id
from experts.training.config import TrainConfig

Progress = Callable[[float, str], None]


class Runner(Protocol):
    """Runs independent tasks elsewhere (experts.training.ray_runner.RayRunner)."""

    def map(self, fn: Callable[[Any], Any], args: Sequence[Any], *, should_stop: Callable[[], bool] | None = None,
            on_done: Callable[[int, Any], None] | None = None) -> list[Any]: ...


def pipeline_key(domains: list[str], budget: TrainConfig, size: ModelSize, seed_fraction: float,
                 top_k: int | None, averages: bool, branch_from: str, batch_split: str = "paper",
                 prior: dict[str, Any] | None = None) -> str:
    """What defines a pipeline's output, hashed: a stage made under another key is not this pipeline's."""
    spec = {"domains": domains, "budget": asdict(budget), "size": asdict(size), "seed_fraction": seed_fraction,
            "top_k": top_k, "averages": averages, "branch_from": branch_from, "batch_split": batch_split,
            "prior": prior if prior and prior.get("corpus") else None}
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
                 branch_from: str = "seed", batch_split: str = "paper", prior: dict[str, Any] | None = None,
                 progress: Progress | None = None,
                 should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Run (or resume) the pipeline; returns its ids, and under `resumed` the stages that already existed."""
    if not domains:
        raise ValueError("the pipeline needs at least one domain")
    check_choice(branch_from, BRANCH_FROM, "branch_from")
    plan = plan_budget(budget, len(domains), seed_fraction=seed_fraction, batch_split=batch_split)
    key = pipeline_key(domains, budget, size, seed_fraction, top_k, averages, branch_from, batch_split, prior)
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
        btm.seed(seed_id, domains, plan.seed, size, progress=stage("seed"), should_stop=should_stop,
                 lineage=tag("seed"))
    finish_step()
    members: list[str] = []
    trained: set[str] = set()
    if btm.runner is not None and branch_from == "seed":
        todo = [(i, d) for i, d in enumerate(domains) if f"{prefix}-{d}" not in have]
        tasks = [btm.train_task(f"{prefix}-{d}", seed_id, d, plan.expert, seed_offset=i + 1, resume=True,
                                lineage=seed_lineage(seed_id, d, branch_from, tag)) for i, d in todo]
        report = stage("first round")
        trained = train_first_round(btm, btm.runner, tasks, lambda f, m: report(f * len(tasks), m), should_stop)
    for i, domain in enumerate(domains):
        expert_id, init_id = f"{prefix}-{domain}", f"{prefix}-{domain}-init"
        if expert_id not in have and expert_id not in trained:
            train_expert(btm, expert_id, seed_id, domain, members, i, branch_from=branch_from,
                         budget=budget.scaled(1 - seed_fraction).scaled(1 / len(domains)), plan_expert=plan.expert,
                         have=have, tag=tag, progress=stage(domain), should_stop=should_stop)
        if repo.registry.has_expert(init_id):
            repo.delete(init_id)  # the intermediate branch is not kept (also one a crash left behind)
        members.append(expert_id)
        finish_step()
    forest_id = f"{prefix}-forest"
    seqs, source = None, None
    if prior and prior.get("corpus"):
        tok = repo.cache.get(members[0]).tokenizer
        split, count = prior.get("split", "validation"), int(prior.get("sequences", DEV_SEQUENCES))
        seqs = sample_sequences(btm.token_ids(tok, prior["corpus"], split), count, 128)
        source = {"corpus": prior["corpus"], "split": split, "sequences": count}
    if forest_id not in have:
        create_forest(repo, forest_id, members, top_k=top_k, prior_sequences=seqs, prior_source=source,
                      lineage={"op": "btm.pipeline", "parents": [{"id": m, "weight": 1 / len(members)}
                                                                 for m in members],
                               "recipe": {"domains": domains, "budget": asdict(budget),
                                          "seed_fraction": seed_fraction, "size": asdict(size), "seed": seed_id,
                                          "branch_from": branch_from, "batch_split": batch_split, "plan": {
                                              "total_steps": plan.total_steps, "seed_steps": plan.seed_steps,
                                              "expert_batch": plan.expert.batch_size,
                                              "expert_tokens": plan.expert.max_tokens}},
                               **tag("forest")})
    out: dict[str, Any] = {"seed": seed_id, "experts": members, "forest": forest_id}
    if averages:
        out["average"] = f"{prefix}-average"
        if out["average"] not in have:
            average_forest(repo, forest_id, out["average"], weighting="prior" if seqs else "uniform",
                           lineage=tag("average"))
        finish_step()
    out["resumed"] = [i for i in stage_ids(prefix, domains, averages) if i in have and not i.endswith("-init")]
    if progress:
        progress(1.0, "done")
    return out


def train_expert(btm: BTM, expert_id: str, seed_id: str, domain: str, members: list[str], index: int, *,
                 branch_from: str, budget: TrainConfig, plan_expert: TrainConfig, have: set[str],
                 tag: Callable[[str], dict[str, Any]], progress: Progress,
                 should_stop: Callable[[], bool] | None) -> None:
    """One domain expert: a copy of the seed resuming its state (spec §1.3), or, in the sequential
    variant, a branch from the posterior-weighted average of `members` trained with a fresh optimizer."""
    init_id = f"{expert_id}-init"
    if not members or branch_from == "seed":
        lineage = seed_lineage(seed_id, domain, branch_from, tag)
        source, expert_budget, resume = seed_id, plan_expert, True
    else:
        init = btm.repo.record(init_id) if init_id in have else btm.branch(init_id, list(members), domain,
                                                                           lineage=tag("init"))
        lineage = _branch_train_lineage(init.lineage["parents"], domain, branch_from, tag)
        source, expert_budget, resume = init_id, budget, False
    btm.train(expert_id, source, domain, expert_budget, progress=progress, should_stop=should_stop,
              seed_offset=index + 1, resume=resume, lineage=lineage)


def seed_lineage(seed_id: str, domain: str, branch_from: str,
                 tag: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    """The lineage of a first-round expert: the seed, resumed on one domain."""
    return _branch_train_lineage([{"id": seed_id, "weight": 1.0}], domain, branch_from, tag)


def _branch_train_lineage(parents: list[dict[str, Any]], domain: str, branch_from: str,
                          tag: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    return {"op": "btm.branch-train", "parents": parents,
            "recipe": {"corpus": domain, "branched_from": parents, "branch_from": branch_from}, **tag(domain)}


def train_first_round(btm: BTM, runner: Runner, tasks: list[TrainTask], progress: Progress,
                      should_stop: Callable[[], bool] | None) -> set[str]:
    """Train `tasks` (independent: each resumes the seed) in parallel on `runner`, then register them in
    order in this process (validation, smoke test, row). A task that fails, or a cancel, fails the round:
    every staging is discarded and none of the round's experts is registered. Returns the ids registered."""
    def done(i: int, _: Any) -> None:
        finished.append(tasks[i].expert_id)
        progress(len(finished) / len(tasks), f"{len(finished)}/{len(tasks)} experts trained "
                                             f"({tasks[i].expert_id})")

    finished: list[str] = []
    registered: set[str] = set()
    try:
        if tasks:
            progress(0.0, f"training {len(tasks)} experts as parallel tasks")
        lineages = runner.map(run_train_task, tasks, should_stop=should_stop, on_done=done)
        for task, lineage in zip(tasks, lineages, strict=True):
            btm.register_trained(task, lineage)
            registered.add(task.expert_id)
    finally:
        for task in tasks:
            if task.expert_id not in registered:
                btm.repo.store.discard(Path(task.staging))
    return registered
