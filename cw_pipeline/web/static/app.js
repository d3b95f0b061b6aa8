// The search page: plain JavaScript over the JSON API under /api/ (no build step, nothing
// loaded from elsewhere). State: the target, the query (an indexed image or an upload), its
// box in the upright image's pixels, and the last search's token (for the CAM views).
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  targets: [], target: null, query: null, box: null, token: null,
  offset: 0, uploadUrl: null,
  searchSeq: 0, controller: null,  // the latest search: older answers are dropped
  listSeq: 0,  // the latest image listing: a late answer for another target or filter is dropped
};
const PAGE = 200;
const MAX_TOP = 500;
//: Valid values of the number fields (the server checks them too, against the database).
const FIELDS = { top: [1, MAX_TOP], qe: [0, 1000], rerank: [0, 1000] };

function showError(message) {
  const el = $("error");
  el.textContent = message;
  el.hidden = !message;
}

async function api(url, options) {
  let response;
  try {
    response = await fetch(url, options);
  } catch (err) {
    throw new Error(`the server did not answer (${err.message})`);
  }
  let body = null;
  try {
    body = await response.json();
  } catch (err) {
    throw new Error(`${response.status} ${response.statusText} (not JSON)`);
  }
  if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
  return body;
}

function targetParams() {
  const t = state.target;
  return new URLSearchParams({ [t.kind]: t.name });
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

// ---------------------------------------------------------------- targets and freshness

async function loadTargets(keep) {
  const data = await api("/api/datasets");
  state.targets = data.targets;
  const sel = $("target");
  sel.replaceChildren();
  for (const t of data.targets) {
    let label = t.kind === "evaluation" ? `${t.name} (evaluation: ${t.datasets.join(" + ")})`
      : `${t.name}${t.ground_truth ? "" : " (no ground truth)"}`;
    if (t.state === "error") label = `${t.name} — error: cannot be searched`;
    sel.append(el("option", { value: `${t.kind}:${t.name}` }, label));
  }
  const wanted = keep || (data.targets.find((t) => t.state === "indexed") || data.targets[0]);
  if (wanted) {
    sel.value = `${wanted.kind}:${wanted.name}`;
    selectTarget(sel.value);
  }
}

function resetQuery() {
  // Nothing of another target stays on screen: its query, box, results and their searches.
  cancelSearch();
  state.query = null;
  state.box = null;
  state.token = null;
  $("upload").value = "";
  $("canvas").hidden = true;
  $("query-img").removeAttribute("src");
  $("query-title").textContent = "pick a query from the list or upload an image";
  $("box-text").textContent = "drag on the image to draw the query box";
  clearResults();
  updateSearchButton();
}

function selectTarget(value) {
  const [kind, ...rest] = value.split(":");
  state.target = state.targets.find((t) => t.kind === kind && t.name === rest.join(":"));
  showError("");
  resetQuery();
  showFreshness();
  state.offset = 0;
  state.listSeq += 1;  // a listing of the previous target still on its way is dropped
  $("images").replaceChildren();
  $("images-more").replaceChildren();
  if (state.target && state.target.state === "error") return;  // its error is shown instead
  loadImages(false).catch((err) => showError(err.message));
}

function showFreshness() {
  const t = state.target;
  const f = $("freshness");
  if (!t) { f.textContent = ""; return; }
  if (t.state === "error") {
    f.replaceChildren(el("span", { class: "stale" }, `cannot be searched: ${t.error}`));
    return;
  }
  const when = t.materialized ? new Date(t.materialized).toLocaleString() : "never";
  const parts = [
    `${t.images_indexed} images indexed`,
    `${t.not_indexed} on disk not indexed yet`,
    `last materialization ${when}`,
  ];
  f.replaceChildren(parts.join(" · "));
  if (t.state !== "indexed") {
    f.append(" · ", el("span", { class: "stale" },
      `index ${t.state}${t.hint ? ` — run: ${t.hint}` : ""}`));
  }
}

// ---------------------------------------------------------------- the image list

async function loadImages(append) {
  const seq = ++state.listSeq;
  const params = targetParams();
  params.set("offset", state.offset);
  params.set("limit", PAGE);
  const text = $("filter").value.trim();
  if (text) params.set("q", text);
  const data = await api(`/api/images?${params}`);
  if (seq !== state.listSeq) return;  // another target, filter or page was asked for since
  const list = $("images");
  if (!append) list.replaceChildren();
  for (const item of data.items) {
    const li = el("li", { dataset: { id: item.id, dataset: item.dataset }, tabindex: "0",
      role: "option", "aria-selected": "false" },
    el("img", { src: `${item.image}&size=64`, alt: "", loading: "lazy" }));
    const text = el("span");
    if (item.query) text.append(el("span", { class: "q" }, `★ ${item.query}`), el("br"));
    text.append(item.id);
    li.append(text);
    li.addEventListener("click", () => pickImage(item, li));
    li.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); pickImage(item, li); }
      else if (ev.key === "ArrowDown" && li.nextElementSibling) {
        ev.preventDefault(); li.nextElementSibling.focus();
      } else if (ev.key === "ArrowUp" && li.previousElementSibling) {
        ev.preventDefault(); li.previousElementSibling.focus();
      }
    });
    list.append(li);
  }
  state.offset = data.offset + data.items.length;
  const more = $("images-more");
  more.replaceChildren(`${state.offset} of ${data.total} images` +
    (data.queries ? ` (${data.queries} ground-truth queries first)` : ""));
  if (state.offset < data.total) {
    const btn = el("button", { type: "button" }, "more");
    btn.addEventListener("click", () => loadImages(true).catch((e) => showError(e.message)));
    more.append(" ", btn);
  }
}

