"""The README's first command: `mergegate demo` builds the demo experts locally and serves them."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import openai

from tests.helpers import ROOT, Gateway


def test_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "app.cli", "--help"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    assert "serve" in out and "demo" in out


def wait_job(gw: Gateway, job_id: str, timeout: float = 400) -> dict:
    deadline = time.monotonic() + timeout
    with gw.admin() as c:
        while time.monotonic() < deadline:
            job = c.get(f"/admin/jobs/{job_id}").json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return job
            time.sleep(1)
    raise AssertionError(f"job {job_id} did not end in {timeout} s")


def test_demo_serves_at_once_builds_in_the_background_and_restarts_instantly(tmp_path):
    data = tmp_path / "data"
    gw = Gateway(data, command=("demo", "--quick")).start(timeout=60)  # serves before anything is built
    try:
        client = openai.OpenAI(base_url=gw.base + "/v1", api_key="unused", max_retries=0)
        forest = httpx.get(gw.base + "/v1/models/demo-forest").json()
        assert forest["metadata"]["status"] == "building" and forest["kind"] == "ensemble"
        job_id = forest["metadata"]["job"]
        early = httpx.post(gw.base + "/v1/completions", json={"model": "demo-forest", "prompt": "x"})
        assert early.status_code == 503 and early.headers["retry-after"]
        assert early.json()["error"]["code"] == "model_building" and job_id in early.json()["error"]["message"]
        listed = {m["id"]: m["metadata"]["status"] for m in httpx.get(gw.base + "/v1/models").json()["data"]}
        assert listed["demo-forest"] == "building" and any(i.startswith("demo-pool-") for i in listed)
        with gw.admin() as c:
            assert c.get(f"/admin/jobs/{job_id}").json()["kind"] == "demo.build"

        job = wait_job(gw, job_id)
        assert job["status"] == "succeeded", job
        ids = {m.id for m in client.models.list()}
        assert {"demo-seed", "demo-code", "demo-python_docs", "demo-forest", "demo-average"} <= ids
        pool = sorted(i for i in ids if i.startswith("demo-pool-"))
        assert pool == sorted(job["result"]["pool"]) and len(pool) == 2
        assert all(m.metadata["status"] == "ready" for m in client.models.list())
        text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="demo-forest", messages=[{"role": "user", "content": "def"}], max_tokens=8, stream=True) if c.choices)
        assert isinstance(text, str)
        with gw.admin() as c:
            e = c.get("/admin/experts/demo-code").json()
            f = c.get("/admin/experts/demo-forest").json()
            a = c.get(f"/admin/experts/{pool[0]}").json()
        assert e["lineage"]["recipe"]["corpus"] == "code" and e["lineage"]["op"] == "btm.branch-train"
        assert f["kind"] == "ensemble" and [m["id"] for m in f["spec"]["members"]] == ["demo-code", "demo-python_docs"]
        assert a["kind"] == "lora" and "pool" in a["tags"]
        r = client.completions.create(model="demo-forest", prompt="import", max_tokens=4, logprobs=1)
        assert len(r.choices[0].logprobs.tokens) == r.usage.completion_tokens
        r = client.completions.create(model=pool[0], prompt="import", max_tokens=4)
        assert r.usage.completion_tokens >= 1
    finally:
        gw.stop()
    assert gw.log.read_text().count("demo expert(s) in the background") == 1
    gw2 = Gateway(data, command=("demo", "--quick"))
    gw2.log = gw.log
    gw2.start(timeout=120)
    try:
        models = httpx.get(gw2.base + "/v1/models").json()["data"]
        assert models and all(m["metadata"]["status"] == "ready" for m in models)
    finally:
        gw2.stop()
    assert gw.log.read_text().count("demo expert(s) in the background") == 1  # the second start built nothing
