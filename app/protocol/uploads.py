"""Wire models of `POST /admin/experts/upload`: the multipart form (documented here, read as a stream by
`app/services/uploads.py`) and the answer, which lists the files that were dropped."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from app.protocol.admin import ExpertView
from app.protocol.common import EXPERT_ID_SCHEMA

ARCHIVE = ("A .tar, .tar.gz, .tar.bz2, .tar.xz or .zip of the model directory (a single top folder is "
           "flattened)")
FILES = "Or the files themselves, by bare name: config.json, *.safetensors, tokenizer files..."


def upload_request_body() -> dict[str, Any]:
    """The OpenAPI requestBody of the upload endpoint: a multipart form with an `archive` or `files`, not both
    (the endpoint streams the body into the data dir instead of letting FastAPI parse it)."""
    binary = {"type": "string", "format": "binary"}
    schema = {
        "title": "UploadForm", "type": "object", "required": ["id"],
        "properties": {
            "id": {**EXPERT_ID_SCHEMA, "description": "Unique expert id (letters, digits, '.', '_', ':', '-')"},
            "archive": {**binary, "description": ARCHIVE},
            "files": {"type": "array", "items": binary, "description": FILES},
            "tags": {"type": "string", "default": "", "description": "Comma-separated tags"},
            "domain": {"type": "string"},
            "base": {"type": "string", "description": "For a LoRA adapter: the registered base expert"},
        },
    }
    return {"required": True, "content": {"multipart/form-data": {"schema": schema}}}


class UploadedExpertView(ExpertView):
    dropped_files: list[str] = Field(default_factory=list, description="Files of the upload a model directory does "
                                     "not need (anything but config, weights, tokenizer, generation config, chat "
                                     "template, README / model card): not stored")