function clearResults() {
  // Results belong to the query that was searched: none are shown under another one.
  state.token = null;
  $("summary").replaceChildren();
  $("results").replaceChildren();
}

function unselect() {
  for (const other of document.querySelectorAll(".image-list li.selected")) {
    other.classList.remove("selected");
    other.setAttribute("aria-selected", "false");
  }
}

function pickImage(item, li) {
  showError("");
  cancelSearch();
  clearResults();
  unselect();
  li.classList.add("selected");
  li.setAttribute("aria-selected", "true");
  $("upload").value = "";
  state.query = { kind: "id", id: item.id, dataset: item.dataset, name: item.query,
    width: item.width, height: item.height };
  state.box = item.box ? item.box.slice() : null;
  $("query-title").textContent = item.query
    ? `ground-truth query ${item.query} (${item.id}), box from the ground truth`
    : `${item.id} (${item.dataset})`;
  showQueryImage(`${item.image}&size=1024`);
}

async function pickUpload(file) {
  showError("");
  cancelSearch();
  clearResults();
  unselect();
  if (state.uploadUrl) URL.revokeObjectURL(state.uploadUrl);
  state.uploadUrl = null;
  state.query = null;
  state.box = null;
  $("canvas").hidden = true;
  $("box-text").textContent = "";
  updateSearchButton();
  $("query-title").textContent = `reading ${file.name}…`;
  // Read by the server as a search would, at once: a broken file is reported now.
  const params = targetParams();
  params.set("filename", file.name);
  let info;
  try {
    info = await api(`/api/upload?${params}`, { method: "POST", body: file,
      headers: { "Content-Type": file.type || "application/octet-stream" } });
  } catch (err) {
    $("query-title").textContent = "pick a query from the list or upload an image";
    $("upload").value = "";
    showError(err.message);
    return;
  }
  state.uploadUrl = URL.createObjectURL(file);
  state.query = { kind: "upload", file, name: file.name, width: info.width, height: info.height };
  $("query-title").textContent = `uploaded ${file.name} (${info.width}×${info.height}, ` +
    `${(file.size / 1024).toFixed(0)} KiB)`;
  showQueryImage(state.uploadUrl);
}

function showQueryImage(src) {
  const img = $("query-img");
  const query = state.query;
  $("canvas").hidden = false;
  $("box").hidden = true;
  drawBox();
  updateSearchButton();
  img.onload = () => { if (state.query === query) drawBox(); };
  img.onerror = () => {
    if (state.query !== query) return;  // another query was picked meanwhile
    $("canvas").hidden = true;
    if (query.kind === "id") {
      showError(`cannot load image ${query.id}`);
    } else {  // the server reads it (checked): only this browser cannot show it
      $("box-text").textContent = "this browser cannot show the file: the whole image is searched";
    }
  };
  img.src = src;
}

