"""BTM, corpora and evaluation use-cases. Checks run before a job exists, so bad input is a 4xx."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from app.protocol.btm import (
    BranchRequest,
    BudgetIn,
    EvaluateRequest,
    ForestRequest,
    PipelineRequest,
    SeedRequest,
    SizeIn,
    TrainRequest,
)
from app.services.admin import AdminService
from experts.btm.forest import average_forest, create_forest, sample_sequences
from experts.btm.operations import BTM, ModelSize
from experts.btm.pipeline import existing_stages, pipeline_key, run_pipeline
from experts.btm.protocol import plan_budget
from experts.data.corpora import add_user_corpus, available_domains, list_corpora
from experts.data.evaluation import evaluate_ids
from experts.data.tokens import tokenize_text
from experts.errors import ExpertExistsError, InvalidExpertError
from experts.hf.threads import run_sync
from experts.repository.jobs import JobContext
from experts.repository.store import check_expert_id
from experts.training.config import TrainConfig


def _budget(b: BudgetIn) -> TrainConfig:
    return b.config()


def _size(s: SizeIn) -> ModelSize:
    if s.n_embd % s.n_head:
        raise InvalidExpertError("size.n_embd must be divisible by size.n_head")
    return ModelSize(s.n_layer, s.n_embd, s.n_head, s.n_positions, s.vocab_size)


class BTMService:
    def __init__(self, admin: AdminService, btm: BTM) -> None:
        self.admin = admin
        self.btm = btm
        self.repo = admin.repo

    # -- checks -------------------------------------------------------------------------------
    def _new_id(self, expert_id: str) -> None:
        check_expert_id(expert_id)
        if self.repo.registry.has_expert(expert_id):
            raise ExpertExistsError(expert_id)

    def _domains(self, domains: list[str]) -> None:
        for d in domains:
            self.btm.ensure_corpus(d)  # UnknownCorpusError / CorpusUnavailableError -> 400

    def _job(self, kind: str, params: dict[str, Any], fn: Any, background: bool) -> Any:
        return self.admin.finish(self.admin.submit(kind, params, fn), background)

    # -- corpora ------------------------------------------------------------------------------
    def corpora(self) -> dict[str, Any]:
        built = {c.name: c.to_dict() for c in list_corpora(self.btm.corpora_root)}
        return {"available": available_domains(), "built": list(built.values())}

    async def upload_corpus(self, name: str, data: bytes, fmt: str, text_field: str) -> dict[str, Any]:
        info = await run_sync(lambda: add_user_corpus(self.btm.corpora_root, name, data, fmt, text_field))
        return info.to_dict()

    # -- operations ---------------------------------------------------------------------------
    async def seed(self, req: SeedRequest, background: bool) -> tuple[int, dict[str, Any]]:
        self._new_id(req.id)
        budget, size = _budget(req.budget), _size(req.size)
        await run_sync(self._domains, req.domains)

        def run(ctx: JobContext) -> dict[str, Any]:
            r = self.btm.seed(req.id, req.domains, budget, size, progress=ctx.progress,
                              should_stop=lambda: ctx.cancelled)
            return {"expert": r.id}

        return await self._job("btm.seed", req.model_dump(), run, background)

    async def branch(self, req: BranchRequest, background: bool) -> tuple[int, dict[str, Any]]:
        self._new_id(req.id)
        for p in req.parents:
            self.repo.record(p)
        if req.domain is not None:
            await run_sync(self._domains, [req.domain])
        if req.weights is not None and len(req.weights) != len(req.parents):
            raise InvalidExpertError(f"{len(req.parents)} parents but {len(req.weights)} weights")

        def run(ctx: JobContext) -> dict[str, Any]:
            ctx.progress(0.05, "branching", force=True)
            r = self.btm.branch(req.id, req.parents, req.domain, req.weights, prior_split=req.prior_split,
                                prior_sequences=req.prior_sequences)
            return {"expert": r.id, "weights": [p["weight"] for p in r.lineage["parents"]],
                    "weights_source": r.lineage.get("weights_source")}

        return await self._job("btm.branch", req.model_dump(), run, background)

    async def train(self, req: TrainRequest, background: bool) -> tuple[int, dict[str, Any]]:
        self._new_id(req.id)
        self.repo.record(req.source)
        budget = _budget(req.budget)
        await run_sync(self._domains, [req.domain])

        def run(ctx: JobContext) -> dict[str, Any]:
            r = self.btm.train(req.id, req.source, req.domain, budget, progress=ctx.progress,
                               should_stop=lambda: ctx.cancelled, resume=req.resume)
            return {"expert": r.id, "final_val_loss": r.lineage["train"]["final_val_loss"]}

        return await self._job("btm.train", req.model_dump(), run, background)

    async def forest(self, req: ForestRequest) -> dict[str, Any]:
        self._new_id(req.id)

        def build() -> Any:
            seqs = None
            if req.prior.corpus is not None:
                tok = self.repo.cache.get(req.members[0]).tokenizer
                ids = self.btm.token_ids(tok, req.prior.corpus, req.prior.split)
                seqs = sample_sequences(ids, req.prior.sequences, 128)
            source = ({k: v for k, v in req.prior.model_dump().items() if k != "weights"}
                      if req.prior.corpus and req.prior.weights is None else None)
            return create_forest(self.repo, req.id, req.members, prior=req.prior.weights, prior_sequences=seqs,
                                 prior_source=source, top_k=req.top_k, mode=req.posterior)

        for m in req.members:
            self.repo.record(m)
        return (await run_sync(build)).to_dict()

    async def add_member(self, forest_id: str, expert_id: str) -> dict[str, Any]:
        def update() -> Any:
            forest = self.repo.record(forest_id)
            if forest.kind != "ensemble":
                raise InvalidExpertError(f"{forest_id!r} is not a forest")
            members = [m["id"] for m in forest.spec["members"]] + [expert_id]
            src = forest.spec.get("prior_source") or {}
            seqs = None
            if src.get("corpus"):
                tok = self.repo.cache.get(members[0]).tokenizer
                seqs = sample_sequences(self.btm.token_ids(tok, src["corpus"], src["split"]), src["sequences"], 128)
            tmp = f"{forest_id}.tmp-{len(members)}"
            details = {k: v for k, v in src.items() if k in ("corpus", "split")} if seqs else None
            rec = create_forest(self.repo, tmp, members, prior_sequences=seqs, prior_source=details,
                                top_k=forest.spec.get("top_k"), mode=forest.spec.get("posterior", "paper"),
                                tags=forest.tags)
            self.repo.registry.delete_expert(tmp)
            lineage = {**(forest.lineage or {}), "parents": [{"id": m, "weight": w} for m, w in
                                                             zip(members, rec.spec["prior"])]}
            self.repo.cache.forget(forest_id)  # the next request builds the ensemble with the new member
            return self.repo.registry.update_expert(forest_id, spec=rec.spec, lineage=lineage,
                                                    num_params=rec.num_params)

        return (await run_sync(update)).to_dict()

    async def average(self, forest_id: str, output_id: str, weighting: str, background: bool
                      ) -> tuple[int, dict[str, Any]]:
        self._new_id(output_id)
        if self.repo.record(forest_id).kind != "ensemble":
            raise InvalidExpertError(f"{forest_id!r} is not a forest")

        def run(ctx: JobContext) -> dict[str, Any]:
            r = average_forest(self.repo, forest_id, output_id, weighting=weighting, progress=ctx.progress)
            return {"expert": r.id}

        return await self._job("btm.average", {"forest": forest_id, "id": output_id, "weighting": weighting},
                               run, background)

    async def pipeline(self, req: PipelineRequest, background: bool) -> tuple[int, dict[str, Any]]:
        """Run the pipeline, or resume it: stages this same request registered before (a crash, a cancel)
        are kept and skipped; an id taken by anything else is a 409 before any job."""
        budget, size = _budget(req.budget), _size(req.size)
        prior = req.prior.model_dump() if req.prior.corpus else None
        key = pipeline_key(req.domains, budget, size, req.seed_fraction, req.top_k, req.averages, req.branch_from,
                           req.batch_split, prior)
        await run_sync(existing_stages, self.repo, req.prefix, req.domains, req.averages, key)
        if req.top_k is not None and req.top_k > len(req.domains):
            raise InvalidExpertError(f"top_k must be at most the number of domains ({len(req.domains)})")
        try:
            plan_budget(budget, len(req.domains), seed_fraction=req.seed_fraction, batch_split=req.batch_split)
        except ValueError as e:
            raise InvalidExpertError(str(e)) from None
        await run_sync(self._domains, req.domains + ([req.prior.corpus] if req.prior.corpus else []))

        def run(ctx: JobContext) -> dict[str, Any]:
            return run_pipeline(self.btm, req.prefix, req.domains, budget, size=size, seed_fraction=req.seed_fraction,
                                top_k=req.top_k, averages=req.averages, branch_from=req.branch_from,
                                batch_split=req.batch_split,
                                prior=prior, progress=ctx.progress,
                                should_stop=lambda: ctx.cancelled)

        return await self._job("btm.pipeline", req.model_dump(), run, background)

    async def evaluate(self, req: EvaluateRequest, background: bool) -> tuple[int, dict[str, Any]]:
        self.repo.get(req.model)  # 404 / 503 before the job
        if req.corpus is not None:
            await run_sync(self._domains, [req.corpus])
        elif not req.text or not req.text.strip():
            raise InvalidExpertError("text is empty")

        def run(ctx: JobContext) -> dict[str, Any]:
            loaded = self.repo.cache.get(req.model)
            if req.corpus is not None:
                ids = self.btm.token_ids(loaded.tokenizer, req.corpus, req.split)
            else:
                ids = tokenize_text(loaded.tokenizer, req.text or "")
            if req.max_tokens is not None:
                ids = ids[:req.max_tokens]
            # The bytes the scored tokens (all but the first) stand for; exact for byte-level tokenizers.
            n_bytes = len(loaded.tokenizer.decode(ids[1:].tolist()).encode("utf-8"))
            ctx_len = min(req.context_length, getattr(loaded.model.config, "n_positions", req.context_length))
            res = evaluate_ids(loaded.model, ids, n_bytes, context_length=ctx_len, stride=min(req.stride, ctx_len),
                               progress=lambda f: ctx.progress(f, "scoring"))
            return {"model": req.model, "corpus": req.corpus, "split": req.split if req.corpus else None,
                    **asdict(res)}

        return await self._job("evaluate", req.model_dump(exclude={"text"}), run, background)
