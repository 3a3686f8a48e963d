"""GET /v1/models: the experts, as OpenAI model cards."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from app.deps import AdminDep, require_client
from app.protocol.common import error_responses
from app.protocol.model_cards import ModelCard, ModelList

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(require_client)])


def _card(d: dict) -> ModelCard:
    return ModelCard(id=d["id"], created=int(d["created_at"]), kind=d["kind"], context_length=d.get("context_length"),
                     tags=d.get("tags") or [], metadata={"domain": d.get("domain"), "status": d["status"]})


def _building_card(d: dict) -> ModelCard:
    return ModelCard(id=d["id"], created=int(d["created_at"]), kind=d["kind"],
                     metadata={"status": "building", "job": d["job"], "building": d["what"]})


@router.get("/models", response_model=ModelList, responses=error_responses(401), summary="List models (experts)")
async def list_models(admin: AdminDep) -> ModelList:
    """Ready experts, then the ones a running job is building (`metadata.status: building`, with the job's id:
    they answer 503 `model_building` until registered)."""
    return ModelList(data=[_card(d) for d in admin.list() if d["status"] == "ready"]
                     + [_building_card(d) for d in admin.building()])


@router.get("/models/{model_id}", response_model=ModelCard, responses=error_responses(401, 404),
            summary="Retrieve a model (expert)")
async def get_model(model_id: str, admin: AdminDep) -> ModelCard:
    building = admin.building(only=model_id)
    return _building_card(building[0]) if building else _card(admin.describe(model_id))