// ---------------------------------------------------------------- the query box

function scale() {
  const img = $("query-img");
  if (!state.query || !state.query.width || !img.clientWidth) return 0;
  return img.clientWidth / state.query.width;
}

function drawBox() {
  const box = $("box");
  const s = scale();
  const text = $("box-text");
  if (!state.box || !s) {
    box.hidden = true;
    text.textContent = "whole image · drag on the image to draw the query box";
    return;
  }
  const [x1, y1, x2, y2] = state.box;
  Object.assign(box.style, {
    left: `${x1 * s}px`, top: `${y1 * s}px`,
    width: `${(x2 - x1) * s}px`, height: `${(y2 - y1) * s}px`,
  });
  box.hidden = false;
  text.textContent = `box ${state.box.map((v) => Math.round(v)).join(", ")}`;
}

function setupBox() {
  const canvas = $("canvas");
  let drag = null;
  const point = (ev) => {
    const r = $("query-img").getBoundingClientRect();
    const s = scale();
    const x = Math.min(Math.max(ev.clientX - r.left, 0), r.width) / s;
    const y = Math.min(Math.max(ev.clientY - r.top, 0), r.height) / s;
    return [x, y];
  };
  canvas.addEventListener("pointerdown", (ev) => {
    if (!scale()) return;
    ev.preventDefault();
    canvas.setPointerCapture(ev.pointerId);
    const [x, y] = point(ev);
    const handle = ev.target.classList.contains("handle") ? ev.target.classList[1] : null;
    if (handle && state.box) {
      const [x1, y1, x2, y2] = state.box;
      const ax = handle.includes("w") ? x2 : x1;
      const ay = handle.includes("n") ? y2 : y1;
      drag = { mode: "new", ax, ay, moved: true };
    } else if (ev.target === $("box") && state.box) {
      drag = { mode: "move", x, y, start: state.box.slice(), moved: false };
    } else {
      drag = { mode: "new", ax: x, ay: y, moved: false, old: state.box };
    }
  });
  canvas.addEventListener("pointermove", (ev) => {
    if (!drag) return;
    const [x, y] = point(ev);
    const w = state.query.width, h = state.query.height;
    if (drag.mode === "move") {
      const [x1, y1, x2, y2] = drag.start;
      const dx = Math.min(Math.max(x - drag.x, -x1), w - x2);
      const dy = Math.min(Math.max(y - drag.y, -y1), h - y2);
      state.box = [x1 + dx, y1 + dy, x2 + dx, y2 + dy];
    } else {
      if (Math.abs(x - drag.ax) * scale() < 3 && Math.abs(y - drag.ay) * scale() < 3 && !drag.moved) return;
      drag.moved = true;
      state.box = [Math.min(drag.ax, x), Math.min(drag.ay, y), Math.max(drag.ax, x), Math.max(drag.ay, y)];
    }
    drawBox();
  });
  const end = () => {
    if (!drag) return;
    if (drag.mode === "new" && !drag.moved) state.box = drag.old || null;
    if (state.box && (state.box[2] - state.box[0] < 2 || state.box[3] - state.box[1] < 2)) {
      state.box = drag.old || null;
    }
    drag = null;
    drawBox();
  };
  canvas.addEventListener("pointerup", end);
  canvas.addEventListener("pointercancel", end);
  $("clear-box").addEventListener("click", () => { showError(""); state.box = null; drawBox(); });
  window.addEventListener("resize", drawBox);
}

// ---------------------------------------------------------------- search and results

function fieldProblem(name) {
  const input = $(name);
  const [lo, hi] = FIELDS[name];
  const text = input.value.trim();
  if (text === "" && name !== "top") return null;
  if (!/^\d+$/.test(text)) return `a whole number from ${lo} to ${hi}`;
  const v = parseInt(text, 10);
  if (v < lo || v > hi) return `from ${lo} to ${hi}`;
  return null;
}

function checkFields() {
  let ok = true;
  for (const name of Object.keys(FIELDS)) {
    const problem = fieldProblem(name);
    $(`${name}-error`).textContent = problem || "";
    $(name).setAttribute("aria-invalid", problem ? "true" : "false");
    if (problem) ok = false;
  }
  return ok;
}

