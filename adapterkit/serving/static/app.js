// The adapterkit serve page: the library of the served base, and a playground where one prompt
// is answered side by side by the plain base and by the pocket books you tick, streaming.
// Plain browser JavaScript, no build step. Everything the server sends is put on the page
// with textContent (never innerHTML): pocket book names and tags are user data.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const state = { baseId: null, running: [] };

function $(id) { return document.getElementById(id); }

function el(tag, attrs = {}, text = null) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text !== null) node.textContent = text;
  return node;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

// The message of an OpenAI-shaped error body ({"error": {"message": ...}}), or the raw text.
function errorMessage(status, text) {
  try {
    const body = JSON.parse(text);
    if (body && body.error) {
      return typeof body.error === "string" ? body.error : (body.error.message || text);
    }
    if (body && body.detail) return String(body.detail);
  } catch (_) { /* not JSON: fall through */ }
  return text.trim() || `HTTP ${status}`;
}

async function getJSON(url) {
  const response = await fetch(url, { headers: headers() });
  const text = await response.text();
  if (!response.ok) {
    const error = new Error(errorMessage(response.status, text));
    error.status = response.status;
    throw error;
  }
  return JSON.parse(text);
}

function notice(message) {
  const box = $("notice");
  box.textContent = message || "";
  box.hidden = !message;
}

function fmt(x) {
  if (typeof x !== "number" || !Number.isFinite(x)) return String(x);
  if (Number.isInteger(x)) return String(x);
  return Math.abs(x) >= 100 ? x.toFixed(0) : x.toPrecision(3);
}

// ---------------------------------------------------------------- library

// The few figures worth a glance; the rest are on the pocket book's card (`adapterkit show`).
function keyMetrics(metrics) {
  const m = metrics || {};
  const out = [];
  const num = (v) => typeof v === "number" && Number.isFinite(v);
  // Where the forgetting guard or early stopping kept an earlier step's weights, the last
  // step's loss is not the saved weights' (as the card says: library/card.kept_weights_line).
  const kept = num(m.weights_step);
  const last = kept && num(m.steps) ? ` (step ${m.steps}, whose weights were not kept)` : "";
  if (num(m.train_loss_first) && num(m.train_loss_final)) {
    out.push(`train loss ${fmt(m.train_loss_first)} → ${fmt(m.train_loss_final)}${last}`);
  } else if (num(m.train_loss_final)) {
    out.push(`train loss ${fmt(m.train_loss_final)}${last}`);
  }
  if (kept) {
    const by = m.weights_kept_by || "an earlier step";
    const loss = num(m.train_loss_kept)
      ? `train loss logged at step ${m.train_loss_kept_step}: ${fmt(m.train_loss_kept)}`
      : num(m.train_loss_final) ? "no train loss logged by then" : "no train loss logged";
    out.push(`weights kept: step ${m.weights_step}'s, ${by}; ${loss}`);
  }
  if (m.eval && num(m.eval.loss)) out.push(`eval loss ${fmt(m.eval.loss)}`);
  for (const key of ["accuracy", "exact_match"]) {
    if (num(m[key])) out.push(`${key.replace("_", " ")} ${fmt(100 * m[key])}%`);
  }
  if (num(m.steps)) out.push(`${m.steps} steps`);
  return out;
}

function forgettingText(value) {
  if (typeof value !== "number" || !Number.isFinite(value)) return "not measured";
  return `${value > 0 ? "+" : ""}${value.toFixed(2)}%`;
}

