// Lineage tab: GET /admin/lineage drawn with Cytoscape.js (vendored); a click shows the expert's record.
import { api } from "./api.js";

let ctx;
const COLORS = { local: "#3056d3", lora: "#12b76a", ensemble: "#f79009", remote: "#7a5af8" };
const SHAPES = { "btm.forest": "hexagon", search: "star", merge: "round-rectangle" };

export function init(c) {
  ctx = c;
  document.getElementById("lineage-refresh").addEventListener("click", () => show().catch((e) => ctx.notice(e.message, true)));
}

function shape(op) {
  if (!op) return "ellipse";
  if (SHAPES[op]) return SHAPES[op];
  if (op.startsWith("btm.average") || op.startsWith("ensemble")) return "round-rectangle";
  return "ellipse";
}

function label(n) {
  return n.op ? `${n.id}\n${n.op}` : n.id;
}

function elements(graph) {
  const nodes = graph.nodes.map((n) => ({
    data: { id: n.id, label: label(n), color: n.status === "absent" ? "#d0d5dd" : (COLORS[n.kind] || "#98a2b3"),
            shape: shape(n.op), node: n },
  }));
  const edges = graph.edges.map((e, i) => ({
    data: { id: `e${i}`, source: e.source, target: e.target, relation: e.relation,
            label: e.weight === null || e.weight === undefined ? (e.relation === "parent" ? "" : e.relation)
              : Number(e.weight).toFixed(2) },
  }));
  return [...nodes, ...edges];
}

const STYLE = [
  { selector: "node", style: { "background-color": "data(color)", shape: "data(shape)", label: "data(label)",
    "text-wrap": "wrap", "font-size": 10, "text-valign": "bottom", "text-margin-y": 4, width: 26, height: 26 } },
  { selector: "edge", style: { width: 1.5, "line-color": "#98a2b3", "target-arrow-color": "#98a2b3",
    "target-arrow-shape": "triangle", "curve-style": "bezier", label: "data(label)", "font-size": 9,
    color: "#475467", "text-background-color": "#fff", "text-background-opacity": 0.8 } },
  { selector: "edge[relation = 'base']", style: { "line-style": "dashed" } },
  { selector: "edge[relation = 'forest']", style: { "line-style": "dotted", width: 2 } },
  { selector: "node:selected", style: { "border-width": 3, "border-color": "#101828" } },
];

// Row = length of the longest ancestor chain (a cycle, which a registry should not hold, stops the walk);
// within a row, experts are ordered by the mean column of their parents, so that edges cross less.
export function ranks(graph) {
  const parents = new Map(graph.nodes.map((n) => [n.id, []]));
  for (const e of graph.edges) if (parents.has(e.target) && parents.has(e.source)) parents.get(e.target).push(e.source);
  const row = new Map();
  const visit = (id, path) => {
    if (row.has(id)) return row.get(id);
    if (path.has(id)) return 0;
    path.add(id);
    const r = Math.max(-1, ...parents.get(id).map((p) => visit(p, path))) + 1;
    path.delete(id);
    row.set(id, r);
    return r;
  };
  for (const n of graph.nodes) visit(n.id, new Set());
  const cells = new Map();
  const rows = [];
  for (const n of graph.nodes) (rows[row.get(n.id)] ||= []).push(n.id);
  for (const [r, ids] of rows.entries()) {
    const key = (id) => {
      const cols = parents.get(id).map((p) => cells.get(p)).filter(Boolean).map((c) => c.col);
      return cols.length ? cols.reduce((a, b) => a + b, 0) / cols.length : 0;
    };
    ids.sort((a, b) => key(a) - key(b) || (a < b ? -1 : 1));
    ids.forEach((id, col) => cells.set(id, { row: r, col }));
  }
  return cells;
}

export async function show() {
  const graph = await api("/admin/lineage");
  const container = document.getElementById("lineage-graph");
  const old = window.mergegate.cy;
  if (old) old.destroy();
  const cy = window.cytoscape({
    container, elements: elements(graph), style: STYLE,
    layout: { name: "preset" }, wheelSensitivity: 0.3,
  });
  // top-down: each expert one row below its lowest ancestor (breadthfirst's `maximal` option fails on
  // some DAGs in cytoscape 3.35); each row centred
  const cells = ranks(graph);
  const width = new Map();
  for (const c of cells.values()) width.set(c.row, Math.max(width.get(c.row) || 0, c.col + 1));
  cy.layout({ name: "preset", fit: true, padding: 30, positions: (node) => {
    const c = cells.get(node.id());
    return { x: (c.col - (width.get(c.row) - 1) / 2) * 140, y: c.row * 110 };
  } }).run();
  cy.on("tap", "node", async (ev) => {
    const n = ev.target.data("node");
    const detail = document.getElementById("lineage-detail");
    if (n.status === "absent") { detail.textContent = `${n.id}: named by a lineage, no longer registered`; return; }
    try {
      const e = await api(`/admin/experts/${encodeURIComponent(n.id)}`);
      detail.textContent = JSON.stringify({ id: e.id, kind: e.kind, status: e.status, tags: e.tags,
                                            lineage: e.lineage }, null, 2);
    } catch (err) { detail.textContent = err.message; }
  });
  window.mergegate.cy = cy;
  window.mergegate.lineage = graph;
}
