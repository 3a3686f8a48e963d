"""Fault injection for the crash suite (testing only; off unless `MERGEGATE_FAULT_PAUSE` is set).

`MERGEGATE_FAULT_PAUSE=<job kind>:<text>[;<job kind>:<text>...]` makes every job of such a kind stop
for good at its first progress message containing <text>, after writing that progress to the job row
(several kinds may pause in the same gateway, each at its own point), so a test can poll
`GET /admin/jobs/{id}` until the job is exactly there and then `kill -9` the gateway: crash points
driven by a job's progress, not by sleeps. A paused job still honours cancellation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from experts.repository.jobs import JobContext

log = logging.getLogger("mergegate.faults")

JobFn = Callable[[JobContext], Any]


class PausingContext:
    """A JobContext whose `progress` stops at the first message containing `text`."""

    def __init__(self, ctx: JobContext, text: str) -> None:
        self._ctx = ctx
        self._text = text

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ctx, name)

    def progress(self, fraction: float, message: str | None = None, *, force: bool = False,
                 detail: dict[str, Any] | None = None) -> None:
        if message is not None and self._text in message:
            self._ctx.progress(fraction, message, force=True, detail=detail)
            log.warning("fault injection: job %s paused at %r", self._ctx.job_id, message)
            while True:
                self._ctx.check_cancelled()
                time.sleep(0.1)
        self._ctx.progress(fraction, message, force=force, detail=detail)


def with_fault(spec: str | None, kind: str, fn: JobFn) -> JobFn:
    """`fn`, pausing as `spec` ('<job kind>:<text>;...') says when it names this job kind."""
    for item in (spec or "").split(";"):
        want, _, text = item.strip().partition(":")
        if want == kind and text:
            return lambda ctx: fn(PausingContext(ctx, text))  # type: ignore[arg-type]
    return fn
