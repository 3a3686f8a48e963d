"""/admin/merges end to end: merged experts serve, carry their recipe, and bad recipes change nothing."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import CLIENT_KEY, build_model_dir, build_tokenizer


@pytest.fixture(scope="module")
def experts(gateway, tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("merge-experts")
    dirs = {f"mx-{i}": build_model_dir(root / f"mx-{i}", tokenizer=tokenizer, seed=10 + i) for i in range(3)}
    dirs["mx-wide"] = build_model_dir(root / "mx-wide", tokenizer=tokenizer, n_embd=96, seed=5)
    dirs["mx-othertok"] = build_model_dir(root / "mx-othertok", tokenizer=build_tokenizer(300), seed=6)
    for eid, d in dirs.items():
        gateway.register(eid, d)
    return dirs


def weights(gateway, expert_id: str) -> dict[str, torch.Tensor]:
    with gateway.admin() as c:
        path = c.get(f"/admin/experts/{expert_id}").json()["path"]
    return load_file(gateway.data_dir / path / "model.safetensors")


def test_linear_merge_is_the_weighted_mean_and_serves(gateway, experts):
    recipe = {"method": "linear", "experts": [{"id": "mx-0", "weight": 1.0}, {"id": "mx-1", "weight": 3.0}],
              "parameters": {"normalize": True}}
    with gateway.admin() as c:
        r = c.post("/admin/merges", params={"background": "false"}, json={"id": "mx-linear", "recipe": recipe})
        assert r.status_code == 201, r.text
        e = r.json()
        assert e["lineage"]["recipe"]["method"] == "linear"
        assert [p["id"] for p in e["lineage"]["parents"]] == ["mx-0", "mx-1"]
    a, b, m = weights(gateway, "mx-0"), weights(gateway, "mx-1"), weights(gateway, "mx-linear")
    assert set(m) == set(a)
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(m[k], 0.25 * a[k] + 0.75 * b[k], atol=1e-6, rtol=0)
    r = httpx.post(gateway.base + "/v1/completions", headers={"Authorization": f"Bearer {CLIENT_KEY}"},
                   json={"model": "mx-linear", "prompt": "def", "max_tokens": 5, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_ties_merge_as_a_job_with_progress(gateway, experts):
    recipe = {"method": "ties", "base": "mx-0", "experts": [{"id": "mx-1", "weight": 1.0, "density": 0.5},
                                                             {"id": "mx-2", "weight": 1.0, "density": 0.5}],
              "dtype": "bfloat16"}
    with gateway.admin() as c:
        r = c.post("/admin/merges", json={"id": "mx-ties", "recipe": recipe, "tags": ["merged"]})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        events = []
        with c.stream("GET", f"/admin/jobs/{job_id}/events") as s:
            for line in s.iter_lines():
                if line.startswith("data: {"):
                    events.append(json.loads(line[6:]))
        assert events[-1]["status"] == "succeeded", events[-1]
        assert events[-1]["result"] == {"expert": "mx-ties"}
        e = c.get("/admin/experts/mx-ties").json()
        assert e["dtype"] == "bfloat16" and e["tags"] == ["merged"] and e["lineage"]["base"] == "mx-0"
        assert e["lineage"]["recipe"]["experts"][0]["density"] == 0.5
    assert all(t.dtype == torch.bfloat16 for t in weights(gateway, "mx-ties").values() if t.is_floating_point())


def test_preview_estimates_without_writing(gateway, experts):
    recipe = {"method": "task_arithmetic", "base": "mx-0", "experts": [{"id": "mx-1", "weight": 0.5}]}
    before = {p.name for p in (gateway.data_dir / "experts").iterdir()}
    with gateway.admin() as c:
        r = c.post("/admin/merges/preview", json={"recipe": recipe, "id": "unused-id"})
        assert r.status_code == 200, r.text
        p = r.json()
    size = sum(t.numel() * t.element_size() for t in weights(gateway, "mx-0").values())
    assert p["output_bytes"] == size and p["experts"] == ["mx-0", "mx-1"] and 0 < p["peak_bytes"] < 3 * size
    assert p["recipe"]["parameters"] is not None
    assert {p.name for p in (gateway.data_dir / "experts").iterdir()} == before


@pytest.mark.parametrize("recipe, status, words", [
    ({"method": "linear", "experts": [{"id": "mx-0"}, {"id": "mx-wide"}]}, 400, "shape"),
    ({"method": "linear", "experts": [{"id": "mx-0"}, {"id": "mx-othertok"}]}, 400, "tokenizers differ"),
    ({"method": "ties", "base": "mx-0", "experts": [{"id": "mx-1", "density": 1.5}]}, 400, "density"),
    ({"method": "telepathy", "experts": [{"id": "mx-0"}]}, 400, "telepathy"),
    ({"method": "task_arithmetic", "experts": [{"id": "mx-0"}]}, 400, "base"),
    ({"method": "linear", "experts": [{"id": "mx-0"}, {"id": "ghost"}]}, 404, "ghost"),
])
def test_refusals_change_nothing(gateway, experts, recipe, status, words):
    before = {p.name for p in (gateway.data_dir / "experts").iterdir()}
    with gateway.admin() as c:
        jobs_before = len(c.get("/admin/jobs", params={"kind": "merge"}).json()["data"])
        for path in ("/admin/merges", "/admin/merges/preview"):
            r = c.post(path, json={"id": "never", "recipe": recipe})
            assert r.status_code == status, r.text
            assert words in r.json()["error"]["message"]
        assert len(c.get("/admin/jobs", params={"kind": "merge"}).json()["data"]) == jobs_before
        assert c.get("/admin/experts/never").status_code == 404
    assert {p.name for p in (gateway.data_dir / "experts").iterdir()} == before


def test_existing_output_id_is_a_conflict(gateway, experts):
    with gateway.admin() as c:
        r = c.post("/admin/merges", json={"id": "mx-0", "recipe": {"method": "linear", "experts": [{"id": "mx-1"}]}})
    assert r.status_code == 409


def test_methods_are_listed(gateway):
    with gateway.admin() as c:
        names = {m["name"] for m in c.get("/admin/merges/methods").json()}
    assert {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "slerp", "evo"} <= names