// A small inline SVG of [[step, loss], ...]; text instead when there is nothing to draw.
function lossCurve(points, keptStep) {
  const pts = (points || []).filter(
    (p) => Array.isArray(p) && p.length >= 2 && Number.isFinite(p[0]) && Number.isFinite(p[1]));
  if (pts.length < 2) return el("span", { class: "muted", "data-testid": "no-loss-curve" }, "—");
  const width = 120, height = 36, pad = 2;
  const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  const [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  const sx = (x) => pad + (width - 2 * pad) * (x1 > x0 ? (x - x0) / (x1 - x0) : 0.5);
  const sy = (y) => pad + (height - 2 * pad) * (y1 > y0 ? (y1 - y) / (y1 - y0) : 0.5);
  const svg = document.createElementNS(SVG, "svg");
  const kept = Number.isFinite(keptStep) && keptStep >= x0 && keptStep <= x1;
  const label = `loss ${fmt(ys[0])} → ${fmt(ys[ys.length - 1])} over steps ${x0}–${x1}` +
    (kept ? `; weights kept at step ${keptStep}` : "");
  for (const [k, v] of Object.entries({
    width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": label,
    class: "curve", "data-testid": "loss-curve", "data-points": String(pts.length),
  })) svg.setAttribute(k, v);
  const title = document.createElementNS(SVG, "title");
  title.textContent = label;
  const line = document.createElementNS(SVG, "polyline");
  line.setAttribute("points", pts.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" "));
  svg.append(title, line);
  if (kept) {  // the saved weights are that step's, not the last one's (as the PNG marks it)
    const mark = document.createElementNS(SVG, "line");
    for (const [k, v] of Object.entries({
      x1: sx(keptStep).toFixed(1), x2: sx(keptStep).toFixed(1), y1: 0, y2: height,
      class: "kept-step", "data-testid": "kept-step", "data-step": String(keptStep),
    })) mark.setAttribute(k, v);
    svg.appendChild(mark);
  }
  return svg;
}

// The picture training saved, where it recorded no numbers to draw. Fetched with the key's
// header (an <img src> could not send it), then shown from a blob URL.
function lossPicture(book) {
  const img = el("img", { class: "curve-png", alt: `loss curve of ${book.id}`,
                          "data-testid": "loss-curve-png", width: "120" });
  fetch(book.loss_curve_png, { headers: headers() })
    .then((response) => (response.ok ? response.blob() : Promise.reject(new Error(response.status))))
    .then((blob) => { img.src = URL.createObjectURL(blob); })
    .catch(() => { img.replaceWith(el("span", { class: "muted" }, "—")); });
  return img;
}

function bookRow(book) {
  const row = el("tr", { "data-testid": "book-row", "data-book": book.id });
  const cell = (text, testid) => row.appendChild(el("td", testid ? { "data-testid": testid } : {}, text));
  row.appendChild(el("th", { scope: "row", "data-testid": "book-name" }, book.name));
  cell(book.version == null ? "" : String(book.version), "book-version");
  cell(book.kind || "", "book-kind");
  const base = el("td", { "data-testid": "book-base" });
  base.appendChild(el("code", {}, book.base || ""));
  row.appendChild(base);
  cell(book.rank == null ? "—" : String(book.rank), "book-rank");
  const tags = el("td", { "data-testid": "book-tags" });
  for (const tag of book.tags || []) tags.appendChild(el("span", { class: "tag" }, tag));
  row.appendChild(tags);
  const metrics = el("td", { "data-testid": "book-metrics" });
  const lines = keyMetrics(book.metrics);
  if (!lines.length) metrics.appendChild(el("span", { class: "muted" }, "—"));
  for (const line of lines) metrics.appendChild(el("div", {}, line));
  row.appendChild(metrics);
  cell(forgettingText(book.forgetting), "book-forgetting");
  const curve = el("td", { "data-testid": "book-loss-curve" });
  curve.appendChild(book.loss_curve && book.loss_curve.length >= 2 || !book.loss_curve_png
    ? lossCurve(book.loss_curve, (book.metrics || {}).weights_step) : lossPicture(book));
  row.appendChild(curve);
  const actions = el("td");
  const tryIt = el("button", { type: "button", "data-testid": "try-book",
                               "aria-label": `Try ${book.id} in the playground` }, "Try");
  tryIt.addEventListener("click", () => tryBook(book));
  actions.appendChild(tryIt);
  row.appendChild(actions);
  return row;
}

