"""/admin/btm (Branch-Train-Merge), /admin/corpora (domain data) and /admin/evaluate (perplexity)."""

from __future__ import annotations

import json
from typing import Any, Literal

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import JSONResponse

from app.deps import require_admin
from app.protocol.admin import ExpertView
from app.protocol.btm import (AddMemberRequest, AverageRequest, BranchRequest, EvaluateRequest, ForestRequest,
                              PipelineRequest, SeedRequest, TrainRequest)
from app.protocol.common import error_responses
from app.services.btm import BTMService

router = APIRouter(tags=["admin: btm"], dependencies=[Depends(require_admin)])
ERRS = error_responses(400, 401, 403, 404, 409)
BACKGROUND = Query(True, description="false: wait for the job and answer with its result")
JOB = {**ERRS, 202: {"description": "Job accepted; follow it at /admin/jobs/{id}/events"}}


async def _svc(request: Request) -> BTMService:
    return request.app.state.btm


def _json(status_payload: tuple[int, Any]) -> JSONResponse:
    status, payload = status_payload
    return JSONResponse(json.loads(json.dumps(payload, default=str)), status_code=status)


@router.get("/admin/corpora", summary="Domain corpora: built-in domains available here, and built ones")
async def list_corpora(svc: BTMService = Depends(_svc)) -> dict[str, Any]:
    return svc.corpora()


@router.post("/admin/corpora", status_code=201, responses=ERRS, summary="Upload a corpus for a new domain")
async def upload_corpus(svc: BTMService = Depends(_svc), name: str = Form(..., examples=["recipes"]),
                        file: UploadFile = File(..., description="UTF-8 text, or JSONL with a text field"),
                        format: Literal["text", "jsonl"] = Form("text"), text_field: str = Form("text")):
    """Split deterministically into train/validation/test; non-UTF-8 or empty data is refused."""
    return await svc.upload_corpus(name, await file.read(), format, text_field)


@router.post("/admin/btm/seed", status_code=202, responses=JOB, summary="Train a seed LM on a mixture of domains")
async def seed(body: SeedRequest, svc: BTMService = Depends(_svc), background: bool = BACKGROUND):
    return _json(await svc.seed(body, background))


@router.post("/admin/btm/branch", status_code=202, responses=JOB,
             summary="Branch: a new expert from a weighted average of experts")
async def branch(body: BranchRequest, svc: BTMService = Depends(_svc), background: bool = BACKGROUND):
    """Default weights: the parents' domain posterior on a sample of `domain` (BTM §3.1)."""
    return _json(await svc.branch(body, background))


@router.post("/admin/btm/train", status_code=202, responses=JOB, summary="Train an expert on one domain")
async def train(body: TrainRequest, svc: BTMService = Depends(_svc), background: bool = BACKGROUND):
    return _json(await svc.train(body, background))


@router.post("/admin/btm/forests", status_code=201, response_model=ExpertView, responses=ERRS,
             summary="Create an ELMforest (served as a posterior-weighted ensemble)")
async def create_forest(body: ForestRequest, svc: BTMService = Depends(_svc)):
    """The cached prior is estimated on `prior.corpus` (EMA, decay 0.3) or given, else uniform."""
    return await svc.forest(body)


@router.post("/admin/btm/forests/{forest_id}/members", response_model=ExpertView, responses=ERRS,
             summary="Merge: add a trained expert to a forest")
async def add_member(forest_id: str, body: AddMemberRequest, svc: BTMService = Depends(_svc)):
    return await svc.add_member(forest_id, body.expert)


@router.post("/admin/btm/forests/{forest_id}/average", status_code=202, responses=JOB,
             summary="Collapse a forest into one model by parameter averaging (uniform or prior-weighted)")
async def average(forest_id: str, body: AverageRequest, svc: BTMService = Depends(_svc),
                  background: bool = BACKGROUND):
    return _json(await svc.average(forest_id, body.id, body.weighting, background))


@router.post("/admin/btm/pipeline", status_code=202, responses=JOB,
             summary="Seed -> branch -> train for every domain -> forest (+ average), in one job")
async def pipeline(body: PipelineRequest, svc: BTMService = Depends(_svc), background: bool = BACKGROUND):
    return _json(await svc.pipeline(body, background))


@router.post("/admin/evaluate", status_code=202, responses=JOB,
             summary="Perplexity and bits per byte of an expert, forest or average")
async def evaluate(body: EvaluateRequest, svc: BTMService = Depends(_svc), background: bool = BACKGROUND):
    """Sliding windows of `context_length` tokens advancing by `stride`: every token is scored once
    with at least context_length - stride tokens of context. Bits per byte = total NLL in bits / UTF-8
    bytes, comparable across tokenizers."""
    return _json(await svc.evaluate(body, background))
