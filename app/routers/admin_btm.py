"""/admin/btm (Branch-Train-Merge), /admin/corpora (domain data) and /admin/evaluate (perplexity)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, File, Form, Query, Response, UploadFile

from app.deps import BTMDep, require_admin
from app.protocol.admin import ExpertView
from app.protocol.btm import (
    AddMemberRequest,
    AverageRequest,
    BranchRequest,
    EvaluateRequest,
    ForestRequest,
    PipelineRequest,
    SeedRequest,
    TrainRequest,
)
from app.protocol.common import error_responses
from app.routers.respond import ExpertOrJob, expert_or_job

router = APIRouter(tags=["admin: btm"], dependencies=[Depends(require_admin)])
ERRS = error_responses(400, 401, 403, 404, 409)
BACKGROUND = Query(True, description="false: wait for the job and answer with its result")
JOB = {**ERRS, 202: {"description": "Job accepted; follow it at /admin/jobs/{id}/events"}}


@router.get("/admin/corpora", summary="Domain corpora: built-in domains available here, and built ones")
async def list_corpora(svc: BTMDep) -> dict[str, Any]:
    return svc.corpora()


@router.post("/admin/corpora", status_code=201, responses=ERRS, summary="Upload a corpus for a new domain")
async def upload_corpus(svc: BTMDep, name: str = Form(..., examples=["recipes"], min_length=1),
                        file: UploadFile = File(..., description="UTF-8 text, or JSONL with a text field"),
                        format: Literal["text", "jsonl"] = Form("text"),
                        text_field: str = Form("text", min_length=1)):
    """Split deterministically into train/validation/test; non-UTF-8 or empty data is refused."""
    return await svc.upload_corpus(name, await file.read(), format, text_field)


@router.post("/admin/btm/seed", status_code=202, response_model=ExpertOrJob, responses=JOB,
             summary="Train a seed LM on a mixture of domains")
async def seed(response: Response, body: SeedRequest, svc: BTMDep, background: bool = BACKGROUND):
    return expert_or_job(response, await svc.seed(body, background))


@router.post("/admin/btm/branch", status_code=202, response_model=ExpertOrJob, responses=JOB,
             summary="Branch: a new expert from a weighted average of experts")
async def branch(response: Response, body: BranchRequest, svc: BTMDep, background: bool = BACKGROUND):
    """Default weights: the parents' domain posterior on a sample of `domain` (BTM §3.1)."""
    return expert_or_job(response, await svc.branch(body, background))


@router.post("/admin/btm/train", status_code=202, response_model=ExpertOrJob, responses=JOB,
             summary="Train an expert on one domain")
async def train(response: Response, body: TrainRequest, svc: BTMDep, background: bool = BACKGROUND):
    return expert_or_job(response, await svc.train(body, background))


@router.post("/admin/btm/forests", status_code=201, response_model=ExpertView, responses=ERRS,
             summary="Create an ELMforest (served as a posterior-weighted ensemble)")
async def create_forest(body: ForestRequest, svc: BTMDep):
    """The cached prior is estimated on `prior.corpus` (EMA, decay 0.3) or given, else uniform."""
    return await svc.forest(body)


@router.post("/admin/btm/forests/{forest_id}/members", response_model=ExpertView, responses=ERRS,
             summary="Merge: add a trained expert to a forest")
async def add_member(forest_id: str, body: AddMemberRequest, svc: BTMDep):
    return await svc.add_member(forest_id, body.expert)


@router.post("/admin/btm/forests/{forest_id}/average", status_code=202, response_model=ExpertOrJob, responses=JOB,
             summary="Collapse a forest into one model by parameter averaging (uniform or prior-weighted)")
async def average(response: Response, forest_id: str, body: AverageRequest, svc: BTMDep,
                  background: bool = BACKGROUND):
    return expert_or_job(response, await svc.average(forest_id, body.id, body.weighting, background))


@router.post("/admin/btm/pipeline", status_code=202, response_model=ExpertOrJob, responses=JOB,
             summary="Seed -> branch -> train for every domain -> forest (+ average), in one job")
async def pipeline(response: Response, body: PipelineRequest, svc: BTMDep, background: bool = BACKGROUND):
    return expert_or_job(response, await svc.pipeline(body, background))


@router.post("/admin/evaluate", status_code=202, response_model=ExpertOrJob, responses=JOB,
             summary="Perplexity and bits per byte of an expert, forest or average")
async def evaluate(response: Response, body: EvaluateRequest, svc: BTMDep, background: bool = BACKGROUND):
    """Sliding windows of `context_length` tokens advancing by `stride`: every token is scored once
    with at least context_length - stride tokens of context. Bits per byte = total NLL in bits / UTF-8
    bytes, comparable across tokenizers."""
    return expert_or_job(response, await svc.evaluate(body, background))