async function loadLibrary() {
  const data = await getJSON("/api/library");
  state.baseId = data.base;
  $("base-id").textContent = data.base;
  const body = $("books");
  body.replaceChildren(...(data.books || []).map(bookRow));
  $("library-empty").hidden = (data.books || []).length > 0;
}

// ---------------------------------------------------------------- model choices

async function loadModels() {
  const data = await getJSON("/v1/models");
  const models = data.data || [];
  const base = models.find((m) => m.kind === "base");
  if (base) state.baseId = base.id;
  const ticked = new Set([...document.querySelectorAll("#models input:checked")].map((i) => i.value));
  const box = $("models");
  box.replaceChildren();
  for (const model of models) {
    if (model.id === state.baseId) continue;
    const id = `model-${box.children.length}`;
    const wrap = el("div", { class: "choice" });
    const input = el("input", { type: "checkbox", id, value: model.id, name: "model",
                                "data-testid": "model-choice", "data-model": model.id });
    input.checked = ticked.has(model.id);
    const label = el("label", { for: id, title: model.ref || model.id }, model.id);
    if (model.kind && model.kind !== "adapter") label.appendChild(el("span", { class: "muted" }, ` (${model.kind})`));
    wrap.append(input, label);
    box.appendChild(wrap);
  }
  if (!box.children.length) box.appendChild(el("p", { class: "muted" }, "No pocket books to tick."));
}

function tryBook(book) {
  const inputs = [...document.querySelectorAll("#models input")];
  const wanted = [book.id, `${book.name}@${book.version}`, book.name];
  const input = wanted.map((w) => inputs.find((i) => i.value === w)).find(Boolean);
  if (input) input.checked = true;
  else notice(`${book.id} is not in the server's model list.`);
  showTab("playground");
  $("prompt").focus();
}

// ---------------------------------------------------------------- playground

// Server-sent events from a fetch body: calls onData with each event's data (lines joined).
async function readEvents(body, onData) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", data = [];
  const dispatch = () => {
    if (data.length) onData(data.join("\n"));
    data = [];
  };
  for (;;) {
    const { value, done } = await reader.read();
    buffer += done ? decoder.decode() : decoder.decode(value, { stream: true });
    const lines = buffer.split(/\r\n|\n|\r/);
    buffer = done ? "" : lines.pop();
    for (const line of lines) {
      if (line === "") dispatch();
      else if (line.startsWith("data:")) data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
      // comments (": ping") and other fields (event:, id:, retry:) carry nothing we show
    }
    if (done) { dispatch(); return; }
  }
}

function answerColumn(model, label) {
  const column = el("article", { class: "answer", "data-testid": "answer-column",
                                 "data-model": model, "data-state": "streaming",
                                 "aria-busy": "true" });
  const head = el("header");
  head.appendChild(el("h3", {}, label));
  const status = el("span", { class: "status muted", "data-testid": "answer-status" }, "streaming…");
  head.appendChild(status);
  const text = el("pre", { "data-testid": "answer", "data-model": model });
  column.append(head, text);
  return { column, status, text };
}

function finish(view, stateName, message, isError = false) {
  view.column.dataset.state = stateName;
  view.column.setAttribute("aria-busy", "false");
  view.status.textContent = isError ? "error" : message;
  view.status.classList.toggle("error", isError);
  if (isError) {
    if (!view.text.textContent) view.text.hidden = true;
    const error = el("p", { class: "error", role: "alert", "data-testid": "answer-error" }, message);
    view.column.appendChild(error);
  }
}

