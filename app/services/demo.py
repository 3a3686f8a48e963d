"""The demo repository built in the background while the gateway serves (`mergegate demo`).

At start-up, if any demo expert is missing, one `demo.build` job builds (or resumes building) them; until
each is registered it is listed by /v1/models with status `building` and answers 503 `model_building`
with the job's id. Watch it like any job (GET /admin/jobs/{id}, its SSE events, the console).
"""

from __future__ import annotations

import logging
from typing import Any

from app.services.admin import AdminService
from experts.btm.demo import build_demo, demo_plan
from experts.repository.jobs import TERMINAL, JobContext
from experts.repository.registry import JobRecord

log = logging.getLogger("mergegate.demo")


class DemoService:
    def __init__(self, admin: AdminService, *, quick: bool) -> None:
        self.admin, self.repo, self.quick = admin, admin.repo, quick

    def start(self) -> JobRecord | None:
        """Submit the build job if any demo expert is missing; None when the demo is complete."""
        plan = demo_plan(self.quick)
        missing = [(i, kind) for i, kind in plan if not self.repo.registry.has_expert(i)]
        if not missing:
            return None
        data_dir = self.repo.store.root

        def run(ctx: JobContext) -> dict[str, Any]:
            try:
                return build_demo(self.repo, data_dir, quick=self.quick, progress=ctx.progress,
                                  should_stop=lambda: ctx.cancelled)
            finally:
                self.repo.building.clear(ctx.job_id)

        job = self.admin.submit("demo.build", {"quick": self.quick, "experts": [i for i, _ in plan]}, run)
        self.repo.building.mark(missing, job.id, "the demo repository")
        if self.admin.jobs.get(job.id).status in TERMINAL:  # it ended before the marks were set
            self.repo.building.clear(job.id)
        log.warning("building %d demo expert(s) in the background: job %s (GET /admin/jobs/%s)",
                    len(missing), job.id, job.id)
        return job
