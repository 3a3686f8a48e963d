"""How endpoints that run a job answer: 202 with the job (background), 201 with the expert it registered,
or 200 with the finished job (a job whose result is not an expert)."""

from __future__ import annotations

from typing import Any

from fastapi import Response

from app.protocol.admin import ExpertView, JobView

ExpertOrJob = ExpertView | JobView


def expert_or_job(response: Response, result: tuple[int, dict[str, Any]]) -> ExpertView | JobView:
    status, payload = result
    response.status_code = status
    return ExpertView.model_validate(payload) if status == 201 else JobView.model_validate(payload)
