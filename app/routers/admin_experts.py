"""/admin/experts: register, upload, inspect, remove, load, unload, pin."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import StreamingResponse

from app.deps import AdminDep, require_admin
from app.protocol.admin import (
    DeletedView,
    ExpertList,
    ExpertView,
    JobView,
    LoadedView,
    PinRequest,
    RegisterExpertRequest,
)
from app.protocol.common import error_responses
from app.protocol.uploads import UploadedExpertView, upload_request_body
from app.routers.respond import ExpertOrJob, expert_or_job

router = APIRouter(prefix="/admin/experts", tags=["admin: experts"], dependencies=[Depends(require_admin)])
BACKGROUND = Query(False, description="Return 202 with the job at once instead of waiting for it")


@router.get("", response_model=ExpertList, responses=error_responses(401, 403), summary="List experts")
async def list_experts(admin: AdminDep, kind: str | None = Query(None, description="local | lora | remote | ensemble")):
    return {"object": "list", "data": admin.list(kind)}


@router.get("/{expert_id}", response_model=ExpertView, responses=error_responses(401, 403, 404),
            summary="Inspect an expert (metadata, lineage, recipe)")
async def get_expert(expert_id: str, admin: AdminDep):
    return admin.describe(expert_id)


@router.post("", status_code=201, response_model=ExpertOrJob,
             responses={**error_responses(400, 401, 403, 409), 202: {"description": "Job accepted (background=true)"}},
             summary="Register a model directory on the server")
async def register_expert(body: RegisterExpertRequest, admin: AdminDep, response: Response,
                          background: bool = BACKGROUND):
    """Validates the directory (config, weights against the config, tokenizer), copies it into the
    store through a staging area, and registers it as a `local` expert — or, for a PEFT LoRA
    adapter directory (adapter_config.json), as a `lora` expert on `base`."""
    status, payload = await admin.register_path(body.id, body.path, tags=body.tags, domain=body.domain,
                                                lineage=body.lineage, background=background, base=body.base)
    return expert_or_job(response, (status, payload))


@router.post("/upload", status_code=201, response_model=UploadedExpertView | JobView,
             responses={**error_responses(400, 401, 403, 409, 413, 429), 202: {"description": "Job accepted"}},
             openapi_extra={"requestBody": upload_request_body()},
             summary="Upload a model (archive or files) and register it")
async def upload_expert(request: Request, admin: AdminDep, response: Response, background: bool = BACKGROUND):
    """A multipart form: `id`, then an `archive` (tar or zip) or the model's `files`; `tags`, `domain`, and
    `base` for a LoRA adapter. The body is written straight into the data dir's staging area, under the
    upload limit (`MERGEGATE_MAX_UPLOAD_BYTES`, 413 beyond); at most `MERGEGATE_MAX_CONCURRENT_UPLOADS`
    uploads are in progress at once (429 beyond). Only the files a model directory needs are kept; the
    others are listed in `dropped_files`. Validated before anything is registered; a rejected upload
    leaves nothing behind."""
    status, payload = await admin.register_upload(request, background=background)
    response.status_code = status
    return UploadedExpertView.model_validate(payload) if status == 201 else JobView.model_validate(payload)


@router.get("/{expert_id}/export", response_class=StreamingResponse,
            responses={**error_responses(400, 401, 403, 404),
                       200: {"content": {"application/x-tar": {}}, "description": "A tar of the model directory"}},
            summary="Export an expert as a Hugging Face model directory (tar) with a model card")
async def export_expert(expert_id: str, admin: AdminDep):
    """A tar with one directory, `<id>/`: config, weights (safetensors), tokenizer files and a README.md
    model card stating the lineage from the registry (recipe, parents, search settings). Local and lora
    experts only; load it with `AutoModelForCausalLM.from_pretrained("<id>")` (peft for a lora expert)."""
    filename, chunks = await admin.export(expert_id)
    return StreamingResponse(chunks, media_type="application/x-tar",
                             headers={"Content-Disposition": f'attachment; filename="{filename}"'})


@router.delete("/{expert_id}", response_model=DeletedView, responses=error_responses(401, 403, 404, 409),
               summary="Remove an expert and its files")
async def delete_expert(expert_id: str, admin: AdminDep):
    await admin.delete(expert_id)
    return DeletedView(id=expert_id)


@router.post("/{expert_id}/load", response_model=LoadedView, responses=error_responses(401, 403, 404, 503),
             summary="Load an expert into memory now")
async def load_expert(expert_id: str, admin: AdminDep):
    return await admin.load(expert_id)


@router.post("/{expert_id}/unload", response_model=LoadedView, responses=error_responses(401, 403, 404),
             summary="Drop an expert from memory")
async def unload_expert(expert_id: str, admin: AdminDep):
    return await admin.unload(expert_id)


@router.post("/{expert_id}/pin", response_model=LoadedView, responses=error_responses(401, 403, 404),
             summary="Pin (keep resident, never evicted) or unpin an expert")
async def pin_expert(expert_id: str, admin: AdminDep, body: PinRequest | None = None):
    return await admin.pin(expert_id, True if body is None else body.pinned)
