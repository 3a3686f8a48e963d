"""Background jobs (uploads, merges, training, searches) with persisted state and progress.

A job's row in the registry is its source of truth: status, progress 0..1 with a message, result or error,
timestamps, the owner (the replica running it) and its lease. Workers run in threads that end when no job is
left (`JobThreads`). A job runs on the replica that accepted it (its function is a closure, not a message),
which claims it with one compare-and-set (queued -> running) and renews its lease on every heartbeat.
Whichever replica notices first fails a job whose owner is gone: at once when the owner is known to be dead (a
replica of this host whose lock is free, experts.repository.replicas; a restart of a single gateway), else
when its lease has expired (a replica killed on another host, or hung). Never left running forever. The owner
learns it lost its job (failed, or cancelled from another replica) at its next progress report, which then
raises JobCancelledError, and its final write is refused: one ending per job.

Every write of a job row that carries text from elsewhere goes through `_redacted`: `params`,
`message`, `error`, `detail` and `result` lose any secret (experts.remote.redact) before they reach the
registry, whatever produced them (a provider's error, an upstream's answer quoted in a search's progress).
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

from experts.errors import JobCancelledError, JobNotFoundError, JobStateError
from experts.hf.threads import own_cores
from experts.remote.redact import REDACTOR
from experts.repository.registry import JobRecord, Registry

log = logging.getLogger("mergegate.jobs")

TERMINAL = ("succeeded", "failed", "cancelled")
PROGRESS_WRITE_INTERVAL_S = 0.25
REDACTED_FIELDS = ("params", "message", "error", "detail", "result")
LEASE_S = 30.0
INTERRUPTED = "interrupted: the gateway stopped while this job was running"
ABANDONED = "interrupted: the gateway replica {owner} running this job stopped renewing its lease"


def _redacted(values: dict[str, Any]) -> dict[str, Any]:
    """A job row's values with every secret removed from the fields that carry text from elsewhere."""
    return {k: REDACTOR.redact_obj(v) if k in REDACTED_FIELDS else v for k, v in values.items()}


class JobContext:
    """Handed to a job's function: report progress, check for cancellation."""

    def __init__(self, service: JobService, job_id: str) -> None:
        self._service = service
        self.job_id = job_id
        self._cancel = threading.Event()
        self._last_write = 0.0
        self.done = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def check_cancelled(self) -> None:
        if self._cancel.is_set():
            raise JobCancelledError(f"job {self.job_id} was cancelled")

    def progress(self, fraction: float, message: str | None = None, *, force: bool = False,
                 detail: dict[str, Any] | None = None) -> None:
        """Record progress (throttled writes) and, optionally, the job's live `detail` (JSON);
        raises JobCancelledError if the job was cancelled."""
        self.check_cancelled()
        now = time.monotonic()
        if force or now - self._last_write >= PROGRESS_WRITE_INTERVAL_S:
            self._last_write = now
            values: dict[str, Any] = {"progress": min(max(float(fraction), 0.0), 1.0)}
            if message is not None:
                values["message"] = message
            if detail is not None:
                values["detail"] = detail
            if not self._service.registry.update_job(self.job_id, only_if_status=["running"], **_redacted(values)):
                self._lost()

    def _lost(self) -> None:
        """The row is no longer ours to write (failed after a lost lease, cancelled on another replica): stop."""
        try:
            status = self._service.registry.get_job(self.job_id).status
        except JobNotFoundError:
            status = "gone"
        if status != "running":
            self._cancel.set()
            raise JobCancelledError(f"job {self.job_id} is {status} in the registry: this replica stops it")


JobFn = Callable[[JobContext], Any]


class JobThreads:
    """At most `workers` jobs at once. A worker thread owns the cores for torch while it runs jobs and ends
    when none is queued: a thread that used torch keeps an OpenMP team for its whole life, and an idle team
    slows every op of the engine's (experts.hf.threads), so no job thread outlives its work."""

    def __init__(self, workers: int, name: str) -> None:
        self.workers = workers
        self.name = name
        self._queue: deque[Callable[[], None]] = deque()
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._count = 0

    def submit(self, fn: Callable[[], None]) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("the job workers are shut down")
            self._queue.append(fn)
            if len(self._threads) < self.workers:
                self._count += 1
                t = threading.Thread(target=self._work, name=f"{self.name}_{self._count}", daemon=True)
                self._threads.add(t)
                t.start()

    def _work(self) -> None:
        own_cores()
        while True:
            with self._lock:
                if not self._queue:
                    self._threads.discard(threading.current_thread())
                    return
                fn = self._queue.popleft()
            fn()

    def shutdown(self) -> None:
        """Drop the queued jobs and wait for the running ones."""
        with self._lock:
            self._closed = True
            self._queue.clear()
            threads = list(self._threads)
        for t in threads:
            t.join()


