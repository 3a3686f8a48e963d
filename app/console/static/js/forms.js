// Merge and Search tabs: forms that start jobs through POST /admin/merges (after an optional
// POST /admin/merges/preview) and POST /admin/searches, then follow the job on the Jobs tab.
import { api, el, formatBytes } from "./api.js";
import { load as loadExperts } from "./experts.js";

let ctx;
let methods = [];
const $ = (id) => document.getElementById(id);

export function init(c) {
  ctx = c;
  $("merge-method").addEventListener("change", () => renderMethod());
  $("merge-add").addEventListener("click", () => addExpertRow());
  $("merge-preview").addEventListener("click", () => preview());
  $("merge-form").addEventListener("submit", (ev) => { ev.preventDefault(); startMerge(); });
  $("search-base").addEventListener("change", () => fillPool());
  $("search-form").addEventListener("submit", (ev) => { ev.preventDefault(); startSearch(); });
}

const options = (list, selected) => list.map((e) => el("option", { value: e.id, selected: e.id === selected }, e.id));

export async function show(tab) {
  const experts = await loadExperts();
  if (tab === "merge") {
    if (!methods.length) {
      methods = await api("/admin/merges/methods");
      $("merge-method").replaceChildren(...methods.map((m) => el("option", { value: m.name }, m.name)));
    }
    const base = $("merge-base").value;
    $("merge-base").replaceChildren(el("option", { value: "" }, "(none)"), ...options(experts, base));
    renderMethod();
  } else {
    const bases = experts.filter((e) => e.kind === "local");
    const current = $("search-base").value;
    $("search-base").replaceChildren(...options(bases, current));
    fillPool();
  }
}

// -- merge ------------------------------------------------------------------------------------------
const method = () => methods.find((m) => m.name === $("merge-method").value);

function paramInput(p, cls) {
  const attrs = { type: p.kind === "bool" ? "checkbox" : "number", step: "any", class: cls, "data-param": p.name,
                  title: p.doc };
  if (p.kind === "bool") attrs.checked = !!p.default; else attrs.value = p.default;
  return el("label", {}, `${p.name} `, el("input", attrs));
}

function addExpertRow(id) {
  const m = method();
  const select = el("select", { class: "merge-expert" }, ...options(window.mergegate.experts, id));
  const remove = el("button", { type: "button" }, "×");
  const r = el("div", { class: "row" }, select, ...(m ? m.parameters.filter((p) => p.per_expert) : [])
    .map((p) => paramInput(p, "per-expert")), remove);
  remove.addEventListener("click", () => r.remove());
  $("merge-experts").append(r);
}

function renderMethod() {
  const m = method();
  if (!m) return;
  const chosen = [...document.querySelectorAll(".merge-expert")].map((s) => s.value);
  $("merge-experts").replaceChildren();
  for (const id of chosen.length ? chosen : window.mergegate.experts.slice(0, 2).map((e) => e.id)) addExpertRow(id);
  $("merge-globals").replaceChildren(...m.parameters.filter((p) => !p.per_expert).map((p) => paramInput(p, "global")));
  $("merge-method-help").textContent = `${m.needs_base ? "Needs a base. " : ""}${m.lora ? "Works on LoRA adapters. " : ""}` +
    (m.reference ? `Reference: ${m.reference}` : "");
}

function value(input) {
  return input.type === "checkbox" ? input.checked : Number(input.value);
}

function recipe() {
  const experts = [...$("merge-experts").children].map((r) => {
    const e = { id: r.querySelector(".merge-expert").value };
    for (const i of r.querySelectorAll("input.per-expert")) e[i.dataset.param] = value(i);
    return e;
  });
  const parameters = {};
  for (const i of document.querySelectorAll("#merge-globals input")) parameters[i.dataset.param] = value(i);
  const out = { method: $("merge-method").value, experts, parameters };
  if ($("merge-base").value) out.base = $("merge-base").value;
  return out;
}

async function preview() {
  try {
    const p = await api("/admin/merges/preview", { method: "POST",
      body: { recipe: recipe(), id: $("merge-id").value || undefined } });
    $("merge-out").textContent = `Valid ${p.method} merge of ${p.experts.join(", ")}: ${p.num_tensors} tensors, ` +
      `reads ${formatBytes(p.input_bytes)}, writes ${formatBytes(p.output_bytes)}, ` +
      `peak ${formatBytes(p.peak_bytes)} beyond what is resident.\n\n${JSON.stringify(p.recipe, null, 2)}`;
  } catch (e) { $("merge-out").textContent = `Refused: ${e.message}`; }
}

async function startMerge() {
  try {
    const job = await api("/admin/merges", { method: "POST", body: { id: $("merge-id").value, recipe: recipe() } });
    $("merge-out").textContent = `Started job ${job.id}`;
    ctx.followJob(job.id);
  } catch (e) { $("merge-out").textContent = `Refused: ${e.message}`; }
}

// -- search -----------------------------------------------------------------------------------------
function fillPool() {
  const base = $("search-base").value;
  const pool = window.mergegate.experts.filter((e) => e.kind === "lora" && e.spec && e.spec.base === base);
  // preselected: the adapters themselves, not earlier search winners or merges made from them
  const made = (e) => e.lineage && (e.lineage.search || e.lineage.op === "merge");
  $("search-pool").replaceChildren(...pool.map((e) => el("option", { value: e.id, selected: !made(e) }, e.id)));
}

function validation() {
  const text = $("search-examples").value.trim();
  if (text) return { examples: text.split("\n").filter((l) => l.trim()).map((l) => JSON.parse(l)) };
  return { task: $("search-task").value.trim() };
}

async function startSearch() {
  const num = (id) => Number($(id).value);
  const body = { base: $("search-base").value, pool: [...$("search-pool").selectedOptions].map((o) => o.value),
                 method: $("search-method").value, seed: num("search-seed"), popsize: num("search-popsize"),
                 budget_stage1: num("search-b1"), budget_stage2: num("search-b2"), budget: num("search-budget") };
  const name = $("search-name").value.trim();
  if (name) body.name = name;
  try {
    body.validation = validation();
    const job = await api("/admin/searches", { method: "POST", body });
    $("search-out").textContent = `Started job ${job.id}`;
    ctx.followJob(job.id);
  } catch (e) { $("search-out").textContent = `Refused: ${e.message}`; }
}
