"""Nothing is lost on a restart or a crash."""

from __future__ import annotations

import time

import httpx

from experts.repository.registry import JobRecord, Registry
from tests.helpers import Gateway


def complete(gw: Gateway, model: str) -> str:
    r = httpx.post(gw.base + "/v1/completions", json={"model": model, "prompt": "def f(x):", "max_tokens": 12,
                                                       "seed": 42, "temperature": 0.9}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_registry_and_outputs_survive_restart_and_crash(tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    gw = Gateway(data, admin_key=None).start()  # no admin key configured: one is generated into the data dir
    try:
        key_file = data / "admin.key"
        assert key_file.stat().st_mode & 0o077 == 0  # readable by the owner only
        gw.register("keep-me", tiny_model_dir, tags=["t"])
        with gw.admin() as c:
            c.post("/admin/experts/keep-me/pin", json={"pinned": True})
        before = complete(gw, "keep-me")
    finally:
        gw.stop(kill=True)  # a crash, not a clean shutdown

    # A job that was running when the gateway died.
    reg = Registry(f"sqlite:///{data / 'registry.db'}")
    [lock] = (data / "replicas").glob("gw-*.lock")  # the killed replica's lock file, which nobody holds now
    owner = lock.name.removesuffix(".lock")
    reg.insert_job(JobRecord(id="job-interrupted", kind="register_upload", params={}, status="running", owner=owner,
                             lease_until=time.time() + 3600))  # its lease is still valid: failed as its owner died
    reg.close()
    (data / "staging" / "debris").mkdir()  # a half-written upload

    gw2 = Gateway(data, admin_key=None)
    gw2.port, gw2.base = gw.port, gw.base
    gw2.start()
    try:
        with gw2.admin() as c:
            e = c.get("/admin/experts/keep-me").json()
            assert e["tags"] == ["t"] and e["pinned"] is True and e["loaded"] is True  # pins are re-applied
            job = c.get("/admin/jobs/job-interrupted").json()
            assert job["status"] == "failed" and "interrupted" in job["error"]
        assert complete(gw2, "keep-me") == before
        assert list((data / "staging").iterdir()) == []
    finally:
        gw2.stop()


def test_health_stays_responsive_during_long_generation(gateway):
    import threading

    from tests.helpers import CLIENT_KEY

    done = threading.Event()

    def long_request() -> None:
        httpx.post(gateway.base + "/v1/completions", headers={"Authorization": f"Bearer {CLIENT_KEY}"},
                   json={"model": "tiny", "prompt": ["x"] * 8, "max_tokens": 100, "n": 8}, timeout=120)
        done.set()

    t = threading.Thread(target=long_request)
    t.start()
    time.sleep(0.2)
    worst = 0.0
    probes = 0
    while not done.is_set() and probes < 50:
        t0 = time.perf_counter()
        assert httpx.get(gateway.base + "/health", timeout=5).status_code == 200
        worst = max(worst, time.perf_counter() - t0)
        probes += 1
        time.sleep(0.02)
    t.join(timeout=120)
    assert probes >= 1
    assert worst < 2.0  # answered while a generation was running, not queued behind it
