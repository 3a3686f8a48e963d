"""The registry's lineage as a graph: one node per expert, one edge per recorded ancestry.

Every expert's lineage row says how it was made (``op``: ``btm.seed``, ``btm.branch``, ``btm.train``,
``btm.forest``, ``btm.average.uniform``, ``merge``, ``lora.train``, ``ensemble.*``, ``search``, ...) and from
what (``parents`` with weights, a LoRA ``base``, the ``forest`` an average collapsed, the ``search`` that
found the coefficients). :func:`lineage_graph` turns the rows into nodes and edges, so that a client can
draw the repository's history without reading every expert: BTM seed -> branches -> forest -> average,
merge recipes and their parents, search winners and their pools.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from experts.repository.registry import ExpertRecord


def _op(record: ExpertRecord) -> str | None:
    lineage = record.lineage or {}
    op = lineage.get("op")
    if "search" in lineage and op in (None, "merge"):
        return "search"  # a search winner, materialised through a merge recipe
    return str(op) if op is not None else None


def _search_summary(lineage: dict[str, Any]) -> dict[str, Any] | None:
    search = lineage.get("search")
    if not isinstance(search, dict):
        return None
    return {k: search.get(k) for k in ("job", "method", "loss", "queries", "provider")}


def _edges(record: ExpertRecord) -> list[dict[str, Any]]:
    lineage = record.lineage or {}
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    parents = lineage.get("parents")
    for p in parents if isinstance(parents, list) else []:  # a row registered by hand may hold anything
        pid = p.get("id") if isinstance(p, dict) else p
        if isinstance(pid, str) and pid not in seen:
            seen.add(pid)
            weight = p.get("weight") if isinstance(p, dict) else None
            out.append({"source": pid, "target": record.id, "relation": "parent",
                        "weight": weight if isinstance(weight, (int, float)) else None})
    base = lineage.get("base") or (record.spec or {}).get("base")
    if isinstance(base, str) and base and base not in seen:
        seen.add(base)
        out.append({"source": base, "target": record.id, "relation": "base", "weight": None})
    forest = lineage.get("forest")
    if isinstance(forest, str) and forest not in seen:
        out.append({"source": forest, "target": record.id, "relation": "forest", "weight": None})
    return out


def lineage_graph(records: Iterable[ExpertRecord]) -> dict[str, Any]:
    """Nodes (every expert, plus `absent` ones that a lineage names but the registry no longer holds) and
    edges (parent -> child, relation `parent`, `base` or `forest`), in registry order."""
    nodes: dict[str, dict[str, Any]] = {}
    edges: list[dict[str, Any]] = []
    for r in records:
        lineage = r.lineage or {}
        nodes[r.id] = {"id": r.id, "kind": r.kind, "status": r.status, "op": _op(r), "tags": list(r.tags),
                       "domain": r.domain, "search": _search_summary(lineage)}
        edges.extend(_edges(r))
    for e in edges:
        if e["source"] not in nodes:
            nodes[e["source"]] = {"id": e["source"], "kind": None, "status": "absent", "op": None, "tags": [],
                                  "domain": None, "search": None}
    return {"object": "lineage", "nodes": list(nodes.values()), "edges": edges}