function updateSearchButton() {
  const busy = state.controller !== null;
  const btn = $("search");
  btn.disabled = busy || !state.query || !checkFields();
  btn.textContent = busy ? "Searching…" : "Search";
}

function cancelSearch() {
  if (state.controller) state.controller.abort();
  state.controller = null;
  state.searchSeq += 1;  // an answer still on its way is dropped
  $("progress").hidden = true;
  clearInterval(state.ticker);
  updateSearchButton();
}

function methodName() {
  let m = $("method").value;
  const r = parseInt($("rerank").value || "0", 10);
  const qe = parseInt($("qe").value || "0", 10);
  if (r > 0) m += `+r${r}`;
  if (qe > 0) m += `+qe${qe}`;
  return m;
}

async function search() {
  if (!state.query || !checkFields()) return;
  showError("");
  cancelSearch();
  const seq = state.searchSeq;
  const controller = new AbortController();
  state.controller = controller;
  const params = targetParams();
  params.set("method", methodName());
  params.set("top", $("top").value || "20");
  if (state.box) params.set("box", state.box.map((v) => v.toFixed(1)).join(","));
  let options = {};
  if (state.query.kind === "id") {
    params.set("id", state.query.id);
    params.set("image_dataset", state.query.dataset);
    if (state.query.name) params.set("query", state.query.name);
  } else {
    params.set("filename", state.query.name);
    options = { method: "POST", body: state.query.file,
      headers: { "Content-Type": state.query.file.type || "application/octet-stream" } };
  }
  options.signal = controller.signal;
  updateSearchButton();
  const started = performance.now();
  const progress = $("progress");
  progress.hidden = false;
  $("progress-text").textContent = "searching…";
  state.ticker = setInterval(() => {
    $("progress-text").textContent =
      `searching… ${((performance.now() - started) / 1000).toFixed(1)} s`;
  }, 100);
  $("results-panel").setAttribute("aria-busy", "true");
  try {
    const data = await api(`/api/search?${params}`, options);
    if (seq !== state.searchSeq) return;  // a newer search (or query) replaced this one
    showResults(data, parseInt(params.get("top"), 10));
  } catch (err) {
    if (seq !== state.searchSeq) return;
    $("summary").replaceChildren();
    $("results").replaceChildren();
    showError(err.message);
  } finally {
    if (seq === state.searchSeq) {
      state.controller = null;
      progress.hidden = true;
      clearInterval(state.ticker);
      $("results-panel").setAttribute("aria-busy", "false");
      updateSearchButton();
    }
  }
}

function showResults(data, top) {
  state.token = data.token;
  const t = data.timings_ms;
  const summary = $("summary");
  summary.replaceChildren();
  const head = el("div");
  if (data.ap !== null && data.ap !== undefined) {
    head.append(el("span", { class: "ap", id: "ap" }, `AP ${data.ap.toFixed(4)}`),
      ` for ground-truth query ${data.query.query} (${data.query.positives} positives) · `);
  } else if (data.query.query) {
    head.append(`ground-truth query ${data.query.query} has no positives · `);
  }
  head.append(`${data.results.length} of ${data.database} images · method ${data.method}` +
    ` · ${data.descriptors}`);
  summary.append(head);
  const classes = data.query.classes.map((c) => `${c.name} ${(100 * c.prob).toFixed(1)}%`);
  summary.append(el("div", { class: "muted" }, `query classes: ${classes.join(", ")}`));
  const timing = `query features ${t.features} ms · ranking ${t.ranking} ms · server ${t.server} ms` +
    (t.index_load ? ` (index loaded: ${t.index_load} ms)` : "") +
    (t.model_load ? ` (model loaded: ${t.model_load} ms)` : "") +
    (data.map_forward_passes ? ` · ${data.map_forward_passes} forward passes for feature maps` : "");
  summary.append(el("div", { class: "timings", id: "timings" }, timing));
  const legend = el("div", { class: "legend muted" });
  const labels = new Set(data.results.map((r) => r.label || "unlabelled"));
  for (const label of ["positive", "negative", "junk", "unlabelled"]) {
    if (!labels.has(label)) continue;
    const text = label === "unlabelled" ? "not labelled (no ground truth for this query)" : label;
    legend.append(el("span", {}, el("i", { class: `swatch ${label}` }), text));
  }
  summary.append(legend);
  const grid = $("results");
  grid.replaceChildren();
  for (const r of data.results) {
    const label = r.label || "unlabelled";
    const tile = el("div", {
      class: `tile ${label}`, tabindex: "0", role: "button",
      "aria-label": `result ${r.rank}: ${r.id}, ${label}, score ${r.score.toFixed(4)}`,
      dataset: { id: r.id, dataset: r.dataset, rank: r.rank, label: r.label || "" },
    },
    el("img", { src: `${r.image}&size=256`, alt: r.id, loading: "lazy" }),
    el("div", { class: "cap" }, el("b", {}, `#${r.rank}`), r.score.toFixed(4), el("br"), r.id));
    tile.addEventListener("click", () => openDetail(r, tile));
    tile.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); openDetail(r, tile); }
    });
    grid.append(tile);
  }
  // More results: the same search with a larger top-k, up to the maximum and the database.
  const most = Math.min(MAX_TOP, data.database);
  if (data.results.length >= top && top < most) {
    const more = el("button", { type: "button", id: "more-results", class: "more" },
      `more results (${Math.min(most, top * 2)})`);
    more.addEventListener("click", () => {
      $("top").value = String(Math.min(most, top * 2));
      search();
    });
    grid.append(more);
  }
}

