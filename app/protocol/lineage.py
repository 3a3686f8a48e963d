"""Wire model of GET /admin/lineage: the registry's lineage as nodes and edges."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

EXAMPLE = {
    "object": "lineage",
    "nodes": [
        {"id": "btm-seed", "kind": "local", "status": "ready", "op": "btm.seed", "tags": ["btm", "seed"],
         "domain": None, "search": None},
        {"id": "btm-code", "kind": "local", "status": "ready", "op": "btm.train", "tags": ["btm", "code"],
         "domain": "code", "search": None},
        {"id": "btm-forest", "kind": "ensemble", "status": "ready", "op": "btm.forest", "tags": ["btm", "forest"],
         "domain": None, "search": None},
        {"id": "evo-merged", "kind": "lora", "status": "ready", "op": "search", "tags": [], "domain": None,
         "search": {"job": "job-1a2b3c", "method": "evo_merging", "loss": 2.31, "queries": 1200,
                    "provider": "local"}},
    ],
    "edges": [
        {"source": "btm-seed", "target": "btm-code", "relation": "parent", "weight": 1.0},
        {"source": "btm-code", "target": "btm-forest", "relation": "parent", "weight": 1.0},
        {"source": "pool-base", "target": "evo-merged", "relation": "base", "weight": None},
    ],
}


class LineageNode(BaseModel):
    id: str
    kind: str | None = Field(None, description="local | lora | remote | ensemble; null for an absent expert")
    status: str = Field(..., description="The expert's status, or `absent`: named by a lineage, not registered")
    op: str | None = Field(None, description="How it was made: btm.seed, btm.branch, btm.train, btm.forest, "
                           "btm.average.*, merge, lora.train, ensemble.*, search, ...; null: registered as is")
    tags: list[str] = []
    domain: str | None = None
    search: dict[str, Any] | None = Field(None, description="A search winner: job, method, loss, queries, provider")


class LineageEdge(BaseModel):
    source: str = Field(..., description="The ancestor")
    target: str = Field(..., description="The expert made from it")
    relation: Literal["parent", "base", "forest"] = Field(..., description="parent (with its weight), a LoRA's "
                                                          "base, or the forest an average collapsed")
    weight: float | None = None


class LineageGraph(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [EXAMPLE]})

    object: str = "lineage"
    nodes: list[LineageNode]
    edges: list[LineageEdge]
