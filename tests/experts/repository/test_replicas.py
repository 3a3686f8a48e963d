"""Replicas sharing one registry (SQLite and a real PostgreSQL) and one data dir, in one process: job leases,
dead replicas, cross-replica cancel, shared staging, the binding of a fresh pair, cached models changed
elsewhere. The two-process version with SIGKILL is tests/test_replicas.py."""

from __future__ import annotations

import os
import threading
import time

import pytest

from experts.errors import ExpertNotFoundError
from experts.repository import repo as repo_module
from experts.repository.binding import META_KEY, bind
from experts.repository.jobs import JobService
from experts.repository.registry import Registry
from experts.repository.replicas import Replica
from experts.repository.store import ArtifactStore
from experts.runtime import open_repository
from tests.helpers import build_model_dir


@pytest.fixture()
def two_registries(db_url):
    a, b = Registry(db_url), Registry(db_url)
    a.migrate()
    b.migrate()
    yield a, b
    a.close()
    b.close()


def endless(started: threading.Event):
    def fn(ctx):
        started.set()
        for i in range(3000):  # bounded: 30 s at most
            ctx.progress(i / 3000, f"step {i}", force=True)
            time.sleep(0.01)
        return "finished"
    return fn


def test_a_job_whose_lease_expires_is_failed_once_by_another_replica(two_registries):
    reg_a, reg_b = two_registries
    a = JobService(reg_a, owner="gw-aaaaaaaaaaaa", workers=1, lease_s=0.6)
    b = JobService(reg_b, owner="gw-bbbbbbbbbbbb", workers=1, lease_s=0.6)
    started = threading.Event()
    try:
        job = a.submit("train", {}, endless(started))
        assert started.wait(10)
        for _ in range(4):  # A's heartbeat keeps the job its own, past several lease lengths
            a.heartbeat()
            time.sleep(0.25)
            assert b.reap() == 0
        assert b.get(job.id).status == "running"
        time.sleep(0.8)  # A stops beating (hung, or killed on another host)
        assert b.reap() == 1 and b.reap() == 0  # failed exactly once
        row = a.wait(job.id, 10)  # A notices at its next progress report and stops
        assert row.status == "failed" and "gw-aaaaaaaaaaaa" in row.error and "lease" in row.error
        assert row.result is None and row.message != "done"
    finally:
        a.shutdown()
        b.shutdown()


def test_a_job_of_a_dead_replica_fails_at_once_and_cancel_works_across_replicas(tmp_path, two_registries):
    reg_a, reg_b = two_registries
    ra, rb = Replica(tmp_path).acquire(), Replica(tmp_path).acquire()
    a = JobService(reg_a, owner=ra.id, workers=1, is_dead=rb.is_dead)
    b = JobService(reg_b, owner=rb.id, workers=1, is_dead=rb.is_dead)
    started = threading.Event()
    try:
        job = a.submit("merge", {}, endless(started))
        assert started.wait(10)
        assert not rb.is_dead(ra.id) and b.reap() == 0  # alive, lease valid
        assert b.cancel(job.id).status == "cancelled"  # from the other replica
        assert a.wait(job.id, 10).status == "cancelled"

        started.clear()
        job2 = a.submit("merge", {}, endless(started))
        assert started.wait(10)
        os.close(ra._fd)  # A's process dies: the kernel drops its lock
        ra._fd = None
        assert rb.is_dead(ra.id)
        assert b.reap() == 1  # at once: the lease (30 s) has not expired
        row = a.wait(job2.id, 10)
        assert row.status == "failed" and "interrupted" in row.error
    finally:
        a.shutdown()
        b.shutdown()
        rb.release()


def test_shared_staging_keeps_a_live_replicas_work(tmp_path):
    ra, rb = Replica(tmp_path).acquire(), Replica(tmp_path).acquire()
    sa_, sb = ArtifactStore(tmp_path, replica_id=ra.id), ArtifactStore(tmp_path, replica_id=rb.id)
    upload = sa_.new_staging()
    (tmp_path / "staging" / "legacy-debris").mkdir()
    assert sb.cleanup(rb.is_dead) == 1 and upload.is_dir()  # only the debris of no replica goes
    assert rb.others_alive()
    ra.release()  # stopped (cleanly or not): its staging is debris now
    assert sb.cleanup(rb.is_dead) == 1 and not upload.exists()
    assert not rb.others_alive()
    rb.release()


def test_replicas_binding_a_fresh_pair_at_once_agree(db_url, tmp_path):
    regs = [Registry(db_url) for _ in range(4)]
    for r in regs:
        r.migrate()
    ids: list[str] = []
    threads = [threading.Thread(target=lambda r=r: ids.append(bind(r, tmp_path))) for r in regs]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    assert len(set(ids)) == 1 and len(ids) == 4
    assert regs[0].read_meta(META_KEY) == ids[0] == (tmp_path / "registry_id").read_text().strip()
    for r in regs:
        r.close()


def test_a_model_changed_or_deleted_on_another_replica_is_not_served_stale(db_url, tmp_path, tokenizer,
                                                                          monkeypatch):
    monkeypatch.setattr(repo_module, "SERVE_ROW_MAX_AGE_S", 0.2)  # how stale a served row may be (default 1 s)
    data = tmp_path / "data"
    m1 = build_model_dir(tmp_path / "m1", tokenizer=tokenizer, seed=1)
    m2 = build_model_dir(tmp_path / "m2", tokenizer=tokenizer, seed=2)
    a = open_repository(data, database_url=db_url)
    b = open_repository(data, database_url=db_url)
    try:
        assert a.replica.id != b.replica.id
        a.register_from_dir("m", m1)
        assert [r.id for r in b.list()] == ["m"]  # registered on A, visible on B
        b.load("m")
        first = b.cache.get("m").model.transformer.wte.weight.detach().clone()
        a.delete("m")
        a.register_from_dir("m", m2)  # the same id, other weights, elsewhere
        time.sleep(0.25)
        b.get("m")  # B reads the row, sees another artifact, drops its copy
        assert not b.is_loaded("m")
        b.load("m")
        assert not b.cache.get("m").model.transformer.wte.weight.equal(first)
        a.delete("m")
        assert b.sync() == 1 and not b.cache.loaded()  # deleted elsewhere: the heartbeat frees it
        with pytest.raises(ExpertNotFoundError):  # and forgets the recent row at once
            b.get("m")
    finally:
        a.close()
        b.close()