class JobService:
    def __init__(self, registry: Registry, *, owner: str, workers: int = 2, lease_s: float = LEASE_S,
                 is_dead: Callable[[str], bool] | None = None) -> None:
        self.registry = registry
        self.owner = owner
        self.lease_s = lease_s
        self._is_dead = is_dead  # whether another replica is known to be gone (experts.repository.replicas)
        self._pool = JobThreads(workers, "mergegate-job")
        self._contexts: dict[str, JobContext] = {}
        self._lock = threading.Lock()

    def recover(self) -> int:
        """At start-up: fail this owner's leftover jobs, and those of dead or lease-expired replicas."""
        n = self.registry.fail_orphaned_jobs(self.owner, INTERRUPTED) + self.reap()
        if n:
            log.warning("marked %d interrupted job(s) as failed", n)
        return n

    def heartbeat(self) -> int:
        """Renew the leases of the jobs this replica holds (queued or running)."""
        with self._lock:
            ids = list(self._contexts)
        return self.registry.renew_leases(self.owner, ids, time.time() + self.lease_s)

    def reap(self) -> int:
        """Fail the live jobs of other replicas known to be dead, or whose lease has expired; returns how many."""
        now, n = time.time(), 0
        expired: dict[str, list[str]] = {}
        dead: set[str] = set()
        for job_id, owner, lease in self.registry.live_jobs():
            if owner == self.owner:
                continue
            if owner is not None and self._is_dead is not None and self._is_dead(owner):
                dead.add(owner)
            elif lease is None or lease < now:
                expired.setdefault(owner or "?", []).append(job_id)
        if dead:
            n += self.registry.fail_jobs_of(sorted(dead), INTERRUPTED)
        for owner, ids in expired.items():
            n += self.registry.fail_abandoned_jobs(ids, ABANDONED.format(owner=owner), now=now)
        if n:
            log.warning("failed %d job(s) of gateway replicas that stopped (%s)", n,
                        ", ".join(sorted(dead | set(expired))))
        return n

    def submit(self, kind: str, params: dict[str, Any], fn: JobFn, *, message: str | None = None) -> JobRecord:
        job = JobRecord(id=f"job-{uuid.uuid4().hex[:16]}", kind=kind, params=REDACTOR.redact_obj(params),
                        status="queued", message=REDACTOR.redact(message or "queued"), owner=self.owner,
                        lease_until=time.time() + self.lease_s)
        self.registry.insert_job(job)
        ctx = JobContext(self, job.id)
        with self._lock:
            self._contexts[job.id] = ctx
        self._pool.submit(lambda: self._run(ctx, fn))
        return job

    def _run(self, ctx: JobContext, fn: JobFn) -> None:
        job_id = ctx.job_id
        try:
            if ctx.cancelled or not self.registry.update_job(
                job_id, only_if_status=["queued"], status="running", started_at=time.time(), message="running",
                lease_until=time.time() + self.lease_s
            ):
                return
            try:
                result = fn(ctx)
            except JobCancelledError:
                self._finish(job_id, status="cancelled", message="cancelled")
            except Exception as e:  # the job failed: record why, keep the gateway up
                log.warning("job %s failed: %s", job_id, e)
                log.debug("%s", traceback.format_exc())
                self._finish(job_id, status="failed", error=str(e) or type(e).__name__, message="failed")
            else:
                if ctx.cancelled:
                    self._finish(job_id, status="cancelled", message="cancelled")
                else:
                    self._finish(job_id, status="succeeded", progress=1.0, result=result, message="done")
        finally:
            ctx.done.set()
            with self._lock:
                self._contexts.pop(job_id, None)

    def _finish(self, job_id: str, **values: Any) -> None:
        self.registry.update_job(job_id, only_if_status=["running", "queued"], finished_at=time.time(),
                                 **_redacted(values))

    def get(self, job_id: str) -> JobRecord:
        return self.registry.get_job(job_id)

    def list(self, **filters: Any) -> list[JobRecord]:
        return self.registry.list_jobs(**filters)

    def cancel(self, job_id: str) -> JobRecord:
        job = self.registry.get_job(job_id)
        if job.status in TERMINAL:
            raise JobStateError(f"job {job_id} already {job.status}")
        with self._lock:
            ctx = self._contexts.get(job_id)
        if ctx is None:  # another replica runs it: the row says so, and its owner stops at its next progress
            if not self.registry.update_job(job_id, only_if_status=["queued", "running"], status="cancelled",
                                            message=f"cancelled (run by gateway replica {job.owner})",
                                            finished_at=time.time()):
                raise JobStateError(f"job {job_id} already {self.registry.get_job(job_id).status}")
            return self.registry.get_job(job_id)
        ctx._cancel.set()
        self.registry.update_job(job_id, only_if_status=["queued"], status="cancelled", message="cancelled",
                                 finished_at=time.time())
        return self.registry.get_job(job_id)

    def wait(self, job_id: str, timeout: float | None = None) -> JobRecord:
        """Block until the job ends (or the timeout passes) and return its row."""
        with self._lock:
            ctx = self._contexts.get(job_id)
        if ctx is not None:
            ctx.done.wait(timeout)
        return self.registry.get_job(job_id)

    def shutdown(self) -> None:
        with self._lock:
            contexts = list(self._contexts.values())
        for ctx in contexts:
            ctx._cancel.set()
        self._pool.shutdown()
        for ctx in contexts:  # queued jobs whose futures were dropped
            self.registry.update_job(ctx.job_id, only_if_status=["queued", "running"], status="cancelled",
                                     message="cancelled: the gateway shut down", finished_at=time.time())
