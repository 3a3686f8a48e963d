"""The README's first command: `mergegate demo` builds the demo experts locally and serves them."""

from __future__ import annotations

import subprocess
import sys

import httpx
import openai

from tests.helpers import ROOT, Gateway


def test_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "app.cli", "--help"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    assert "serve" in out and "demo" in out


def test_demo_builds_then_serves_and_restarts_instantly(tmp_path):
    data = tmp_path / "data"
    gw = Gateway(data, command=("demo", "--quick")).start(timeout=300)
    try:
        client = openai.OpenAI(base_url=gw.base + "/v1", api_key="unused", max_retries=0)
        ids = {m.id for m in client.models.list()}
        assert {"demo-seed", "demo-code", "demo-python_docs", "demo-forest", "demo-average"} <= ids
        text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="demo-forest", messages=[{"role": "user", "content": "def"}], max_tokens=8, stream=True) if c.choices)
        assert isinstance(text, str)
        with gw.admin() as c:
            e = c.get("/admin/experts/demo-code").json()
            f = c.get("/admin/experts/demo-forest").json()
        assert e["lineage"]["recipe"]["corpus"] == "code" and e["lineage"]["op"] == "btm.branch-train"
        assert f["kind"] == "ensemble" and [m["id"] for m in f["spec"]["members"]] == ["demo-code", "demo-python_docs"]
        r = client.completions.create(model="demo-forest", prompt="import", max_tokens=4, logprobs=1)
        assert len(r.choices[0].logprobs.tokens) == r.usage.completion_tokens
    finally:
        gw.stop()
    log_before = gw.log.read_text()
    assert "Building the demo repository" in log_before
    gw2 = Gateway(data, command=("demo", "--quick"))
    gw2.log = gw.log
    gw2.start(timeout=120)
    try:
        assert httpx.get(gw2.base + "/v1/models").json()["data"][0]["id"].startswith("demo-")
    finally:
        gw2.stop()
    assert gw.log.read_text().count("Building the demo repository") == 1  # the second start reused it
