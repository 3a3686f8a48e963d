"""GET /admin/lineage: the registry's lineage as nodes and edges."""

from __future__ import annotations

import httpx

from tests.helpers import CLIENT_KEY


def test_lineage_lists_merges_and_forests_with_their_parents(gateway):
    with gateway.admin() as c:
        r = c.post("/admin/merges", params={"background": "false"}, json={"id": "ln-copy", "recipe": {
            "method": "linear", "experts": [{"id": "tiny", "weight": 1.0}]}})
        assert r.status_code == 201, r.text
        assert c.post("/admin/btm/forests", json={"id": "ln-forest", "members": ["tiny", "ln-copy"]}).status_code == 201
        g = c.get("/admin/lineage").json()
    nodes = {n["id"]: n for n in g["nodes"]}
    assert nodes["ln-copy"]["op"] == "merge" and nodes["ln-forest"]["kind"] == "ensemble"
    assert nodes["tiny"]["tags"] == ["test"] and nodes["tiny"]["domain"] == "python-docs"
    edges = {(e["source"], e["target"], e["relation"]): e["weight"] for e in g["edges"]}
    assert edges[("tiny", "ln-copy", "parent")] == 1.0
    assert edges[("tiny", "ln-forest", "parent")] == 0.5 and edges[("ln-copy", "ln-forest", "parent")] == 0.5


def test_lineage_needs_the_admin_key(gateway):
    assert httpx.get(gateway.base + "/admin/lineage").status_code == 401
    r = httpx.get(gateway.base + "/admin/lineage", headers={"Authorization": f"Bearer {CLIENT_KEY}"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "not_admin"


def test_lineage_is_documented_with_an_example(gateway):
    op = httpx.get(gateway.base + "/openapi.json").json()["paths"]["/admin/lineage"]["get"]
    ok = op["responses"]["200"]["content"]["application/json"]
    assert ok["example"]["nodes"] and ok["example"]["edges"]
    assert {"401", "403"} <= set(op["responses"])
