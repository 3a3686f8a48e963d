"""/admin/searches: Evo-Merging search jobs against this gateway and against a second MergeGate over HTTP
(same seed, same result), progress, cancel, registration of the winner, and refusals."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.helpers import ADMIN_KEY, CLIENT_KEY, Gateway, build_adapter_dir

EXAMPLES = [
    {"prompt": "def add(a, b):\n", "completion": "    return a + b"},
    {"prompt": "Lists are", "completion": " mutable sequences."},
    {"text": "The with statement wraps the execution of a block with methods defined by a context manager."},
]
IDS = [f"se-ad-{i}" for i in range(4)]
SMALL = {"budget_stage1": 12, "budget_stage2": 12, "popsize": 4, "sigma0": 0.2}


def body(**extra) -> dict:
    return {"base": "tiny", "pool": IDS, "validation": {"examples": EXAMPLES}, "seed": 7, **SMALL, **extra}


def register_pool(gw: Gateway, tiny_model_dir, root, base_registered: bool = True) -> None:
    with gw.admin() as c:
        if not base_registered:
            gw.register("tiny", tiny_model_dir)
        for i, eid in enumerate(IDS):
            d = root / eid
            if not d.exists():
                build_adapter_dir(d, tiny_model_dir, seed=40 + i)
            r = c.post("/admin/experts", json={"id": eid, "path": str(d), "base": "tiny", "tags": ["se-pool"]})
            assert r.status_code == 201, r.text


@pytest.fixture(scope="module")
def adapters_root(tmp_path_factory):
    return tmp_path_factory.mktemp("se-adapters")


@pytest.fixture(scope="module")
def pool(gateway, tiny_model_dir, adapters_root):
    register_pool(gateway, tiny_model_dir, adapters_root)
    return IDS


@pytest.fixture(scope="module")
def provider(tmp_path_factory, tiny_model_dir, adapters_root, pool):
    """A second MergeGate holding the same base and adapters: the black-box provider."""
    gw = Gateway(tmp_path_factory.mktemp("se-provider") / "data", api_keys="provider-client-key").start()
    try:
        register_pool(gw, tiny_model_dir, adapters_root, base_registered=False)
        yield gw
    finally:
        gw.stop()


def wait_job(c: httpx.Client, job_id: str, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = c.get(f"/admin/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish")


def run(c: httpx.Client, b: dict) -> dict:
    r = c.post("/admin/searches", json=b)
    assert r.status_code == 202, r.text
    job = wait_job(c, r.json()["id"])
    assert job["status"] == "succeeded", job
    return job


def test_local_search_registers_a_servable_winner_with_its_lineage(gateway, pool):
    with gateway.admin() as c:
        job = run(c, body(name="se-evo"))
        s = job["result"]["search"]
        assert job["kind"] == "search.evo_merging" and job["result"]["expert"] == "se-evo"
        assert len(s["alpha"]) == len(s["beta"]) == 4 and s["queries"] == 24
        assert all(0 <= a <= 1 for a in s["alpha"]) and all(-1.5 <= b <= 1.5 for b in s["beta"])
        # progress: the loss-vs-queries series, one point per query, best loss never rising
        d = job["detail"]
        assert d["queries_used"] == 24 and d["queries_total"] == 24
        assert d["series"]["query"] == list(range(1, 25))
        assert s["loss"] in d["series"]["loss"] and d["series"]["best_loss"][-1] == s["loss"]
        assert d["best_alpha"] == s["alpha"] and d["best_beta"] == s["beta"]
        # the expert: a lora on tiny whose lineage says exactly how it was made
        e = c.get("/admin/experts/se-evo").json()
        assert e["kind"] == "lora"
        lin = e["lineage"]
        assert lin["recipe"]["method"] == "evo" and [x["id"] for x in lin["recipe"]["experts"]] == IDS
        assert lin["search"]["settings"]["seed"] == 7 and lin["search"]["settings"]["budget_stage1"] == 12
        assert lin["search"]["alpha"] == s["alpha"] and lin["search"]["job"] == job["id"]
    with httpx.Client(base_url=gateway.base, headers={"Authorization": f"Bearer {CLIENT_KEY}"}, timeout=60) as u:
        r = u.post("/v1/completions", json={"model": "se-evo", "prompt": "def f(", "max_tokens": 4})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_same_seed_same_result_and_lorahub(gateway, pool):
    with gateway.admin() as c:
        a = run(c, body())["result"]["search"]
        b = run(c, body())["result"]["search"]
        assert (a["alpha"], a["beta"], a["loss"]) == (b["alpha"], b["beta"], b["loss"])
        other = run(c, body(seed=8))["result"]["search"]
        assert other["alpha"] != a["alpha"]
        h = run(c, body(method="lorahub", budget=10))
        assert h["kind"] == "search.lorahub"
        hs = h["result"]["search"]
        assert hs["queries"] == 10 and hs["alpha"] == [1.0] * 4 and "expert" not in h["result"]


def test_http_provider_gives_the_in_process_result_and_registers_a_remote(gateway, pool, provider):
    with gateway.admin() as c:
        local = run(c, body())["result"]["search"]
        remote_body = body(name="se-remote", provider={"url": provider.base, "api_key": "provider-client-key",
                                                       "admin_key": provider.admin_key})
        job = run(c, remote_body)
        s = job["result"]["search"]
        assert (s["alpha"], s["beta"], s["loss"]) == (local["alpha"], local["beta"], local["loss"])
        assert s["provider"] == provider.base
        assert "provider-client-key" not in str(job)  # the key is in neither params nor result
        e = c.get("/admin/experts/se-remote").json()
        assert e["kind"] == "remote" and e["lineage"]["search"]["alpha"] == s["alpha"]
        assert "provider-client-key" not in str(e)
    with provider.admin() as p:
        assert p.get("/admin/experts/se-remote").json()["kind"] == "lora"  # materialised on the provider
    prompt = {"prompt": "Lists are", "max_tokens": 5, "temperature": 0}
    with httpx.Client(base_url=gateway.base, headers={"Authorization": f"Bearer {CLIENT_KEY}"}, timeout=60) as u:
        via = u.post("/v1/completions", json={"model": "se-remote", **prompt}).json()
    with httpx.Client(base_url=provider.base, headers={"Authorization": "Bearer provider-client-key"},
                      timeout=60) as u:
        direct = u.post("/v1/completions", json={"model": "se-remote", **prompt}).json()
    assert via["choices"][0]["text"] == direct["choices"][0]["text"]


def test_cancel_stops_promptly_and_registers_nothing(gateway, pool):
    with gateway.admin() as c:
        r = c.post("/admin/searches", json=body(name="se-cancelled", budget_stage1=5000, budget_stage2=5000))
        assert r.status_code == 202
        job_id = r.json()["id"]
        deadline = time.monotonic() + 120
        while (c.get(f"/admin/jobs/{job_id}").json().get("detail") or {}).get("queries_used", 0) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert c.post(f"/admin/jobs/{job_id}/cancel").status_code == 200
        job = wait_job(c, job_id, timeout=60)
        assert job["status"] == "cancelled" and job["detail"]["queries_used"] < 10_000
        assert c.get("/admin/experts/se-cancelled").status_code == 404


def test_refusals_are_4xx_and_start_nothing(gateway, pool):
    with gateway.admin() as c:
        before = len(c.get("/admin/jobs", params={"limit": 1000}).json()["data"])
        assert c.post("/admin/searches", json=body(base="nope")).status_code == 404
        assert c.post("/admin/searches", json=body(pool=["nope"])).status_code == 404
        assert c.post("/admin/searches", json=body(name="tiny")).status_code == 409
        for bad in (body(denoise=False, scale=False), body(budget_stage1=0, budget_stage2=0),
                    body(provider={"url": "ftp://x"}), body(popsize=1), body(unknown=1),
                    body(validation={"task": "no-such-task"})):
            r = c.post("/admin/searches", json=bad)
            assert r.status_code == 400, (bad, r.text)
            assert r.json()["error"]["message"]
        after = len(c.get("/admin/jobs", params={"limit": 1000}).json()["data"])
        assert after == before
    with httpx.Client(base_url=gateway.base, timeout=30) as anon:
        assert anon.post("/admin/searches", json=body()).status_code == 401
    # a provider that refuses: the job fails with its message, nothing is registered
    with gateway.admin() as c:
        r = c.post("/admin/searches", json=body(name="se-failed", provider={"url": gateway.base, "api_key": "wrong"}))
        job = wait_job(c, r.json()["id"])
        assert job["status"] == "failed" and "401" in job["error"]
        assert c.get("/admin/experts/se-failed").status_code == 404
    assert ADMIN_KEY not in str(job)


def test_cli_search_against_a_url_matches_the_job(gateway, pool, tmp_path):
    import json
    import os
    import subprocess
    import sys

    from tests.helpers import ROOT

    with gateway.admin() as c:
        job = run(c, body())["result"]["search"]
    out = tmp_path / "result.json"
    args = [sys.executable, "-m", "app.cli", "search", "--url", gateway.base, "--base", "tiny", "--pool", ",".join(IDS),
            "--examples", str(tmp_path / "ex.jsonl"), "--seed", "7", "--budget-stage1", "12", "--budget-stage2", "12",
            "--popsize", "4", "--sigma0", "0.2", "--name", "se-cli", "--out", str(out)]
    (tmp_path / "ex.jsonl").write_text("\n".join(json.dumps(e) for e in EXAMPLES))
    env = {**os.environ, "MERGEGATE_PROVIDER_KEY": CLIENT_KEY, "MERGEGATE_PROVIDER_ADMIN_KEY": ADMIN_KEY}
    p = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "queries" in p.stderr  # progress lines
    got = json.loads(out.read_text())
    assert (got["search"]["alpha"], got["search"]["beta"], got["search"]["loss"]) == \
        (job["alpha"], job["beta"], job["loss"])
    assert got["expert"] == "se-cli" and got["search"]["queries"] == 24
    with gateway.admin() as c:
        assert c.get("/admin/experts/se-cli").json()["kind"] == "lora"
    bad = subprocess.run([*args[:4], "--base", "tiny", "--pool", "x", "--task", "t", "--popsize", "1"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "popsize" in bad.stderr


def test_baselines_run_as_jobs_through_the_same_runner(gateway, pool):
    with gateway.admin() as c:
        u = run(c, body(method="uniform"))
        assert u["kind"] == "search.uniform" and u["result"]["search"]["queries"] == 1
        assert u["result"]["search"]["beta"] == [0.25] * 4 and u["result"]["search"]["alpha"] == [1.0] * 4
        ta = run(c, body(method="task_arithmetic", lambdas=[0.1, 0.5, 1.0]))
        s, series = ta["result"]["search"], ta["detail"]["series"]["loss"]
        assert s["queries"] == 3 and len(series) == 3
        best = min(range(3), key=lambda i: series[i])
        assert s["loss"] == series[best] and s["beta"] == [[0.1, 0.5, 1.0][best]] * 4
        bs = run(c, body(method="best_single", name="se-best-single"))
        s, series = bs["result"]["search"], bs["detail"]["series"]["loss"]
        i = min(range(4), key=lambda j: series[j])
        assert s["queries"] == 4 and s["beta"] == [float(j == i) for j in range(4)]
        assert c.get("/admin/experts/se-best-single").json()["lineage"]["search"]["method"] == "best_single"
        assert c.post("/admin/searches", json=body(method="task_arithmetic", lambdas=[2.0])).status_code == 400
