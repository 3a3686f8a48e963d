// Playground: chat with or complete from any expert, streamed (POST /v1/chat/completions or /v1/completions
// with stream: true, read with fetch + ReadableStream). A chat keeps its turns until the expert changes.
import { api, el, sse } from "./api.js";

let ctx;
let controller = null;
let history = [];
const $ = (id) => document.getElementById(id);

export function init(c) {
  ctx = c;
  $("play-form").addEventListener("submit", (ev) => { ev.preventDefault(); send(); });
  $("play-stop").addEventListener("click", () => controller && controller.abort());
  for (const id of ["play-model", "play-mode"]) {
    $(id).addEventListener("change", () => { history = []; $("play-output").replaceChildren(); });
  }
}

export async function show() {
  const models = (await api("/v1/models")).data;
  const select = $("play-model");
  const current = select.value;
  select.replaceChildren(...models.map((m) => el("option", { value: m.id }, m.id)));
  if (models.some((m) => m.id === current)) select.value = current;
}

function bubble(who, text) {
  const body = el("span", {}, text);
  $("play-output").append(el("div", { class: `msg msg-${who}` }, el("b", {}, who), body));
  return body;
}

async function send() {
  const model = $("play-model").value;
  const prompt = $("play-prompt").value;
  const chat = $("play-mode").value === "chat";
  const params = { model, stream: true, max_tokens: Number($("play-max").value),
                   temperature: Number($("play-temp").value) };
  let path;
  if (chat) {
    history.push({ role: "user", content: prompt });
    bubble("user", prompt);
    path = "/v1/chat/completions";
    params.messages = history;
  } else {
    path = "/v1/completions";
    params.prompt = prompt;
    $("play-output").replaceChildren();
    bubble("prompt", prompt);
  }
  const out = bubble(model, "");
  out.classList.add("streaming");
  window.mergegate.stream = [];
  controller = new AbortController();
  $("play-send").disabled = true;
  $("play-stop").disabled = false;
  const started = performance.now();
  let text = "";
  try {
    await sse(path, { method: "POST", body: params, signal: controller.signal, onEvent: (chunk) => {
      const choice = (chunk.choices || [])[0];
      if (!choice) return;
      const delta = chat ? (choice.delta && choice.delta.content) || "" : choice.text || "";
      if (!delta) return;
      text += delta;
      out.textContent = text;
      window.mergegate.stream.push(delta);
      $("play-stats").textContent = `${window.mergegate.stream.length} chunks · ` +
        `${((performance.now() - started) / 1000).toFixed(1)}s`;
    } });
    if (chat) history.push({ role: "assistant", content: text });
    $("play-prompt").value = "";
  } catch (e) {
    if (e.name !== "AbortError") ctx.notice(e.message, true);
    if (chat) history.pop();
  } finally {
    out.classList.remove("streaming");
    $("play-send").disabled = false;
    $("play-stop").disabled = true;
    controller = null;
  }
}
