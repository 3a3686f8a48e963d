// Experts tab: GET /admin/experts as a table; also the list the other tabs pick experts from.
import { api, el, formatBytes } from "./api.js";

let ctx;
export function init(c) {
  ctx = c;
  document.getElementById("experts-refresh").addEventListener("click", () => show().catch((e) => ctx.notice(e.message, true)));
}

export async function load() {
  const list = (await api("/admin/experts")).data;
  window.mergegate.experts = list;
  return list;
}

function madeBy(e) {
  const l = e.lineage || {};
  if (l.search) return "search";
  return l.op || "";
}

export async function show() {
  const list = await load();
  const body = document.querySelector("#experts-table tbody");
  body.replaceChildren(...list.map((e) => el("tr", { "data-id": e.id },
    el("td", {}, el("code", {}, e.id)),
    el("td", {}, e.kind),
    el("td", { class: `status-${e.status}` }, e.status),
    el("td", {}, formatBytes(e.size_bytes)),
    el("td", {}, e.num_params ? e.num_params.toLocaleString() : ""),
    el("td", {}, ...(e.tags || []).map((t) => el("span", { class: "tag" }, t))),
    el("td", {}, e.domain || ""),
    el("td", {}, madeBy(e)),
    el("td", {}, e.loaded ? "yes" : ""))));
  if (!list.length) body.append(el("tr", {}, el("td", { colSpan: 9 }, "No experts yet: register one with POST /admin/experts.")));
}