let detailOpener = null;

function closeDetail() {
  $("detail").hidden = true;
  if (detailOpener) detailOpener.focus();
  detailOpener = null;
}

async function openDetail(r, tile) {
  showError("");
  detailOpener = tile || null;
  const params = new URLSearchParams({ token: state.token, dataset: r.dataset, id: r.id });
  const dlg = $("detail");
  $("detail-title").textContent = `#${r.rank} ${r.id} · score ${r.score.toFixed(4)}` +
    (r.label ? ` · ${r.label}` : "");
  $("detail-img").removeAttribute("src");
  $("detail-info").textContent = "computing the CAM…";
  dlg.hidden = false;
  $("detail-close").focus();
  try {
    const d = await api(`/api/detail?${params}`);
    $("detail-img").src = d.overlay;
    const best = d.regions[d.best];
    const info = $("detail-info");
    info.replaceChildren(
      el("div", {}, `CAM of the query's top classes: ${d.classes.map((c) => c.name).join(", ")}`),
      el("div", {}, d.whole_image_best
        ? `re-ranking box: the whole image scores best (${best.score.toFixed(4)})`
        : `re-ranking box ${best.box.map((v) => Math.round(v)).join(", ")}: score ` +
          `${best.score.toFixed(4)} (whole image ${d.regions[0].score.toFixed(4)})`),
      el("div", {}, el("a", { href: d.dagster, target: "_blank", rel: "noopener", id: "dagster-link" },
        "the descriptors asset in the Dagster UI (lineage)")));
  } catch (err) {
    $("detail-info").textContent = "";
    closeDetail();
    showError(err.message);
  }
}

// ---------------------------------------------------------------- wiring

window.addEventListener("DOMContentLoaded", () => {
  setupBox();
  $("target").addEventListener("change", (ev) => selectTarget(ev.target.value));
  let timer = null;
  $("filter").addEventListener("input", () => {
    showError("");
    clearTimeout(timer);
    timer = setTimeout(() => {
      state.offset = 0;
      loadImages(false).catch((err) => showError(err.message));
    }, 250);
  });
  $("upload").addEventListener("change", (ev) => {
    if (ev.target.files.length) pickUpload(ev.target.files[0]);
  });
  $("controls").addEventListener("submit", (ev) => { ev.preventDefault(); search(); });
  for (const name of Object.keys(FIELDS)) {
    $(name).addEventListener("input", () => updateSearchButton());
  }
  $("method").addEventListener("change", () => showError(""));
  $("detail-close").addEventListener("click", closeDetail);
  $("detail").addEventListener("click", (ev) => {
    if (ev.target === $("detail")) closeDetail();
  });
  document.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape" && !$("detail").hidden) closeDetail();
  });
  loadTargets().catch((err) => showError(err.message));
});
