"""Two gateway processes on one PostgreSQL and one data dir: what one registers the other serves, and a replica
killed (SIGKILL) in the middle of a merge has its job failed by the other, with no half-registered expert and
no staging debris left behind. Skips, saying why, where PostgreSQL cannot run (tests/pg.py)."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.helpers import Gateway, build_model_dir

REPLICA_ENV = {"MERGEGATE_HEARTBEAT_S": "0.5", "MERGEGATE_JOB_LEASE_S": "4"}


@pytest.fixture()
def shared_db(postgres):
    url = postgres.create_database()
    yield url
    postgres.drop_database(url)


def poll(fn, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = fn()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def test_two_replicas_share_experts_and_a_killed_replicas_job_fails_cleanly(tmp_path, shared_db, tokenizer,
                                                                              tiny_model_dir):
    data = tmp_path / "data"
    other = build_model_dir(tmp_path / "other", tokenizer=tokenizer, seed=5)
    env = {**REPLICA_ENV, "MERGEGATE_DATABASE_URL": shared_db}
    a = Gateway(data, extra_env={**env, "MERGEGATE_FAULT_PAUSE": "merge:registering"}).start()
    b = Gateway(data, extra_env=env).start()
    try:
        a.register("tiny", tiny_model_dir)
        b.register("other", other)  # registrations on either replica...
        with httpx.Client(base_url=b.base, timeout=60) as cb:
            assert {m["id"] for m in cb.get("/v1/models").json()["data"]} >= {"tiny", "other"}
            r = cb.post("/v1/completions", json={"model": "tiny", "prompt": "def", "max_tokens": 4})
            assert r.status_code == 200, r.text  # ...are served by the other
        with a.admin() as ca, b.admin() as cb:
            recipe = {"method": "linear", "experts": [{"id": "tiny", "weight": 0.5}, {"id": "other", "weight": 0.5}]}
            r = ca.post("/admin/merges", params={"background": "true"}, json={"id": "merged", "recipe": recipe})
            assert r.status_code == 202, r.text
            job_id = r.json()["id"]
            job = poll(lambda: (j := cb.get(f"/admin/jobs/{job_id}").json())["message"] == "registering" and j)
            assert job["status"] == "running" and job["owner"].startswith("gw-")  # B sees A's job, and its owner
            staged = [p.name for p in (data / "staging").iterdir()]
            assert any(n.startswith(job["owner"]) for n in staged), staged  # the merged model, staged by A

            a.stop(kill=True)  # SIGKILL, mid-job
            job = poll(lambda: (j := cb.get(f"/admin/jobs/{job_id}").json())["status"] != "running" and j, 30)
            assert job["status"] == "failed" and "interrupted" in job["error"], job
            assert cb.get("/admin/experts/merged").status_code == 404  # nothing half-registered
            poll(lambda: not any((data / "staging").iterdir()), 30)  # A's staging swept by B's heartbeat
            assert len(list((data / "experts").iterdir())) == 2
            r = cb.post("/v1/completions", json={"model": "other", "prompt": "x", "max_tokens": 2})
            assert r.status_code == 200  # B serves on
    finally:
        a.stop(kill=True)
        b.stop()
