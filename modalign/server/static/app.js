// modalign search page: plain JavaScript, no build step, no external resources.
"use strict";

const token = new URLSearchParams(location.search).get("access_token");
const $ = (id) => document.getElementById(id);
let info = null;

function authHeaders(extra) {
  const headers = Object.assign({}, extra || {});
  if (token) headers["Authorization"] = "Bearer " + token;
  return headers;
}

function withToken(url) {
  if (!token || !url) return url;
  return url + (url.includes("?") ? "&" : "?") + "access_token=" + encodeURIComponent(token);
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function chosenTargets() {
  return Array.from(document.querySelectorAll("#targets input:checked")).map((el) => el.value);
}

function renderTargets() {
  const box = $("targets");
  box.textContent = "";
  for (const [name, stats] of Object.entries(info.index.modalities)) {
    const label = document.createElement("label");
    const input = document.createElement("input");
    input.type = "checkbox";
    input.value = name;
    input.checked = true;
    input.name = "target";
    label.append(input, " " + name + " (" + stats.items + ")");
    box.append(label);
  }
}

async function loadInfo() {
  const res = await fetch("info", { headers: authHeaders() });
  if (!res.ok) throw new Error("cannot read /info: HTTP " + res.status);
  info = await res.json();
  const counts = Object.entries(info.index.modalities).map(([m, s]) => s.items + " " + m);
  $("about").textContent = "index \u201c" + info.index.name + "\u201d: " + counts.join(", ") +
    " \u00b7 model " + info.model.fingerprint.slice(0, 12);
  renderTargets();
}

function queryOptions() {
  const k = parseInt($("k").value, 10) || 10;
  return { k: k, target: chosenTargets() };
}

async function runSearch(describe, init) {
  showError("");
  $("status").textContent = "searching " + describe + "\u2026";
  const started = performance.now();
  let res;
  try {
    res = await fetch("search", init);
  } catch (err) {
    showError("the server did not answer: " + err);
    $("status").textContent = "";
    return;
  }
  const body = await res.json().catch(() => ({}));
  if (!res.ok) {
    const e = body.error || {};
    showError((e.field ? e.field + ": " : "") + (e.message || "HTTP " + res.status));
    $("status").textContent = "";
    return;
  }
  const ms = Math.round(performance.now() - started);
  $("status").textContent = body.results.length + " results for " + describe + " (" + ms + " ms)";
  renderResults(body.results);
}

function searchText(text) {
  const payload = Object.assign({ text: text }, queryOptions());
  return runSearch("\u201c" + text + "\u201d", {
    method: "POST",
    headers: authHeaders({ "Content-Type": "application/json" }),
    body: JSON.stringify(payload),
  });
}

function modalityForFile(file) {
  const name = file.name.toLowerCase();
  for (const [m, spec] of Object.entries(info.query_modalities)) {
    if (!spec.inline && spec.suffixes.some((s) => name.endsWith(s))) return m;
  }
  return null;
}

function searchFile(file) {
  const modality = modalityForFile(file);
  if (!modality) {
    const known = Object.values(info.query_modalities).flatMap((s) => s.suffixes);
    showError(file.name + ": no modality of this model takes this file type (" + known.join(" ") + ")");
    return Promise.resolve();
  }
  const form = new FormData();
  form.append(modality, file, file.name);
  const opts = queryOptions();
  form.append("k", String(opts.k));
  for (const t of opts.target) form.append("target", t);
  return runSearch(modality + " " + file.name, { method: "POST", headers: authHeaders(), body: form });
}

function searchItem(id, modality) {
  const payload = Object.assign({ id: id, modality: modality }, queryOptions());
  return runSearch(modality + " item " + id, {
    method: "POST",
    headers: authHeaders({ "Content-Type": "application/json" }),
    body: JSON.stringify(payload),
  });
}

function mediaElement(hit) {
  const type = hit.media_type || "";
  if (hit.media_url && type.startsWith("image/")) {
    const img = document.createElement("img");
    img.src = withToken(hit.media_url.replace(/^\//, ""));
    img.alt = hit.caption || hit.id;
    img.loading = "lazy";
    return img;
  }
  if (hit.media_url && type.startsWith("audio/")) {
    const audio = document.createElement("audio");
    audio.controls = true;
    audio.preload = "none";
    audio.src = withToken(hit.media_url.replace(/^\//, ""));
    audio.addEventListener("click", (ev) => ev.stopPropagation());
    return audio;
  }
  const div = document.createElement("div");
  div.className = "text";
  div.textContent = hit.text !== undefined ? hit.text : hit.id;
  return div;
}

function renderResults(results) {
  const grid = $("results");
  grid.textContent = "";
  results.forEach((hit, rank) => {
    const card = document.createElement("article");
    card.className = "card";
    card.dataset.id = hit.id;
    card.dataset.modality = hit.modality;
    card.title = "search by this " + hit.modality;
    card.append(mediaElement(hit));
    const caption = document.createElement("div");
    caption.className = "caption";
    // a text hit shows its text already; other hits show their item's caption
    caption.textContent = hit.caption && hit.caption !== hit.text ? hit.caption : "";
    const meta = document.createElement("div");
    meta.className = "meta";
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.textContent = "#" + (rank + 1) + " " + hit.modality + (hit.label ? " \u00b7 " + hit.label : "");
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = hit.score.toFixed(3);
    meta.append(badge, score);
    card.append(caption, meta);
    card.addEventListener("click", () => searchItem(hit.id, hit.modality));
    grid.append(card);
  });
}

function setUp() {
  $("query-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = $("text").value.trim();
    if (text) searchText(text);
    else showError("type a query or drop a file");
  });
  $("file").addEventListener("change", (ev) => {
    const file = ev.target.files[0];
    if (file) searchFile(file);
    ev.target.value = "";
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (ev) => {
    ev.preventDefault();
    drop.classList.remove("over");
    const file = ev.dataTransfer.files[0];
    if (file) searchFile(file);
  });
  loadInfo().catch((err) => showError(String(err.message || err)));
}

setUp();
