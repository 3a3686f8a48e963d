"""Admin use-cases: registering, uploading, removing, loading experts; reading and cancelling jobs.

Every registration runs as a job (so it is listed, watchable and survives in history); the
synchronous endpoints validate first, so that bad input is a 4xx before any job exists, then wait.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

from fastapi.encoders import jsonable_encoder
from starlette.requests import Request

from app.errors import ApiError
from app.metrics import Metrics
from app.services.faults import with_fault
from app.services.uploads import ReceivedUpload, UploadReceiver, UploadSlots
from app.sse import sse_event
from experts.errors import ExpertExistsError, InvalidExpertError
from experts.hf.foreign import check_not_foreign
from experts.hf.lora import is_adapter_dir
from experts.hf.threads import run_sync
from experts.hf.validation import is_model_file, validate_model_dir
from experts.repository.archives import safe_extract
from experts.repository.export import export_files, tar_stream
from experts.repository.jobs import TERMINAL, JobContext, JobService
from experts.repository.lineage import lineage_graph
from experts.repository.registry import JobRecord
from experts.repository.repo import ExpertRepository
from experts.repository.store import check_expert_id
from experts.runtime import Runtime

SYNC_WAIT_S = 600.0


class AdminService:
    def __init__(self, repo: ExpertRepository, jobs: JobService, runtime: Runtime, metrics: Metrics, *,
                 max_upload_bytes: int, max_concurrent_uploads: int = 2, fault_pause: str | None = None) -> None:
        self.repo = repo
        self.jobs = jobs
        self.runtime = runtime  # model loading runs on the torch thread, like generation
        self.metrics = metrics
        self.max_upload_bytes = max_upload_bytes
        self.upload_slots = UploadSlots(max_concurrent_uploads)
        self.fault_pause = fault_pause  # testing only (app/services/faults.py)
        self._tasks: set[asyncio.Task[None]] = set()

    def describe(self, expert_id: str) -> dict[str, Any]:
        return self.repo.describe(expert_id)

    def list(self, kind: str | None = None) -> list[dict[str, Any]]:
        return [{**r.to_dict(), "loaded": self.repo.is_loaded(r.id)} for r in self.repo.list(kind=kind)]

    def building(self, only: str | None = None) -> list[dict[str, Any]]:
        """Experts a running job will register (not yet in the registry): id, kind, job, since; `only`: that id.
        In memory, plus one registry read when anything is planned."""
        planned = [(i, p) for i, p in self.repo.building.items() if only is None or i == only]
        if not planned:
            return []
        registered = {r.id for r in self.repo.list()}
        return [{"id": i, "kind": p.kind, "job": p.job_id, "what": p.what, "created_at": p.since}
                for i, p in planned if i not in registered]

    def lineage(self) -> dict[str, Any]:
        return lineage_graph(self.repo.list())

    def check_new_id(self, expert_id: str) -> None:
        check_expert_id(expert_id)
        if self.repo.registry.has_expert(expert_id):
            raise ExpertExistsError(expert_id)

    def submit(self, kind: str, params: dict[str, Any], fn: Any) -> JobRecord:
        self.metrics.jobs.labels(kind).inc()
        return self.jobs.submit(kind, params, with_fault(self.fault_pause, kind, fn))

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
    def validate_dir(self, src: Path, base: str | None, dropped: list[str] | None = None) -> None:
        check_not_foreign(src, dropped or ())  # GGUF, quantised, pickled: a 400 saying what to do
        if is_adapter_dir(src):
            self.repo.validate_adapter(src, base)
        else:
            validate_model_dir(src)

    async def register_path(self, expert_id: str, path: str, *, tags: list[str], domain: str | None,
                            lineage: dict[str, Any] | None, background: bool,
                            base: str | None = None) -> tuple[int, dict[str, Any]]:
        self.check_new_id(expert_id)
        src = Path(path)
        if not src.is_absolute():
            raise InvalidExpertError("path must be an absolute directory on the gateway's machine")
        if not src.is_dir():
            raise InvalidExpertError(f"{src} is not a directory on the server")
        await run_sync(self.validate_dir, src, base)

        def run(ctx: JobContext) -> dict[str, Any]:
            ctx.progress(0.1, "copying", force=True)
            r = self.repo.register_from_dir(expert_id, src, base=base, tags=tags, domain=domain, lineage=lineage)
            return {"expert": r.id}

        job = self.submit("register_expert", {"id": expert_id, "path": path, "tags": tags, "base": base}, run)
        return await self.finish(job, background)

    async def register_upload(self, request: Request, *, background: bool) -> tuple[int, dict[str, Any]]:
        """Receive a multipart upload into the data dir's staging area (one of `max_concurrent_uploads`
        slots, held until its job ends), validate it, and register it in a job. Files a model directory
        does not need are dropped and listed in `dropped_files`."""
        release = self.upload_slots.acquire()
        staging = self.repo.store.new_staging()
        spool = staging.with_name(staging.name + ".upload")
        job = None
        try:
            receiver = UploadReceiver(staging, spool, max_bytes=self.max_upload_bytes, keep=is_model_file,
                                      on_field=lambda name, value: self.check_new_id(value) if name == "id" else None)
            form = await receiver.receive(request)
            expert_id = form.fields.get("id")
            if not expert_id:
                raise ApiError(400, "id: the form field 'id' is required", param="id")
            self.check_new_id(expert_id)
            tags = [t.strip() for t in form.fields.get("tags", "").split(",") if t.strip()]
            domain, base = form.fields.get("domain") or None, form.fields.get("base") or None
            dropped = await run_sync(self._unpack, form, staging, spool, base)

            def run(ctx: JobContext) -> dict[str, Any]:
                ctx.progress(0.5, "registering", force=True)
                if is_adapter_dir(staging):
                    r = self.repo.register_adapter(expert_id, staging, base=base or "", tags=tags, domain=domain)
                else:
                    r = self.repo.register_staged(expert_id, staging, tags=tags, domain=domain)
                return {"expert": r.id, "dropped_files": dropped}

            job = self.submit("register_upload", {"id": expert_id, "tags": tags, "dropped_files": dropped}, run)
        finally:
            spool.unlink(missing_ok=True)
            if job is None:
                self.repo.store.discard(staging)
                release()
        self._when_done(job.id, release, staging)
        status, payload = await self.finish(job, background)
        return status, ({**payload, "dropped_files": dropped} if status == 201 else payload)

    def _unpack(self, form: ReceivedUpload, staging: Path, spool: Path, base: str | None) -> list[str]:
        """Extract the archive (if one was sent) and validate the staged directory; returns what was dropped."""
        dropped = list(form.dropped)
        if form.archive is not None:
            dropped += safe_extract(spool, staging, max_bytes=self.max_upload_bytes, keep=is_model_file).dropped
            spool.unlink(missing_ok=True)
        elif not form.files:
            raise InvalidExpertError("send an 'archive' (tar/zip) or the model's 'files'")
        self.validate_dir(staging, base, dropped)
        return dropped

    def _when_done(self, job_id: str, release: Callable[[], None], staging: Path) -> None:
        """Once the job ends (however: it may be cancelled before it runs), free the upload's slot and
        remove its staging directory if the job left it (a committed upload has already moved it)."""
        async def wait() -> None:
            try:
                while (await run_sync(self.jobs.wait, job_id, 5.0)).status not in TERMINAL:
                    pass
                await run_sync(self.repo.store.discard, staging)
            finally:
                release()

        task = asyncio.get_running_loop().create_task(wait())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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

    async def export(self, expert_id: str) -> tuple[str, Iterator[bytes]]:
        """(file name, tar chunks): checked (404, 400) before the first byte is sent."""
        name, entries = await run_sync(export_files, self.repo, expert_id)
        return f"{name}.tar", tar_stream(entries)

    def _loaded_view(self, expert_id: str) -> dict[str, Any]:
        return {"id": expert_id, "loaded": self.repo.is_loaded(expert_id),
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
