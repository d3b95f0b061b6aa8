// The search page: plain JavaScript over the JSON API under /api/ (no build step, nothing
// loaded from elsewhere). State: the target, the query (an indexed image or an upload), its
// box in the upright image's pixels, and the last search's token (for the CAM views).
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  targets: [], target: null, query: null, box: null, token: null,
  offset: 0, uploadUrl: null,
};
const PAGE = 200;

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

function selectTarget(value) {
  const [kind, ...rest] = value.split(":");
  state.target = state.targets.find((t) => t.kind === kind && t.name === rest.join(":"));
  showFreshness();
  state.offset = 0;
  $("images").replaceChildren();
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
  const params = targetParams();
  params.set("offset", state.offset);
  params.set("limit", PAGE);
  const text = $("filter").value.trim();
  if (text) params.set("q", text);
  const data = await api(`/api/images?${params}`);
  const list = $("images");
  if (!append) list.replaceChildren();
  for (const item of data.items) {
    const li = el("li", { dataset: { id: item.id, dataset: item.dataset } },
      el("img", { src: `${item.image}&size=64`, alt: "", loading: "lazy" }));
    const text = el("span");
    if (item.query) text.append(el("span", { class: "q" }, `★ ${item.query}`), el("br"));
    text.append(item.id);
    li.append(text);
    li.addEventListener("click", () => pickImage(item, li));
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

function pickImage(item, li) {
  for (const other of document.querySelectorAll(".image-list li.selected")) {
    other.classList.remove("selected");
  }
  li.classList.add("selected");
  $("upload").value = "";
  state.query = { kind: "id", id: item.id, dataset: item.dataset, name: item.query,
    width: item.width, height: item.height };
  state.box = item.box ? item.box.slice() : null;
  $("query-title").textContent = item.query
    ? `ground-truth query ${item.query} (${item.id}), box from the ground truth`
    : `${item.id} (${item.dataset})`;
  showQueryImage(`${item.image}&size=1024`);
}

function pickUpload(file) {
  for (const other of document.querySelectorAll(".image-list li.selected")) {
    other.classList.remove("selected");
  }
  if (state.uploadUrl) URL.revokeObjectURL(state.uploadUrl);
  state.uploadUrl = URL.createObjectURL(file);
  state.query = { kind: "upload", file, name: file.name, width: 0, height: 0 };
  state.box = null;
  $("query-title").textContent = `uploaded ${file.name} (${(file.size / 1024).toFixed(0)} KiB)`;
  showQueryImage(state.uploadUrl);
}

function showQueryImage(src) {
  const img = $("query-img");
  $("canvas").hidden = false;
  $("search").disabled = false;
  img.onload = () => {
    if (state.query && state.query.kind === "upload") {
      state.query.width = img.naturalWidth;   // browsers apply the EXIF orientation too
      state.query.height = img.naturalHeight;
    }
    drawBox();
  };
  img.onerror = () => {
    // An upload the browser cannot show may still be decodable by the server (or not: then
    // the search says why); an indexed image that fails to load is an error of its own.
    if (state.query && state.query.kind === "id") showError(`cannot load image ${state.query.id}`);
    $("box").hidden = true;
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
  $("clear-box").addEventListener("click", () => { state.box = null; drawBox(); });
  window.addEventListener("resize", drawBox);
}

// ---------------------------------------------------------------- search and results

function methodName() {
  let m = $("method").value;
  const r = parseInt($("rerank").value || "0", 10);
  const qe = parseInt($("qe").value || "0", 10);
  if (r > 0) m += `+r${r}`;
  if (qe > 0) m += `+qe${qe}`;
  return m;
}

async function search() {
  if (!state.query) return;
  showError("");
  const params = targetParams();
  params.set("method", methodName());
  params.set("top", $("top").value || "20");
  if (state.box) params.set("box", state.box.map((v) => v.toFixed(1)).join(","));
  let options;
  if (state.query.kind === "id") {
    params.set("id", state.query.id);
    params.set("image_dataset", state.query.dataset);
    if (state.query.name) params.set("query", state.query.name);
  } else {
    params.set("filename", state.query.name);
    options = { method: "POST", body: state.query.file,
      headers: { "Content-Type": state.query.file.type || "application/octet-stream" } };
  }
  const btn = $("search");
  btn.disabled = true;
  btn.textContent = "Searching…";
  $("summary").textContent = "searching…";
  try {
    showResults(await api(`/api/search?${params}`, options));
  } catch (err) {
    $("summary").textContent = "";
    $("results").replaceChildren();
    showError(err.message);
  } finally {
    btn.disabled = false;
    btn.textContent = "Search";
  }
}

function showResults(data) {
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
  if (data.results.some((r) => r.label)) {
    const legend = el("div", { class: "legend muted" });
    for (const label of ["positive", "negative", "junk"]) {
      legend.append(el("span", {}, el("i", { class: `swatch ${label}` }), label));
    }
    summary.append(legend);
  }
  const grid = $("results");
  grid.replaceChildren();
  for (const r of data.results) {
    const tile = el("div", {
      class: `tile ${r.label || ""}`, tabindex: "0",
      dataset: { id: r.id, dataset: r.dataset, rank: r.rank, label: r.label || "" },
    },
    el("img", { src: `${r.image}&size=256`, alt: r.id, loading: "lazy" }),
    el("div", { class: "cap" }, el("b", {}, `#${r.rank}`), r.score.toFixed(4), el("br"), r.id));
    tile.addEventListener("click", () => openDetail(r));
    tile.addEventListener("keydown", (ev) => { if (ev.key === "Enter") openDetail(r); });
    grid.append(tile);
  }
}

async function openDetail(r) {
  const params = new URLSearchParams({ token: state.token, dataset: r.dataset, id: r.id });
  const dlg = $("detail");
  $("detail-title").textContent = `#${r.rank} ${r.id} · score ${r.score.toFixed(4)}` +
    (r.label ? ` · ${r.label}` : "");
  $("detail-img").removeAttribute("src");
  $("detail-info").textContent = "computing the CAM…";
  dlg.hidden = false;
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
    dlg.hidden = true;
    showError(err.message);
  }
}

// ---------------------------------------------------------------- wiring

window.addEventListener("DOMContentLoaded", () => {
  setupBox();
  $("target").addEventListener("change", (ev) => selectTarget(ev.target.value));
  let timer = null;
  $("filter").addEventListener("input", () => {
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
  $("detail-close").addEventListener("click", () => { $("detail").hidden = true; });
  $("detail").addEventListener("click", (ev) => {
    if (ev.target === $("detail")) $("detail").hidden = true;
  });
  document.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape") $("detail").hidden = true;
  });
  loadTargets().catch((err) => showError(err.message));
});
