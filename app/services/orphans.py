"""Orphans: artifacts without a registry row, quarantined in `<data dir>/orphans` at start-up (never deleted
on a guess). An admin lists them, adopts one (validated and registered like any upload, in a job) or
deletes one explicitly."""

from __future__ import annotations

from typing import Any

from app.protocol.orphans import AdoptOrphanRequest
from app.services.admin import AdminService
from experts.hf.threads import run_sync
from experts.repository.jobs import JobContext


class OrphanService:
    def __init__(self, admin: AdminService) -> None:
        self.admin = admin
        self.store = admin.repo.store

    async def list(self) -> list[dict[str, Any]]:
        return [o.to_dict() for o in await run_sync(self.store.list_orphans)]

    async def adopt(self, name: str, req: AdoptOrphanRequest, background: bool) -> tuple[int, dict[str, Any]]:
        """The same checks as a registration, before any job (a 4xx leaves the orphan in place); the job
        registers it and removes the orphan."""
        src = self.store.orphan_path(name)  # 404
        self.admin.check_new_id(req.id)
        await run_sync(self.admin.validate_dir, src, req.base)
        repo = self.admin.repo

        def run(ctx: JobContext) -> dict[str, Any]:
            ctx.progress(0.1, "adopting", force=True)
            r = repo.adopt_orphan(name, req.id, base=req.base, tags=req.tags, domain=req.domain)
            return {"expert": r.id, "orphan": name}

        job = self.admin.submit("adopt_orphan", {"orphan": name, **req.model_dump()}, run)
        return await self.admin.finish(job, background)

    async def delete(self, name: str) -> dict[str, Any]:
        await run_sync(self.store.delete_orphan, name)
        return {"name": name, "object": "orphan", "deleted": True}
