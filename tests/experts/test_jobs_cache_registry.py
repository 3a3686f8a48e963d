"""Unit tests: job life cycle, the model cache, the registry schema; the registry and job tests on SQLite and on a
real PostgreSQL server (the `db_url` fixture)."""

from __future__ import annotations

import threading
import time

import pytest
import sqlalchemy as sa

from experts.errors import JobStateError
from experts.hf.loading import LoadedModel, ModelCache
from experts.repository.jobs import JobService
from experts.repository.registry import SCHEMA_VERSION, ExpertRecord, Registry


@pytest.fixture()
def registry(db_url):
    reg = Registry(db_url)
    reg.migrate()
    yield reg
    reg.close()


def wait_status(svc: JobService, job_id: str, statuses: tuple[str, ...], timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = svc.get(job_id).status
        if s in statuses:
            return s
        time.sleep(0.01)
    raise AssertionError(f"job stayed {svc.get(job_id).status}")


def test_job_success_failure_and_progress(registry):
    svc = JobService(registry, owner="me", workers=1)
    try:
        ok = svc.submit("t", {"a": 1}, lambda ctx: (ctx.progress(0.5, "half", force=True), {"x": 2})[1])
        assert svc.wait(ok.id, 10).status == "succeeded"
        row = svc.get(ok.id)
        assert row.result == {"x": 2} and row.progress == 1.0 and row.started_at and row.finished_at

        def boom(ctx):
            raise ValueError("bad thing")

        bad = svc.submit("t", {}, boom)
        row = svc.wait(bad.id, 10)
        assert row.status == "failed" and row.error == "bad thing"
    finally:
        svc.shutdown()


def test_cancel_running_and_queued_jobs(registry):
    svc = JobService(registry, owner="me", workers=1)
    started = threading.Event()

    def slow(ctx):
        started.set()
        for i in range(1000):
            ctx.progress(i / 1000)
            time.sleep(0.01)
        return "finished"

    try:
        running = svc.submit("slow", {}, slow)
        queued = svc.submit("slow", {}, slow)
        assert started.wait(5)
        assert svc.cancel(queued.id).status == "cancelled"
        svc.cancel(running.id)
        assert wait_status(svc, running.id, ("cancelled",)) == "cancelled"
        with pytest.raises(JobStateError):
            svc.cancel(running.id)
        assert svc.get(queued.id).started_at is None  # never ran
    finally:
        svc.shutdown()


def test_orphaned_jobs_fail_on_recover(registry):
    """At start-up: this owner's leftovers fail, and so do jobs of an owner known dead or whose lease expired;
    a job of a live replica with a valid lease keeps running."""
    from experts.repository.registry import JobRecord

    later = time.time() + 3600
    registry.insert_job(JobRecord(id="j1", kind="k", params={}, status="running", owner="me", lease_until=later))
    registry.insert_job(JobRecord(id="j2", kind="k", params={}, status="running", owner="alive", lease_until=later))
    registry.insert_job(JobRecord(id="j3", kind="k", params={}, status="running", owner="dead", lease_until=later))
    registry.insert_job(JobRecord(id="j4", kind="k", params={}, status="queued", owner="hung",
                                  lease_until=time.time() - 1))
    svc = JobService(registry, owner="me", is_dead=lambda owner: owner == "dead")
    assert svc.recover() == 3
    assert [registry.get_job(j).status for j in ("j1", "j2", "j3", "j4")] == ["failed", "running", "failed", "failed"]
    assert "hung" in registry.get_job("j4").error and "interrupted" in registry.get_job("j3").error
    svc.shutdown()


def test_cache_lru_by_count_and_bytes_with_pins():
    loads: list[str] = []

    def loader(key: str) -> LoadedModel:
        loads.append(key)
        return LoadedModel(model=key, tokenizer=None, nbytes=100)

    cache = ModelCache(loader, max_models=2, max_bytes=10_000)
    cache.get("a"), cache.get("b"), cache.get("a"), cache.get("c")  # b is least recently used
    assert set(cache.loaded()) == {"a", "c"}
    cache.pin("a")
    cache.get("b"), cache.get("d")
    assert "a" in cache.loaded() and len(cache.loaded()) == 2
    cache.max_bytes = 150  # byte bound: only one unpinned 100-byte model fits beside nothing else
    cache.get("e")
    assert set(cache.loaded()) == {"a", "e"}
    assert loads == ["a", "b", "c", "b", "d", "e"]


def test_cache_loads_once_under_concurrency():
    n = {"loads": 0}

    def loader(key: str) -> LoadedModel:
        n["loads"] += 1
        time.sleep(0.1)
        return LoadedModel(model=key, tokenizer=None, nbytes=1)

    cache = ModelCache(loader, max_models=4, max_bytes=100)
    threads = [threading.Thread(target=cache.get, args=("x",)) for _ in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert n["loads"] == 1


def test_registry_schema_version_wal_and_migration_idempotent(registry, tmp_path):
    assert registry.migrate() == SCHEMA_VERSION  # already current: nothing to do
    if registry.engine.dialect.name == "sqlite":
        with registry.engine.connect() as c:
            assert c.execute(sa.text("PRAGMA journal_mode")).scalar() == "wal"
    registry.insert_expert(ExpertRecord(id="e1", kind="remote", spec={"url": "x"}, tags=["a"]))
    again = Registry(registry.url)
    assert again.get_expert("e1").tags == ["a"] and again.get_expert("e1").spec == {"url": "x"}
    again.close()


def test_a_v1_database_is_migrated_to_jobs_with_detail(db_url):
    """A registry written by a v1 gateway (no jobs.detail) keeps its rows and gains the column (and the lease)."""
    url = db_url
    engine = sa.create_engine(url)
    with engine.begin() as c:
        c.execute(sa.text("CREATE TABLE schema_info (id INTEGER PRIMARY KEY, version INTEGER NOT NULL)"))
        c.execute(sa.text("INSERT INTO schema_info VALUES (1, 1)"))
        c.execute(sa.text("CREATE TABLE jobs (id VARCHAR(64) PRIMARY KEY, kind VARCHAR(64) NOT NULL, params JSON "
                          "NOT NULL, status VARCHAR(16) NOT NULL, progress FLOAT NOT NULL, message TEXT, result JSON, "
                          "error TEXT, owner VARCHAR(64), created_at FLOAT NOT NULL, started_at FLOAT, finished_at "
                          "FLOAT, updated_at FLOAT NOT NULL)"))
        c.execute(sa.text("INSERT INTO jobs (id, kind, params, status, progress, created_at, updated_at) "
                          "VALUES ('j1', 'merge', '{}', 'succeeded', 1.0, 1.0, 1.0)"))
    engine.dispose()
    reg = Registry(url)
    assert reg.migrate() == 1
    assert reg.get_job("j1").detail is None and reg.get_job("j1").status == "succeeded"
    assert reg.update_job("j1", detail={"queries_used": 3})
    assert reg.get_job("j1").detail == {"queries_used": 3}
    assert reg.get_job("j1").lease_until is None
    assert reg.migrate() == SCHEMA_VERSION
    reg.close()
