"""Admin use-cases: registering, uploading, removing, loading experts; reading and cancelling jobs.

Every registration runs as a job (so it is listed, watchable and survives in history); the
synchronous endpoints validate first, so that bad input is a 4xx before any job exists, then wait.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, BinaryIO

from anyio.to_thread import run_sync
from fastapi.encoders import jsonable_encoder

from app.errors import ApiError
from app.metrics import Metrics
from app.sse import sse_event
from experts.errors import ExpertExistsError, InvalidExpertError
from experts.hf.lora import is_adapter_dir
from experts.hf.validation import validate_model_dir
from experts.repository.jobs import TERMINAL, JobContext, JobService
from experts.repository.registry import JobRecord
from experts.repository.repo import ExpertRepository
from experts.repository.store import check_expert_id, check_upload_filename, safe_extract
from experts.runtime import Runtime

SYNC_WAIT_S = 600.0


class AdminService:
    def __init__(self, repo: ExpertRepository, jobs: JobService, runtime: Runtime, metrics: Metrics, *,
                 max_upload_bytes: int) -> None:
        self.repo = repo
        self.jobs = jobs
        self.runtime = runtime  # model loading runs on the torch thread, like generation
        self.metrics = metrics
        self.max_upload_bytes = max_upload_bytes

    def describe(self, expert_id: str) -> dict[str, Any]:
        return self.repo.describe(expert_id)

    def list(self, kind: str | None = None) -> list[dict[str, Any]]:
        loaded = self.repo.cache.loaded()
        return [{**r.to_dict(), "loaded": r.id in loaded} for r in self.repo.list(kind=kind)]

    def _precheck(self, expert_id: str) -> None:
        check_expert_id(expert_id)
        if self.repo.registry.has_expert(expert_id):
            raise ExpertExistsError(expert_id)

    def submit(self, kind: str, params: dict[str, Any], fn: Any) -> JobRecord:
        self.metrics.jobs.labels(kind).inc()
        return self.jobs.submit(kind, params, fn)

    async def finish(self, job: JobRecord, background: bool) -> tuple[int, dict[str, Any]]:
        """202 with the job in background mode; otherwise wait and return the registered expert."""
        if background:
            return 202, job.to_dict()
        done = await run_sync(self.jobs.wait, job.id, SYNC_WAIT_S)
        if done.status == "succeeded":
            if isinstance(done.result, dict) and "expert" in done.result:
                return 201, self.describe(done.result["expert"])
            return 200, done.to_dict()
        if done.status in TERMINAL:
            raise ApiError(400 if done.status == "failed" else 409,
                           f"{job.kind} {done.status}: {done.error or ''}".strip(), code=f"job_{done.status}")
        return 202, done.to_dict()

    # -- registration -------------------------------------------------------------------------
    def _validate(self, src: Path, base: str | None) -> None:
        if is_adapter_dir(src):
            self.repo.validate_adapter(src, base)
        else:
            validate_model_dir(src)

    async def register_path(self, expert_id: str, path: str, *, tags: list[str], domain: str | None,
                            lineage: dict[str, Any] | None, background: bool,
                            base: str | None = None) -> tuple[int, dict[str, Any]]:
        self._precheck(expert_id)
        src = Path(path)
        if not src.is_absolute():
            raise InvalidExpertError("path must be an absolute directory on the gateway's machine")
        if not src.is_dir():
            raise InvalidExpertError(f"{src} is not a directory on the server")
        await run_sync(self._validate, src, base)

        def run(ctx: JobContext) -> dict[str, Any]:
            ctx.progress(0.1, "copying", force=True)
            r = self.repo.register_from_dir(expert_id, src, base=base, tags=tags, domain=domain, lineage=lineage)
            return {"expert": r.id}

        job = self.submit("register_expert", {"id": expert_id, "path": path, "tags": tags, "base": base}, run)
        return await self.finish(job, background)

    def _stage_upload(self, files: list[tuple[str, BinaryIO]], archive: tuple[str, BinaryIO] | None,
                      base: str | None) -> Path:
        staging = self.repo.store.new_staging()
        try:
            if archive is not None:
                tmp = staging.with_name(staging.name + ".upload")
                try:
                    with tmp.open("wb") as out:
                        shutil.copyfileobj(archive[1], out, 1 << 20)
                    safe_extract(tmp, staging, max_bytes=self.max_upload_bytes)
                finally:
                    tmp.unlink(missing_ok=True)
            for name, fileobj in files:
                with (staging / check_upload_filename(name)).open("wb") as out:
                    shutil.copyfileobj(fileobj, out, 1 << 20)
            if archive is None and not files:
                raise InvalidExpertError("send an 'archive' (tar/zip) or the model's 'files'")
            self._validate(staging, base)
        except BaseException:
            self.repo.store.discard(staging)
            raise
        return staging

    async def register_upload(self, expert_id: str, files: list[tuple[str, BinaryIO]],
                              archive: tuple[str, BinaryIO] | None, *, tags: list[str], domain: str | None,
                              background: bool, base: str | None = None) -> tuple[int, dict[str, Any]]:
        self._precheck(expert_id)
        staging = await run_sync(self._stage_upload, files, archive, base)

        def run(ctx: JobContext) -> dict[str, Any]:
            ctx.progress(0.5, "registering", force=True)
            if is_adapter_dir(staging):
                r = self.repo.register_adapter(expert_id, staging, base=base or "", tags=tags, domain=domain)
            else:
                r = self.repo.register_staged(expert_id, staging, tags=tags, domain=domain)
            return {"expert": r.id}

        try:
            job = self.submit("register_upload", {"id": expert_id, "tags": tags}, run)
        except BaseException:
            self.repo.store.discard(staging)
            raise
        return await self.finish(job, background)

    # -- management ---------------------------------------------------------------------------
    async def delete(self, expert_id: str) -> None:
        await run_sync(self.repo.delete, expert_id)
        self.metrics.forget_model(expert_id)  # a deleted expert's series leave /metrics

    async def load(self, expert_id: str) -> dict[str, Any]:
        await self.runtime.run_torch(self.repo.load, expert_id)
        return self._loaded_view(expert_id)

    async def unload(self, expert_id: str) -> dict[str, Any]:
        await run_sync(self.repo.unload, expert_id)
        return self._loaded_view(expert_id)

    async def pin(self, expert_id: str, pinned: bool) -> dict[str, Any]:
        await self.runtime.run_torch(self.repo.pin, expert_id, pinned)
        return self._loaded_view(expert_id)

    def _loaded_view(self, expert_id: str) -> dict[str, Any]:
        return {"id": expert_id, "loaded": self.repo.cache.is_loaded(expert_id),
                "pinned": self.repo.cache.is_pinned(expert_id)}

    # -- jobs ---------------------------------------------------------------------------------
    async def job_events(self, job_id: str, poll_s: float = 0.25, max_s: float = 24 * 3600) -> AsyncIterator[str]:
        """SSE: the job's row each time it changes, ending when the job ends."""
        last = None
        deadline = time.monotonic() + max_s
        job = self.jobs.get(job_id)
        while True:
            stamp = (job.status, job.progress, job.message, job.updated_at)
            if stamp != last:
                last = stamp
                yield sse_event(jsonable_encoder(job.to_dict()))
            if job.status in TERMINAL or time.monotonic() > deadline:
                break
            await asyncio.sleep(poll_s)
            job = await run_sync(self.jobs.get, job_id)
        yield "data: [DONE]\n\n"
