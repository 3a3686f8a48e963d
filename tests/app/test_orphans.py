"""The issue's scenario through the real command: a copied data dir started against another database
refuses to start and leaves every file in place; re-binding deletes nothing, and the quarantined
artifacts are listed, adopted (answering exactly as before) or deleted through /admin/orphans."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import httpx
import pytest

from experts.repository.registry import Registry
from experts.runtime import open_repository
from tests.helpers import CLIENT_KEY, Gateway


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith("registry.db")}


def complete(gw: Gateway, model: str) -> str:
    r = httpx.post(gw.base + "/v1/completions", json={"model": model, "prompt": "def f(x):", "max_tokens": 12,
                                                       "seed": 7, "temperature": 0.9}, timeout=60,
                   headers={"Authorization": f"Bearer {CLIENT_KEY}"})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_copied_data_dir_against_another_database(tmp_path, tiny_model_dir, gateway):
    data = tmp_path / "data"
    repo = open_repository(data)  # a data dir as a gateway leaves it (one start fewer)
    try:
        repo.register_from_dir("precious", tiny_model_dir, tags=["keep"])
    finally:
        repo.close()
    before = complete(gateway, "tiny")  # the same weights, registered in the shared gateway
    d3 = tmp_path / "d3"
    shutil.copytree(data, d3, symlinks=True)  # cp -a data d3
    files = tree(d3)
    other = {"MERGEGATE_DATABASE_URL": f"sqlite:///{tmp_path / 'other.db'}"}

    refused = Gateway(d3, extra_env=other)
    with pytest.raises(RuntimeError, match="exited early"):
        refused.start()
    log = refused.log.read_text()
    assert "refusing to start" in log and "--rebind-registry" in log and "nothing is deleted" in log
    assert tree(d3) == files  # every file in place

    gw = Gateway(d3, extra_env=other, command=("serve", "--rebind-registry"), api_keys=CLIENT_KEY).start()
    try:
        with gw.admin() as c:
            assert c.get("/admin/experts").json()["data"] == []
            orphans = c.get("/admin/orphans").json()["data"]
            assert [(o["suggested_id"], o["looks_like"]) for o in orphans] == [("precious", "model")]
            name = orphans[0]["name"]
            assert "config.json" in orphans[0]["files"] and orphans[0]["size_bytes"] > 0
            assert {h for p, h in tree(d3).items() if p.startswith("orphans/")} == \
                {h for p, h in files.items() if p.startswith("experts/")}  # moved, byte for byte

            r = c.post(f"/admin/orphans/{name}/adopt", json={"id": "bad id!"})
            assert r.status_code == 400 and "invalid expert id" in r.json()["error"]["message"]
            r = c.post("/admin/orphans/no-such/adopt", json={"id": "x"})
            assert r.status_code == 404 and r.json()["error"]["code"] == "orphan_not_found"
            r = c.post(f"/admin/orphans/{name}/adopt", json={"id": "precious", "tags": ["back"]})
            assert r.status_code == 201, r.text
            assert r.json()["tags"] == ["back"] and r.json()["status"] == "ready"
            assert c.get("/admin/orphans").json()["data"] == []
            assert complete(gw, "precious") == before  # the same weights answer the same

            (d3 / "orphans" / "leftover").mkdir()
            (d3 / "orphans" / "leftover" / "notes.txt").write_text("x")
            r = c.post("/admin/orphans/leftover/adopt", json={"id": "leftover"})
            assert r.status_code == 400 and "config.json is missing" in r.json()["error"]["message"]
            assert c.delete("/admin/orphans/leftover").json() == {"name": "leftover", "object": "orphan",
                                                                  "deleted": True}
            assert not (d3 / "orphans" / "leftover").exists()
            assert c.delete("/admin/orphans/leftover").status_code == 404
    finally:
        gw.stop()
    assert (d3 / "registry_id").read_text().strip() == Registry(other["MERGEGATE_DATABASE_URL"]).read_meta(
        "registry_id")  # bound now: the next start needs no flag
