"""experts.repository.lineage: registry rows -> nodes and edges, as the console draws them."""

from __future__ import annotations

from experts.repository.lineage import lineage_graph
from experts.repository.registry import ExpertRecord


def rec(expert_id: str, kind: str = "local", lineage: dict | None = None, **spec) -> ExpertRecord:
    return ExpertRecord(id=expert_id, kind=kind, lineage=lineage, spec=spec)


def test_btm_merge_lora_and_search_rows_become_one_graph():
    rows = [
        rec("seed", lineage={"op": "btm.seed", "parents": [], "recipe": {"domains": ["a", "b"]}}),
        rec("br-a", lineage={"op": "btm.branch", "parents": [{"id": "seed", "weight": 1.0}]}),
        rec("tr-a", lineage={"op": "btm.train", "parents": [{"id": "br-a", "weight": 1.0}]}),
        rec("tr-b", lineage={"op": "btm.train", "parents": [{"id": "seed", "weight": 1.0}]}),
        rec("forest", "ensemble", {"op": "btm.forest", "parents": [{"id": "tr-a", "weight": 0.25},
                                                                   {"id": "tr-b", "weight": 0.75}]}),
        rec("avg", lineage={"op": "btm.average.prior", "forest": "forest",
                            "parents": [{"id": "tr-a", "weight": 0.25}, {"id": "tr-b", "weight": 0.75}]}),
        rec("ad-1", "lora", {"op": "lora.train", "parents": [{"id": "seed", "weight": 1.0}], "base": "seed"},
            base="seed"),
        rec("ad-2", "lora", None, base="seed"),  # an uploaded adapter: only its spec names the base
        rec("win", "lora", {"op": "merge", "base": "seed", "parents": [{"id": "ad-1", "weight": 0.4},
                                                                       {"id": "ad-2", "weight": -0.1}],
                            "search": {"job": "job-1", "method": "evo_merging", "loss": 2.5, "queries": 12,
                                       "alpha": [1, 1], "provider": "local"}}),
    ]
    g = lineage_graph(rows)
    nodes = {n["id"]: n for n in g["nodes"]}
    assert list(nodes) == [r.id for r in rows]
    assert nodes["seed"]["op"] == "btm.seed" and nodes["ad-2"]["op"] is None
    assert nodes["win"]["op"] == "search"
    assert nodes["win"]["search"] == {"job": "job-1", "method": "evo_merging", "loss": 2.5, "queries": 12,
                                      "provider": "local"}
    edges = {(e["source"], e["target"]): (e["relation"], e["weight"]) for e in g["edges"]}
    assert edges[("seed", "br-a")] == ("parent", 1.0)
    assert edges[("tr-b", "forest")] == ("parent", 0.75)
    assert edges[("forest", "avg")] == ("forest", None)
    assert edges[("seed", "ad-2")] == ("base", None)
    assert edges[("seed", "win")] == ("base", None) and edges[("ad-2", "win")] == ("parent", -0.1)
    assert ("seed", "ad-1") in edges and sum(1 for e in g["edges"] if e["target"] == "ad-1") == 1  # no duplicate


def test_an_ancestor_no_longer_registered_is_an_absent_node():
    g = lineage_graph([rec("child", lineage={"op": "merge", "parents": [{"id": "gone", "weight": 0.5},
                                                                         {"id": "also-gone"}]})])
    absent = {n["id"]: n for n in g["nodes"] if n["status"] == "absent"}
    assert set(absent) == {"gone", "also-gone"} and absent["gone"]["kind"] is None
    assert [e["weight"] for e in g["edges"]] == [0.5, None]


def test_hand_written_lineage_of_any_shape_draws_what_it_can():
    rows = [rec("a", lineage={"parents": 3, "base": 7, "forest": ["x"], "search": "yes", "op": 1}),
            rec("b", lineage={"parents": [5, None, "a", {"id": 2}, {"id": "a", "weight": "heavy"}]})]
    g = lineage_graph(rows)
    assert g["edges"] == [{"source": "a", "target": "b", "relation": "parent", "weight": None}]
    assert [n["op"] for n in g["nodes"]] == ["1", None] and g["nodes"][0]["search"] is None


def test_no_lineage_no_edges():
    g = lineage_graph([rec("a"), rec("b", "remote")])
    assert g == {"object": "lineage", "edges": [], "nodes": [
        {"id": "a", "kind": "local", "status": "ready", "op": None, "tags": [], "domain": None, "search": None},
        {"id": "b", "kind": "remote", "status": "ready", "op": None, "tags": [], "domain": None, "search": None}]}
