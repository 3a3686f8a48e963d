"""/v1/merge/sessions: black-box merge sessions (client key); /admin/loras/train: LoRA training (admin)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Response

from app.deps import MergeSessionsDep, require_admin, require_client
from app.protocol.admin import ExpertView
from app.protocol.common import error_responses
from app.protocol.merge_sessions import (
    BatchIn,
    BatchView,
    CandidateIn,
    EvaluateView,
    LoraTrainRequest,
    MaterializeIn,
    SessionCreateRequest,
    SessionDeletedView,
    SessionView,
)
from app.routers.respond import ExpertOrJob, expert_or_job

router = APIRouter(prefix="/v1/merge/sessions", tags=["merge sessions"],
                   dependencies=[Depends(require_client)])
admin_router = APIRouter(tags=["admin: lora"], dependencies=[Depends(require_admin)])
QUERY_ERRS = error_responses(400, 401, 404, 429)



@router.post("", status_code=201, response_model=SessionView, responses=error_responses(400, 401, 404, 429),
             summary="Open a merge session over a pool of LoRA adapters on one base")
async def create_session(body: SessionCreateRequest, svc: MergeSessionsDep):
    """Loads the base privately, stacks the pool's LoRA factors and tokenizes the validation data once.
    The response's `experts` fixes the order of `alpha` and `beta` in every later call."""
    return await svc.create(body)


@router.get("/{session_id}", response_model=SessionView, responses=error_responses(401, 404),
            summary="A session: pool, budget and counters")
async def get_session(session_id: str, svc: MergeSessionsDep):
    return svc.get(session_id)


@router.post("/{session_id}/evaluate", response_model=EvaluateView, responses=QUERY_ERRS,
             summary="The validation loss of the Evo merge for (alpha, beta); one query")
async def evaluate(session_id: str, body: CandidateIn, svc: MergeSessionsDep):
    """A = sum_i beta_i S_alpha_i(A_i), B = sum_i beta_i B_i; mean token cross-entropy on the session's data
    (completion tokens only for pairs). Only the loss comes back. 429 `query_budget_exhausted` when spent."""
    return await svc.evaluate(session_id, body.alpha, body.beta)


@router.post("/{session_id}/evaluate_batch", response_model=BatchView, responses=QUERY_ERRS,
             summary="Evaluate a population of candidates in one call")
async def evaluate_batch(session_id: str, body: BatchIn, svc: MergeSessionsDep):
    """All vectors are checked and the budget must cover every candidate before anything is evaluated."""
    return await svc.evaluate_batch(session_id, [(c.alpha, c.beta) for c in body.candidates])


@router.post("/{session_id}/materialize", status_code=201, response_model=ExpertView,
             dependencies=[Depends(require_admin)], responses=error_responses(400, 401, 403, 404, 409, 429),
             summary="Register the merge for (alpha, beta) as a servable lora expert (admin key)")
async def materialize(session_id: str, body: MaterializeIn, svc: MergeSessionsDep):
    """An `evo` recipe over the session's pool: the new expert's lineage holds the coefficients. Registering
    an expert is an admin right: this call needs the admin key (a client key is a 403), and it counts as one
    query of the session's budget (429 `query_budget_exhausted` when spent)."""
    return await svc.materialize(session_id, body.alpha, body.beta, body.name, body.tags, body.domain)


@router.delete("/{session_id}", response_model=SessionDeletedView, responses=error_responses(401, 404),
               summary="Close a session and free its resident model")
async def delete_session(session_id: str, svc: MergeSessionsDep):
    return svc.delete(session_id)


@admin_router.post("/admin/loras/train", status_code=202, response_model=ExpertOrJob,
                   responses={**error_responses(400, 401, 403, 404, 409),
                              201: {"model": ExpertView, "description": "Trained (background=false)"}},
                   summary="Train a LoRA adapter on a base (a job) and register it as a lora expert")
async def train_lora(body: LoraTrainRequest, response: Response, svc: MergeSessionsDep,
                     background: bool = Query(True, description="false: wait, answer 201 with the expert")):
    """Data: a corpus (optionally part [k, K] of its train split), a task (prompt/completion pairs made from
    the corpora; loss on completion tokens), or inline examples. Lineage: op `lora.train`, the base as parent,
    the recipe and the validation loss before and after training."""
    status, payload = await svc.train_lora(body, background)
    return expert_or_job(response, (status, payload))
