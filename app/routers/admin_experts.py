"""/admin/experts: register, upload, inspect, remove, load, unload, pin."""

from __future__ import annotations

from fastapi import APIRouter, Depends, File, Form, Query, Response, UploadFile

from app.deps import AdminDep, require_admin
from app.errors import ApiError
from app.protocol.admin import DeletedView, ExpertList, ExpertView, LoadedView, PinRequest, RegisterExpertRequest
from app.protocol.common import EXPERT_ID_SCHEMA, error_responses
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


@router.post("/upload", status_code=201, response_model=ExpertOrJob,
             responses={**error_responses(400, 401, 403, 409, 413), 202: {"description": "Job accepted"}},
             summary="Upload a model (archive or files) and register it")
async def upload_expert(
    admin: AdminDep,
    response: Response,
    id: str = Form(..., description="Unique expert id", json_schema_extra=EXPERT_ID_SCHEMA),
    archive: UploadFile | None = File(None, description="A .tar, .tar.gz or .zip of the model directory"),
    files: list[UploadFile] | None = File(None, description="Or the files: config.json, model.safetensors, tokenizer"),
    tags: str = Form("", description="Comma-separated tags"),
    domain: str | None = Form(None),
    base: str | None = Form(None, description="For a LoRA adapter: the registered base expert"),
    background: bool = BACKGROUND,
):
    """Validated before anything is registered; a rejected upload leaves nothing behind."""
    if archive is not None and files:
        raise ApiError(400, "send either an archive or files, not both", code="invalid_combination")
    tag_list = [t.strip() for t in tags.split(",") if t.strip()]
    file_list = [(f.filename or "", f.file) for f in files or []]
    arch = (archive.filename or "archive", archive.file) if archive is not None else None
    status, payload = await admin.register_upload(id, file_list, arch, tags=tag_list, domain=domain,
                                                  background=background, base=base)
    return expert_or_job(response, (status, payload))


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
