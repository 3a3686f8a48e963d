// Jobs tab: GET /admin/jobs, and one job followed live over GET /admin/jobs/{id}/events (SSE). A search job
// also shows its loss-vs-queries curve (Chart.js, vendored) and its best alpha/beta so far.
import { api, el, sse } from "./api.js";

let ctx;
let following = null; // { id, controller }
const $ = (id) => document.getElementById(id);
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

export function init(c) {
  ctx = c;
  $("jobs-refresh").addEventListener("click", () => show().catch((e) => ctx.notice(e.message, true)));
  $("job-cancel").addEventListener("click", async () => {
    if (!following) return;
    try { await api(`/admin/jobs/${following.id}/cancel`, { method: "POST" }); } catch (e) { ctx.notice(e.message, true); }
  });
}

function row(j) {
  const pct = `${Math.round((j.progress || 0) * 100)}%`;
  const tr = el("tr", { "data-id": j.id }, el("td", {}, el("code", {}, j.id)), el("td", {}, j.kind),
    el("td", { class: `status-${j.status}` }, j.status), el("td", {}, pct), el("td", {}, j.message || j.error || ""));
  tr.addEventListener("click", () => follow(j.id));
  return tr;
}

export async function show() {
  const jobs = (await api("/admin/jobs?limit=100")).data;
  $("jobs-table").querySelector("tbody").replaceChildren(...jobs.map(row));
  if (!jobs.length) $("jobs-table").querySelector("tbody").append(el("tr", {}, el("td", { colSpan: 5 }, "No jobs yet.")));
}

function chart() {
  if (window.mergegate.chart) return window.mergegate.chart;
  window.mergegate.chart = new window.Chart($("job-chart"), {
    type: "line",
    data: { datasets: [
      { label: "loss", data: [], showLine: false, pointRadius: 2, borderColor: "#98a2b3", backgroundColor: "#98a2b3" },
      { label: "best loss", data: [], pointRadius: 0, borderColor: "#3056d3", borderWidth: 2, stepped: true },
    ] },
    options: { animation: false, parsing: false, maintainAspectRatio: false,
      scales: { x: { type: "linear", title: { display: true, text: "queries" } },
                y: { title: { display: true, text: "validation loss" } } } },
  });
  return window.mergegate.chart;
}

function showSearch(detail) {
  const s = detail.series || { query: [], loss: [], best_loss: [] };
  const c = chart();
  c.data.datasets[0].data = s.query.map((q, i) => ({ x: q, y: s.loss[i] })).filter((p) => p.y !== null);
  c.data.datasets[1].data = s.query.map((q, i) => ({ x: q, y: s.best_loss[i] })).filter((p) => p.y !== null);
  c.update("none");
  const best = detail.best_loss === null || detail.best_loss === undefined ? "-" : detail.best_loss.toFixed(4);
  $("job-search-stats").textContent = `${detail.stage || "opening session"} · ${detail.queries_used}/` +
    `${detail.queries_total} queries · best loss ${best} · ${detail.elapsed_s ?? 0}s`;
  const names = (detail.session && detail.session.experts) || [];
  const a = detail.best_alpha || [];
  const b = detail.best_beta || [];
  $("job-coefficients").querySelector("tbody").replaceChildren(...names.map((n, i) => el("tr", {},
    el("td", {}, el("code", {}, n)), el("td", {}, a[i] === undefined ? "" : a[i].toFixed(3)),
    el("td", {}, b[i] === undefined ? "" : b[i].toFixed(3)))));
  return c.data.datasets[0].data.length;
}

function render(job) {
  $("job-title").textContent = `${job.kind} · ${job.id} · ${job.status}`;
  $("job-progress").value = job.progress || 0;
  $("job-message").textContent = job.error || job.message || "";
  $("job-cancel").disabled = TERMINAL.has(job.status);
  const isSearch = !!(job.detail && job.detail.series);
  $("job-search").hidden = !isSearch;
  const points = isSearch ? showSearch(job.detail) : 0;
  $("job-result").textContent = job.result ? JSON.stringify(job.result, null, 2) : "";
  window.mergegate.jobEvents.push({ id: job.id, status: job.status, progress: job.progress, points });
  const tr = $("jobs-table").querySelector(`tr[data-id="${job.id}"]`);
  if (tr) tr.replaceWith(row(job));
}

export async function follow(id) {
  if (following) following.controller.abort();
  const controller = new AbortController();
  following = { id, controller };
  $("job-view").hidden = false;
  if (window.mergegate.chart) { window.mergegate.chart.destroy(); window.mergegate.chart = null; }
  window.mergegate.jobEvents = [];
  try {
    await sse(`/admin/jobs/${encodeURIComponent(id)}/events`, { signal: controller.signal, onEvent: render });
    if (following && following.id === id) show().catch(() => {});
  } catch (e) {
    if (e.name !== "AbortError") ctx.notice(e.message, true);
  }
}
