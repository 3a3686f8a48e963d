// The console's shell: the key box, the tabs, and a notice line; each tab lives in its own module.
import { api, forgetKey, getKey, setKey } from "./api.js";
import * as experts from "./experts.js";
import * as forms from "./forms.js";
import * as jobs from "./jobs.js";
import * as lineage from "./lineage.js";
import * as playground from "./playground.js";

const $ = (id) => document.getElementById(id);
// what the tests (and a curious user in the devtools) can look at
window.mergegate = { ready: false, experts: [], cy: null, chart: null, jobEvents: [], stream: [] };

export function notice(text, error = false) {
  $("notice").textContent = text || "";
  $("notice").classList.toggle("error", !!error);
}

const TABS = { experts, lineage, jobs, playground, merge: forms, search: forms };

export function showTab(name) {
  for (const b of document.querySelectorAll("#tabs button")) b.classList.toggle("active", b.dataset.tab === name);
  for (const s of document.querySelectorAll("main .tab")) s.hidden = s.id !== `tab-${name}`;
  location.hash = name;
  TABS[name].show(name).catch((e) => notice(e.message, true));
}

async function enter() {
  try {
    await api("/admin/experts");
  } catch (e) {
    if (e.status === 401 || e.status === 403) forgetKey();
    notice(e.status === 401 || e.status === 403 ? `The key was refused: ${e.message}` : e.message, true);
    return;
  }
  notice("");
  $("login").hidden = true;
  $("session").hidden = false;
  $("tabs").hidden = false;
  $("main").hidden = false;
  const ctx = { notice, showTab, followJob: (id) => { showTab("jobs"); jobs.follow(id); } };
  for (const m of [experts, lineage, jobs, playground, forms]) m.init(ctx);
  const start = location.hash.slice(1);
  showTab(TABS[start] ? start : "experts");
  window.mergegate.ready = true;
}

$("login").addEventListener("submit", (ev) => {
  ev.preventDefault();
  setKey($("admin-key").value.trim());
  $("admin-key").value = "";
  enter();
});
$("logout").addEventListener("click", () => { forgetKey(); location.reload(); });
for (const b of document.querySelectorAll("#tabs button")) b.addEventListener("click", () => showTab(b.dataset.tab));
if (getKey()) enter();