async function streamAnswer(model, prompt, options, view, signal) {
  let finishReason = null, usage = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal,
      body: JSON.stringify({ model, stream: true, messages: [{ role: "user", content: prompt }],
                             ...options }),
    });
    if (!response.ok) {
      finish(view, "error", errorMessage(response.status, await response.text()), true);
      return;
    }
    let failed = null;
    await readEvents(response.body, (data) => {
      if (data === "[DONE]" || failed) return;
      const chunk = JSON.parse(data);
      if (chunk.error) { failed = errorMessage(0, JSON.stringify(chunk)); return; }
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        if (choice.delta && choice.delta.content) {
          view.text.textContent += choice.delta.content;
          view.column.dataset.chunks = String(Number(view.column.dataset.chunks || 0) + 1);
        }
        if (choice.finish_reason) finishReason = choice.finish_reason;
      }
    });
    if (failed) { finish(view, "error", failed, true); return; }
    if (finishReason === "error") { finish(view, "error", "the server could not finish this answer", true); return; }
    const tokens = usage ? `, ${usage.completion_tokens} tokens` : "";
    finish(view, "done", `done (${finishReason || "end of stream"}${tokens})`);
  } catch (err) {
    if (err.name === "AbortError") finish(view, "stopped", "stopped");
    else finish(view, "error", String(err.message || err), true);
  }
}

async function run(event) {
  event.preventDefault();
  const prompt = $("prompt").value;
  if (!prompt.trim()) { $("prompt").focus(); return; }
  notice("");
  if (!state.baseId) {
    try { await loadModels(); } catch (err) { notice(String(err.message || err)); return; }
  }
  const options = { max_tokens: Number($("max-tokens").value) || 64,
                    temperature: Number($("temperature").value) || 0 };
  const picked = [...document.querySelectorAll("#models input:checked")].map((i) => i.value);
  const models = [[state.baseId, `${state.baseId} (plain base)`], ...picked.map((m) => [m, m])];
  const controller = new AbortController();
  state.running.push(controller);
  $("stop").disabled = false;
  const answers = $("answers");
  answers.replaceChildren();
  answers.style.setProperty("--columns", String(models.length));
  // every request goes out at once: the server decodes them together in one batch
  const jobs = models.map(([model, label]) => {
    const view = answerColumn(model, label);
    answers.appendChild(view.column);
    return streamAnswer(model, prompt, options, view, controller.signal);
  });
  await Promise.allSettled(jobs);
  state.running = state.running.filter((c) => c !== controller);
  $("stop").disabled = state.running.length === 0;
}

function stop() {
  for (const controller of state.running) controller.abort();
}

// ---------------------------------------------------------------- tabs and start

function showTab(name) {
  for (const tab of ["library", "playground"]) {
    $(tab).hidden = tab !== name;
    $(`tab-${tab}`).setAttribute("aria-selected", String(tab === name));
  }
}

async function refresh() {
  notice("");
  const results = await Promise.allSettled([loadLibrary(), loadModels()]);
  const failed = results.filter((r) => r.status === "rejected").map((r) => r.reason);
  if (failed.some((e) => e.status === 401)) {
    notice("This server wants an API key: enter it in the API key field above. "
           + `(${failed.find((e) => e.status === 401).message})`);
  } else if (failed.length) {
    notice([...new Set(failed.map((e) => String(e.message || e)))].join(" · "));
  }
  document.body.dataset.loaded = "true";
}

document.addEventListener("DOMContentLoaded", () => {
  $("tab-library").addEventListener("click", () => showTab("library"));
  $("tab-playground").addEventListener("click", () => showTab("playground"));
  $("refresh").addEventListener("click", refresh);
  $("run-form").addEventListener("submit", run);
  $("stop").addEventListener("click", stop);
  // the key is kept for this tab only (sessionStorage), so a reload does not ask again
  const useKey = () => {
    sessionStorage.setItem("adapterkit-api-key", $("api-key").value.trim());
    refresh();
  };
  $("api-key").value = sessionStorage.getItem("adapterkit-api-key") || "";
  $("key-form").addEventListener("submit", (e) => { e.preventDefault(); useKey(); });
  $("api-key").addEventListener("change", useKey);
  refresh();
});
