"""Registry costs that replicas pay, on SQLite and on a throw-away PostgreSQL (tests/pg.py), and the time a
replica needs to notice a dead one.

Measured, per backend: one job's round trip through the registry (insert, claim queued -> running, 20 throttled
progress writes, finish), jobs claimed exactly once by two JobServices racing on the same rows, a heartbeat
(renew 8 leases + reap + the repository's sync over 50 experts), and a model row read (what every request
does to see registrations made on other replicas).

    .venv/bin/python bench/replicas.py            # about 20 seconds
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experts.repository.jobs import JobService
from experts.repository.registry import ExpertRecord, JobRecord, Registry
from tests.pg import PostgresServer, unavailable


def timed(fn, n: int) -> float:
    """Median milliseconds of `n` calls."""
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return statistics.median(out)


def job_round_trip(reg: Registry) -> None:
    job = reg.insert_job(JobRecord(id=f"job-{time.perf_counter_ns()}", kind="k", params={}, status="queued",
                                   owner="gw-000000000000", lease_until=time.time() + 30))
    reg.update_job(job.id, only_if_status=["queued"], status="running")
    for i in range(20):
        reg.update_job(job.id, only_if_status=["running"], progress=i / 20)
    reg.update_job(job.id, only_if_status=["running"], status="succeeded")


def claim_race(url: str, n_jobs: int = 200) -> int:
    """Two replicas try to claim every queued job; returns how many claims succeeded (== n_jobs when exactly once)."""
    regs = [Registry(url), Registry(url)]
    ids = [f"race-{i}-{time.perf_counter_ns()}" for i in range(n_jobs)]
    for i in ids:
        regs[0].insert_job(JobRecord(id=i, kind="k", params={}, status="queued"))
    wins = [0, 0]

    def claim(k: int) -> None:
        for i in ids:
            wins[k] += regs[k].update_job(i, only_if_status=["queued"], status="running", owner=f"r{k}")

    threads = [threading.Thread(target=claim, args=(k,)) for k in (0, 1)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    for r in regs:
        r.close()
    return sum(wins)


def bench(name: str, url: str) -> dict[str, float]:
    reg = Registry(url)
    reg.migrate()
    for i in range(50):
        reg.insert_expert(ExpertRecord(id=f"e{i}", kind="remote", spec={"url": "x"}))
    jobs = JobService(reg, owner="gw-111111111111", workers=1)
    for i in range(8):
        reg.insert_job(JobRecord(id=f"live-{i}", kind="k", params={}, status="running", owner=jobs.owner,
                                 lease_until=time.time() + 30))
    jobs._contexts.update({f"live-{i}": None for i in range(8)})  # type: ignore[misc]

    def beat() -> None:
        jobs.heartbeat()
        jobs.reap()
        reg.list_experts()

    out = {"job round trip (ms)": timed(lambda: job_round_trip(reg), 30),
           "heartbeat (ms)": timed(beat, 50),
           "model row read (ms)": timed(lambda: reg.get_expert("e7"), 200),
           "claims won by 2 racing replicas / 200 jobs": claim_race(url)}
    jobs._contexts.clear()
    jobs.shutdown()
    reg.close()
    print(f"{name:10s} " + "  ".join(f"{k}: {v:.2f}" for k, v in out.items()), flush=True)
    return out


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        bench("sqlite", f"sqlite:///{Path(tmp) / 'r.db'}")
    reason = unavailable()
    if reason is not None:
        print(f"postgresql: skipped ({reason})")
        return
    server = PostgresServer().start()
    try:
        bench("postgresql", server.create_database())
    finally:
        server.stop()


if __name__ == "__main__":
    main()
