// deepvis atlas viewer. Plain ES module, no build step, nothing from outside the atlas.
//
// Reads ./data/model.json and ./data/layers/<layer>.json (written by atlas_viewer/publish.py), the
// layer sprite sheets ./data/sprites/<layer>/<preset>-<n>.png, and the atlas's own images
// ../units/<layer>/<unit>/<preset>.png, and the dataset crops the layer data's rows name: schema 3's
// input images ../inputs/<sha>.jpg (a row's crop is its box cut out of one: clippedCrop), schema 2's
// shared ../crops/<sha>.jpg, or schema 1's ../units/<layer>/<unit>/top-<r>.jpg. All URLs are relative, so the
// viewer works wherever the atlas lies (a static server, an S3 website, `deepvis serve`).
//
// Safety: every string from data (layer names, image ids, class names, errors) reaches the page
// through textContent, attributes or URL-encoded path segments; this file never uses innerHTML.

const DATA = "./data/";
const UNITS = "../units/";

const state = {
  model: null,
  version: "",
  layers: new Map(),        // name -> Promise<layer data>
  sheets: new Map(),        // sheet url -> Promise<boolean loaded>
  view: null,               // grid view of the layer page: a preset, or "top-0" (top dataset crop)
  tile: 64,
  sort: "unit",
  datasetRoute: false,      // served by `deepvis serve` with the dataset: ../dataset/<id>
  route: null,
  observer: null,
};

// ------------------------------------------------------------------ DOM helpers (no innerHTML)
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  setAttrs(e, attrs);
  append(e, children);
  return e;
}

function svg(tag, attrs, ...children) {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  setAttrs(e, attrs);
  append(e, children);
  return e;
}

function setAttrs(e, attrs) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.setAttribute("class", v);
    else if (k === "text") e.textContent = String(v);
    else if (k.startsWith("on") && typeof v === "function") e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : String(v));
  }
}

// replace the children of e (null/false children are skipped)
function show(e, ...children) {
  e.replaceChildren();
  append(e, children);
}

function append(e, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

const enc = (s) => encodeURIComponent(String(s));
const encPath = (s) => String(s).split("/").map(encodeURIComponent).join("/");

function fmt(v, digits = 4) {
  if (v === null || v === undefined || Number.isNaN(v)) return "—";
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1e5 || a < 1e-3) return v.toExponential(2);
  return v.toPrecision(digits);
}

const pct = (v) => (v === null || v === undefined ? "—" : `${(100 * v).toFixed(1)}%`);

// ------------------------------------------------------------------ data
async function getJSON(url) {
  const res = await fetch(url, { cache: "no-cache" });
  if (!res.ok) throw new Error(`${url}: HTTP ${res.status}`);
  return [await res.json(), res];
}

async function loadModel() {
  const [model, res] = await getJSON(`${DATA}model.json`);
  state.model = model;
  state.version = model.version || "";
  state.datasetRoute = res.headers.get("X-Deepvis-Dataset") === "1";
  const names = document.getElementById("layer-names");
  names.replaceChildren(...model.layers.map((l) => el("option", { value: l.name })));
  const issues = issueCount(model);
  const link = document.getElementById("issues-link");
  link.textContent = `${issues} issue${issues === 1 ? "" : "s"}`;
  link.hidden = issues === 0;
  return model;
}

function issueCount(model) {
  let n = (model.failed_shards || []).length;
  for (const l of model.layers) n += l.dead + l.failed + problemMissing(l).length;
  return n;
}

function problemMissing(l) {
  const seen = new Set();
  for (const units of Object.values((l.problems || {}).missing || {})) units.forEach((u) => seen.add(u));
  for (const u of (l.problems || {}).crops_missing || []) seen.add(u);
  return [...seen];
}

function layerInfo(name) {
  return state.model.layers.find((l) => l.name === name) || null;
}

function loadLayer(name) {
  if (!state.layers.has(name)) {
    const p = getJSON(`${DATA}layers/${enc(name)}.json?v=${enc(state.version)}`).then(([d]) => indexLayer(d));
    p.catch(() => state.layers.delete(name));
    state.layers.set(name, p);
  }
  return state.layers.get(name);
}

function indexLayer(d) {
  d.pos = new Map(d.units.map((u, i) => [u, i]));
  d.failedOpt = new Set(d.failed_opt || []);
  d.failedCrop = new Set(d.failed_crop || []);
  return d;
}

const TOP_VIEW = "top-0";
const viewName = (v) => (v === TOP_VIEW ? "top dataset image" : v);

// why a unit's image of a view (preset) is absent: "failed" | "dead" | "missing" | null (present)
function absence(d, i, view) {
  if (d.image[view] && d.image[view][i]) return null;
  const u = d.units[i];
  if (view === TOP_VIEW) return d.failedCrop.has(u) ? "failed" : "missing";
  if (d.failedOpt.has(u)) return "failed";
  if (d.dead[view] && d.dead[view][i]) return "dead";
  return "missing";
}

function isDead(d, i) {
  return d.presets.some((p) => d.dead[p] && d.dead[p][i]);
}

function unitImageURL(layer, unit, name) {
  return `${UNITS}${enc(layer)}/${enc(unit)}/${enc(name)}?v=${enc(state.version)}`;
}

// the object of a top/bottom row's crop: the key publish.py wrote (row[10], any layout; with row[11]
// = 1 an input image the crop is cut from), else (a layer file of an older publish) schema 1's per-unit name
function cropURL(d, u, kind, rank, key) {
  return key ? `../${encPath(key)}?v=${enc(state.version)}` : unitImageURL(d.name, u, `${kind}-${rank}.jpg`);
}

function sheetURL(d, view, n) {
  const name = d.sheets[view] && d.sheets[view][n];
  return name ? `${DATA}sprites/${enc(d.name)}/${enc(name)}?v=${enc(state.version)}` : null;
}

function loadSheet(url) {
  if (!state.sheets.has(url)) {
    state.sheets.set(url, new Promise((resolve) => {
      const img = new Image();
      img.onload = () => resolve(true);
      img.onerror = () => resolve(false);
      img.src = url;
    }));
  }
  return state.sheets.get(url);
}

// link to the full source image of a top/bottom row: the dataset served by `deepvis serve`, an
// http(s) dataset, or else the row's object (the crop, or the input image it is cut from; the id is
// shown as text either way)
function sourceURL(id, cropURL) {
  if (state.datasetRoute) return `../dataset/${encPath(id)}`;
  const uri = state.model.dataset && state.model.dataset.uri;
  if (uri && /^https?:\/\//i.test(uri)) return `${uri.replace(/\/+$/, "")}/${encPath(id)}`;
  return cropURL;
}

// ------------------------------------------------------------------ routing
function parseRoute() {
  const raw = location.hash.replace(/^#\/?/, "");
  const qi = raw.indexOf("?");
  const path = qi < 0 ? raw : raw.slice(0, qi);
  const query = new URLSearchParams(qi < 0 ? "" : raw.slice(qi + 1));
  const dec = (s) => { try { return decodeURIComponent(s); } catch { return s; } };
  const parts = path.split("/").filter((s) => s !== "").map(dec);
  const view = query.get("view");
  if (parts[0] === "layer" && parts.length >= 2) {
    if (parts[2] === "unit" && parts.length >= 4) return { page: "unit", layer: parts[1], unit: parts[3] };
    return { page: "layer", layer: parts[1], view };
  }
  if (parts[0] === "missing") return { page: "missing" };
  return { page: "model" };
}

const layerHref = (name, view) => `#/layer/${enc(name)}${view ? `?view=${enc(view)}` : ""}`;
const unitHref = (name, unit) => `#/layer/${enc(name)}/unit/${enc(unit)}`;

function crumbs(...items) {
  const nav = document.getElementById("crumbs");
  const out = [];
  items.forEach(([text, href], i) => {
    if (i) out.push(el("span", { class: "sep", text: "›" }));
    out.push(href ? el("a", { href, text, title: text }) : el("span", { text, title: text }));
  });
  nav.replaceChildren(...out);
}

function view() {
  return document.getElementById("view");
}

async function render() {
  const route = parseRoute();
  state.route = route;
  if (state.observer) { state.observer.disconnect(); state.observer = null; }
  const v = view();
  try {
    if (!state.model) await loadModel();
    if (route.page === "layer") await renderLayer(v, route);
    else if (route.page === "unit") await renderUnit(v, route);
    else if (route.page === "missing") renderMissing(v);
    else renderModel(v);
  } catch (err) {
    console.error(err);
    show(v, 
      el("h1", { text: "Cannot show this page" }),
      el("p", { class: "error", text: String(err && err.message ? err.message : err) }),
      el("p", { class: "note", text: "The viewer reads ./data/ next to this page; an atlas built " +
        "before the viewer existed gets it with `deepvis serve ATLAS` (it publishes the viewer data)." }),
      el("p", {}, el("a", { href: "#/", text: "back to the model" })));
  }
}

// ------------------------------------------------------------------ model page
function renderModel(v) {
  const m = state.model;
  document.title = `${m.model.name || "model"} — deepvis atlas`;
  crumbs([m.model.name || "model", null]);
  const ds = m.dataset;
  const presets = m.presets.map((p) => (typeof p === "string" ? p : p.name));
  const meta = el("div", { class: "meta" },
    el("span", {}, "status ", el("span", { class: `badge ${m.status}`, text: m.status || "unknown" })),
    m.model.source ? el("span", {}, "source ", el("b", { text: m.model.source })) : null,
    m.model.input_size ? el("span", {}, "input ", el("b", { text: `${m.model.input_size}px` })) : null,
    el("span", {}, "presets ", el("b", { text: presets.length ? presets.join(", ") : "none" })),
    m.k ? el("span", {}, "k ", el("b", { text: m.k })) : null,
    ds ? el("span", {}, "dataset ", el("b", { class: "mono", text: ds.uri || "?" }), ` · ${ds.images_seen ?? ds.images ?? "?"} images`,
      ds.images_skipped ? el("span", { class: "warn", text: ` · ${ds.images_skipped} skipped` }) : null)
      : el("span", {}, "dataset ", el("b", { text: "none (optimization only)" })),
    m.build && m.build.finished ? el("span", {}, "built ", el("b", { text: m.build.finished }),
      m.build.seconds ? ` in ${fmt(m.build.seconds, 3)} s` : "") : null);

  const head = el("tr", {},
    el("th", { text: "layer" }), el("th", { text: "kind", class: "hide-narrow" }), el("th", { text: "shape", class: "hide-narrow" }),
    el("th", { class: "num", text: "units" }), el("th", { text: "images" }),
    el("th", { class: "num", text: "dead" }), el("th", { class: "num", text: "failed" }),
    el("th", { class: "num", text: "missing" }), m.has_topk ? el("th", { class: "num", text: "crops" }) : null);
  const rows = m.layers.map((l) => {
    const expected = l.selected * presets.length;
    const have = Object.values(l.images || {}).reduce((a, b) => a + b, 0);
    const frac = expected ? have / expected : 1;
    const miss = problemMissing(l).length;
    return el("tr", { "data-layer": l.name },
      el("td", { class: "name" }, el("a", { href: layerHref(l.name), text: l.name })),
      el("td", { class: "hide-narrow", text: l.kind || "" }),
      el("td", { class: "hide-narrow mono", text: l.shape ? `[${l.shape.join("×")}]` : "" }),
      el("td", { class: "num", text: l.selected === l.units ? `${l.units}` : `${l.selected} / ${l.units}` }),
      el("td", {}, presets.length
        ? [el("span", { class: `bar${frac < 1 ? " partial" : ""}` }, widthBar(frac)), `${have} / ${expected}`]
        : el("span", { class: "note", text: "—" })),
      el("td", { class: `num${l.dead ? " bad" : ""}`, text: l.dead }),
      el("td", { class: `num${l.failed ? " bad" : ""}`, text: l.failed }),
      el("td", { class: `num${miss ? " warn" : ""}`, text: miss }),
      m.has_topk ? el("td", { class: "num", text: l.crops_expected === null ? "—" : `${l.crops} / ${l.crops_expected}` }) : null);
  });
  const problems = issueCount(m);
  show(v, 
    el("h1", { text: m.model.name || "model" }), meta,
    problems ? el("p", { class: "warn" }, `${problems} issue${problems === 1 ? "" : "s"} (missing, dead or failed units, failed shards): `,
      el("a", { href: "#/missing", text: "see the report" })) : null,
    el("h2", { text: `${m.layers.length} layer${m.layers.length === 1 ? "" : "s"}` }),
    el("div", { class: "table-wrap" }, el("table", { id: "layers" }, el("thead", {}, head), el("tbody", {}, rows))),
    el("p", { class: "note" }, "Keys: ", el("span", { class: "kbd", text: "/" }), " jump to layer:unit · ",
      el("span", { class: "kbd", text: "←" }), " ", el("span", { class: "kbd", text: "→" }), " previous / next unit"));
}

function widthBar(frac) {
  const i = el("i");
  i.style.width = `${Math.round(100 * Math.max(0, Math.min(1, frac)))}%`;
  return i;
}

// ------------------------------------------------------------------ layer page
async function renderLayer(v, route) {
  const info = layerInfo(route.layer);
  if (!info) return notFound(v, `No layer ${JSON.stringify(route.layer)} in this atlas.`);
  crumbs([state.model.model.name || "model", "#/"], [info.name, null]);
  document.title = `${info.name} — deepvis atlas`;
  show(v, el("h1", { text: info.name }), el("p", { class: "note", text: "Loading the layer…" }));
  const d = await loadLayer(info.name);
  if (state.route !== route) return;
  const views = d.views || d.presets;
  if (route.view && views.includes(route.view)) state.view = route.view;
  if (!views.includes(state.view)) state.view = views[0] || null;
  const view = state.view;
  if (state.observer) { state.observer.disconnect(); state.observer = null; }   // re-render (size, sort)

  const controls = el("div", { class: "controls" });
  if (views.length > 1) {
    const sel = el("select", { "aria-label": "view", id: "view" },
      views.map((p) => el("option", { value: p, text: viewName(p), selected: p === view })));
    sel.addEventListener("change", () => { location.hash = layerHref(d.name, sel.value); });
    controls.append(el("label", {}, "show", sel));
  } else if (view) {
    controls.append(el("span", {}, "show ", el("b", { text: viewName(view) })));
  }
  const size = el("select", { "aria-label": "tile size", id: "tile-size" },
    [32, 48, 64, 96, 128].map((s) => el("option", { value: s, text: `${s}px`, selected: s === state.tile })));
  size.addEventListener("change", () => { state.tile = Number(size.value); renderLayer(v, route); });
  controls.append(el("label", {}, "tiles", size));
  const sorts = [["unit", "unit"], ["opt", "optimized activation"]];
  if (d.stats) sorts.push(["max", "dataset max"], ["mean", "dataset mean"]);
  const sort = el("select", { "aria-label": "sort", id: "sort" },
    sorts.map(([k, t]) => el("option", { value: k, text: t, selected: k === state.sort })));
  sort.addEventListener("change", () => { state.sort = sort.value; renderLayer(v, route); });
  controls.append(el("label", {}, "sort", sort));

  const dead = d.units.filter((_, i) => isDead(d, i)).length;
  const missing = view ? d.units.filter((_, i) => absence(d, i, view)).length : 0;
  const meta = el("div", { class: "meta" },
    el("span", {}, el("b", { text: d.units.length }), d.units.length === d.units_total ? " units" : ` of ${d.units_total} units`),
    d.kind ? el("span", { text: d.kind }) : null,
    d.shape ? el("span", { class: "mono", text: `[${d.shape.join("×")}]` }) : null,
    dead ? el("span", { class: "bad", text: `${dead} dead` }) : null,
    missing ? el("span", { class: "warn", text: `${missing} without image` }) : null,
    d.labels ? el("span", { text: "output layer (class names)" }) : null);

  const order = d.units.map((_, i) => i);
  const optOf = d.opt[view] || d.opt[d.presets[0]];
  const key = { opt: (i) => optOf && optOf[i], max: (i) => d.stats && d.stats.max[i],
                mean: (i) => d.stats && d.stats.mean[i] }[state.sort];
  if (key) order.sort((a, b) => (key(b) ?? -Infinity) - (key(a) ?? -Infinity) || a - b);

  const grid = el("div", { class: `grid${state.tile < 48 ? " small" : ""}`, id: "grid", "data-layer": d.name, "data-view": view || "" });
  grid.style.setProperty("--tile", `${state.tile}px`);
  const S = state.tile;
  const tiles = order.map((i) => {
    const u = d.units[i];
    const why = view ? absence(d, i, view) : "missing";
    const label = d.labels ? d.labels[i] : null;
    const a = el("a", {
      class: `tile${why ? " missing" : ""}${isDead(d, i) ? " dead" : ""}`, href: unitHref(d.name, u),
      "data-unit": u, "data-i": i, "data-state": why || "pending",
      title: `${d.name}:${u}${label ? ` — ${label}` : ""}${why ? ` (${why})` : ""}`,
    }, el("span", { class: "lbl", text: label ? `${u} ${label}` : u }), why ? el("span", { class: "why", text: why }) : null);
    if (!why) {
      // sheet n holds units n*per_sheet.., cols tiles a row (fewer in a sheet of fewer units)
      const j = i % d.per_sheet;
      const count = Math.min(d.per_sheet, d.units.length - (i - j));
      a.style.backgroundSize = `${Math.min(d.cols, count) * S}px ${Math.ceil(count / d.cols) * S}px`;
      a.style.backgroundPosition = `${-(j % d.cols) * S}px ${-Math.floor(j / d.cols) * S}px`;
    }
    return a;
  });
  grid.append(...tiles);
  show(v, el("h1", { text: d.name }), meta, controls, grid,
    d.units.length ? null : el("p", { class: "note", text: "This layer has no units in the atlas." }));

  // lazy: a tile's sprite sheet is requested when the tile comes near the viewport (one request a
  // sheet, shared by its tiles). data-visible-ms / data-ready-ms: when the first screen / every tile
  // is drawn (performance.now(), ms since navigation)
  let pending = tiles.filter((t) => t.dataset.state === "pending").length;
  const stamp = (k) => { if (!grid.dataset[k]) grid.dataset[k] = String(Math.round(performance.now())); };
  let first = true;
  const obs = new IntersectionObserver((entries) => {
    const waits = [];
    for (const e of entries) {
      if (!e.isIntersecting) continue;
      const t = e.target;
      obs.unobserve(t);
      const url = sheetURL(d, view, Math.floor(Number(t.dataset.i) / d.per_sheet));
      const done = (ok) => {
        if (ok) {
          t.style.backgroundImage = `url("${url}")`;
          t.dataset.state = "loaded";
        } else {
          t.classList.add("missing");
          t.dataset.state = "missing";
          t.append(el("span", { class: "why", text: "missing" }));
        }
        if (--pending === 0) stamp("readyMs");
      };
      const p = url ? loadSheet(url).then(done) : Promise.resolve(done(false));
      if (e.boundingClientRect.top < innerHeight) waits.push(p);
    }
    if (first) { first = false; Promise.all(waits).then(() => stamp("visibleMs")); }
  }, { rootMargin: "400px 0px" });
  state.observer = obs;
  tiles.forEach((t) => { if (t.dataset.state === "pending") obs.observe(t); });
  if (pending === 0) { stamp("visibleMs"); stamp("readyMs"); }
}

function notFound(v, msg) {
  crumbs([state.model.model.name || "model", "#/"], ["not found", null]);
  show(v, el("h1", { text: "Not found" }), el("p", { class: "error", text: msg }),
    el("p", {}, el("a", { href: "#/", text: "back to the model" })));
}

// ------------------------------------------------------------------ unit page
async function renderUnit(v, route) {
  const info = layerInfo(route.layer);
  if (!info) return notFound(v, `No layer ${JSON.stringify(route.layer)} in this atlas.`);
  const d = await loadLayer(info.name);
  if (state.route !== route) return;
  const u = Number(route.unit);
  const i = Number.isInteger(u) ? d.pos.get(u) : undefined;
  crumbs([state.model.model.name || "model", "#/"], [d.name, layerHref(d.name)], [`unit ${route.unit}`, null]);
  if (i === undefined) {
    return notFound(v, `Unit ${route.unit} of layer ${d.name} is not in this atlas ` +
      `(it holds ${d.units.length} of ${d.units_total} units${d.units.length ? `: ${d.units[0]}…${d.units[d.units.length - 1]}` : ""}).`);
  }
  const label = d.labels ? d.labels[i] : null;
  document.title = `${d.name}:${u}${label ? ` ${label}` : ""} — deepvis atlas`;
  const prev = i > 0 ? d.units[i - 1] : null;
  const next = i < d.units.length - 1 ? d.units[i + 1] : null;
  const navBtn = (text, target, id) => {
    const b = el("button", { id, text, disabled: target === null, title: target === null ? null : `unit ${target}` });
    b.addEventListener("click", () => { if (target !== null) location.hash = unitHref(d.name, target); });
    return b;
  };
  const badges = [];
  if (d.failedOpt.has(u)) badges.push(el("span", { class: "badge failed", text: "optimization shard failed" }));
  if (d.failedCrop.has(u)) badges.push(el("span", { class: "badge failed", text: "crop shard failed" }));
  for (const p of d.presets) if (d.dead[p] && d.dead[p][i]) badges.push(el("span", { class: "badge dead", text: `dead (${p})` }));

  const head = el("div", { class: "unit-head" },
    el("h1", { id: "unit-title", class: "mono", text: `${d.name}:${u}` }),
    label !== null && label !== undefined ? el("span", { class: "label", id: "class-name", text: label }) : null,
    badges,
    el("div", { class: "unit-nav" }, navBtn("← prev", prev, "prev"),
      el("span", { text: `${i + 1} / ${d.units.length}` }), navBtn("next →", next, "next")));

  // optimized images, the presets side by side
  const opt = el("div", { class: "row opt", id: "opt" }, d.presets.map((p) => {
    const why = absence(d, i, p);
    const media = why
      ? el("div", { class: `ph ${why}`, "data-missing": why, role: "img", "aria-label": `${p}: ${why}`, text: why === "missing" ? "image missing" : why })
      : el("a", { href: unitImageURL(d.name, u, `${p}.png`), title: "full size" },
        imgOrMissing({ src: unitImageURL(d.name, u, `${p}.png`), alt: `${d.name}:${u} optimized (${p})` }, "image missing"));
    const h = d.history[p] && d.history[p][i];
    const q = d.quality && d.quality[p];
    // the other images of a `--diversity n` build (modern presets): <preset>.1.png ... <preset>.<n-1>.png
    const extra = [];
    if (!why && modernPresets().has(p)) {
      for (let k = 1; k < diversity(); k++) {
        const src = unitImageURL(d.name, u, `${p}.${k}.png`);
        extra.push(el("a", { href: src, title: `${p}, diverse image ${k + 1}` },
          imgOrMissing({ src, alt: `${d.name}:${u} optimized (${p}, ${k + 1})`, class: "diverse" }, "missing")));
      }
    }
    return el("figure", { "data-preset": p }, media,
      extra.length ? el("div", { class: "diverse-row" }, extra) : null,
      el("figcaption", {}, el("b", { text: p }), " · act ", el("span", { class: "act", text: fmt(d.opt[p] ? d.opt[p][i] : null) })),
      q ? el("div", { class: "quality", title: "ratio: activation / the top dataset activation · hf: high-frequency energy vs natural photos (1 = natural) · robust: activation kept under jitter/scale/rotation" },
        `ratio ${fmt(q.ratio[i], 3)} · hf ${fmt(q.hf[i], 3)}× · robust ${fmt(q.robust[i], 3)}`) : null,
      h ? spark(h) : null);
  }));
  const left = [el("h2", { text: "optimized images" }),
    d.presets.length ? opt : el("p", { class: "note", text: "No optimization presets in this atlas (dataset only)." }),
    el("h2", { text: "activation" }), el("div", { class: "stats" }, statsList(d, i), chart(d, i))];

  // top / bottom k
  const right = [];
  if (d.top) {
    for (const kind of ["top", "bottom"]) {
      const rows = d[kind][i];
      right.push(el("h2", { text: `${kind} ${rows.length} dataset images` }));
      if (!rows.length) { right.push(el("p", { class: "note", text: "none" })); continue; }
      right.push(el("div", { class: `row crops ${kind}`, id: kind }, rows.map((r, n) => cropFigure(d, u, kind, r[9] ?? n, r))));
    }
  } else {
    right.push(el("h2", { text: "dataset images" }),
      el("p", { class: "note", text: "This atlas has no dataset pass (index/topk.parquet is absent)." }));
  }
  const sections = [head, el("div", { class: "unit-body" }, el("div", { class: "col-left" }, left), el("div", { class: "col-right" }, right)),
    el("p", { class: "note" }, el("span", { class: "kbd", text: "←" }), " ",
      el("span", { class: "kbd", text: "→" }), " previous / next unit · ", el("span", { class: "kbd", text: "Esc" }), " back to ",
      el("a", { href: layerHref(d.name), text: `all units of ${d.name}` }))];
  show(v, ...sections);
}

// an <img> that turns into an explicit "missing" placeholder if the file is gone (an atlas changed
// after its viewer data was written), never a broken image
function imgOrMissing(attrs, missingText) {
  const e = el("img", { ...attrs, decoding: "async" });
  replaceOnError(e, e, missingText);
  return e;
}

// when img fails to load, `outer` (the element showing it), or the link around it, becomes the placeholder
function replaceOnError(img, outer, missingText) {
  img.addEventListener("error", () => {
    const ph = el("div", { class: "ph missing", "data-missing": "missing", role: "img", "aria-label": missingText, text: missingText });
    (outer.parentElement && outer.parentElement.tagName === "A" ? outer.parentElement : outer).replaceWith(ph);
  }, { once: true });
}

// a crop that is the box x0..x1, y0..y1 (pixels of the S x S input image, x1/y1 exclusive) of the
// whole input image at attrs.src (schema 3: one object per dataset image, not one per crop): a
// frame of the crops' display size holding a clip of the box's aspect, in which the image is
// scaled and shifted so that exactly the box fills it. Percentages of the clip, so the CSS size of
// the frame (120 px, 96 px on a phone) is all the layout needs. S unknown (a layer file without
// input_size): the image's own size, once loaded.
function clippedCrop(attrs, box, S, missingText) {
  const [x0, y0, x1, y1] = box;
  const bw = Math.max(1, x1 - x0), bh = Math.max(1, y1 - y0);
  const { title, ...imgAttrs } = attrs;
  const img = el("img", { ...imgAttrs, decoding: "async" });
  // enlarged boxes stay crisp (pixelated), reduced ones are smoothed (nearest-neighbour reduction aliases)
  const clip = el("div", { class: `clip${Math.max(bw, bh) < 120 ? " up" : ""}`, "data-box": box.join(",") }, img);
  clip.style.width = `${bw >= bh ? 100 : (100 * bw) / bh}%`;
  clip.style.height = `${bw >= bh ? (100 * bh) / bw : 100}%`;
  const place = (sw, sh) => {
    img.style.width = `${(100 * sw) / bw}%`;
    img.style.height = `${(100 * sh) / bh}%`;
    img.style.left = `${(-100 * x0) / bw}%`;
    img.style.top = `${(-100 * y0) / bh}%`;
  };
  if (S > 0) place(S, S);
  else img.addEventListener("load", () => place(img.naturalWidth, img.naturalHeight), { once: true });
  const frame = el("div", { class: "crop-frame", title }, clip);
  replaceOnError(img, frame, missingText);
  return frame;
}

function cropFigure(d, u, kind, rank, r) {
  const [act, img, y, x, x0, y0, x1, y1, present] = r;
  const id = d.images[img];
  const url = cropURL(d, u, kind, rank, r[10]);
  const cut = r[11] === 1;            // url is the whole input image; the crop is the box cut from it
  const why = present ? null : (d.failedCrop.has(u) ? "failed" : "missing");
  const attrs = { src: url, alt: `${kind} ${rank}: ${id}`, title: `box (${x0},${y0})–(${x1},${y1}), map position (${y},${x})` };
  const media = why
    ? el("div", { class: `ph ${why}`, "data-missing": why, role: "img", "aria-label": `crop ${why}`, text: `crop ${why}` })
    : cut ? clippedCrop(attrs, [x0, y0, x1, y1], d.input_size ?? (state.model.model || {}).input_size, "crop missing")
      : imgOrMissing(attrs, "crop missing");
  const src = sourceURL(id, why ? null : url);
  return el("figure", { "data-kind": kind, "data-rank": rank, "data-activation": act === null ? "" : act, "data-image": id },
    src ? el("a", { href: src, target: "_blank", rel: "noopener noreferrer", title: id }, media) : media,
    el("figcaption", {},
      `#${rank} `, el("span", { class: `act ${kind}-act`, text: fmt(act) }),
      el("span", { class: "id", title: id, text: id }),
      src ? el("a", { class: "src", href: src, target: "_blank", rel: "noopener noreferrer",
        text: src !== url ? "source image" : cut ? "input image" : "crop" }) : null));
}

function modernPresets() {
  return new Set((state.model.presets || []).filter((p) => p && p.kind === "modern").map((p) => p.name));
}

function diversity() {
  const n = Number((state.model.optimization || {}).diversity);
  return Number.isInteger(n) && n > 1 ? Math.min(n, 16) : 1;
}

function statsList(d, i) {
  const dl = el("dl", { id: "stats" });
  const add = (k, v, title) => dl.append(el("dt", { text: k, title }), el("dd", { text: v }));
  const s = d.stats;
  if (s) {
    add("mean", fmt(s.mean[i])); add("std", fmt(s.std[i])); add("max", fmt(s.max[i]));
    add("positive", pct(s.frac_positive[i]), "fraction of dataset images with activation > 0");
    add("images", s.count[i]);
  } else {
    add("dataset", "no statistics");
  }
  for (const p of d.presets) {
    const dead = d.dead[p] && d.dead[p][i];
    add(`opt ${p}`, `${fmt(d.opt[p] ? d.opt[p][i] : null)}${dead ? " (dead)" : ""}`, "activation reached by the optimized image");
  }
  return dl;
}

function spark(h) {
  const pts = h.map((v, k) => [k, v]).filter(([, v]) => v !== null);
  if (pts.length < 2) return null;
  const lo = Math.min(...pts.map((p) => p[1])), hi = Math.max(...pts.map((p) => p[1]));
  const W = 192, H = 28, n = h.length - 1 || 1;
  const line = pts.map(([k, v]) => `${(k / n * W).toFixed(1)},${(H - 2 - (hi > lo ? (v - lo) / (hi - lo) : 0.5) * (H - 4)).toFixed(1)}`).join(" ");
  return svg("svg", { class: "spark", viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img",
    "aria-label": `optimization: ${fmt(pts[0][1])} → ${fmt(pts[pts.length - 1][1])}` },
    svg("title", { text: `activation during optimization: ${fmt(pts[0][1])} → ${fmt(hi)}` }),
    svg("polyline", { points: line }));
}

// activation chart: the dataset histogram when the build recorded one, else the unit's range on one
// axis: mean ± std band, dataset max, the top-k and bottom-k activations, the optimized activations
function chart(d, i) {
  const s = d.stats;
  const top = d.top ? d.top[i].map((r) => r[0]).filter((v) => v !== null) : [];
  const bottom = d.bottom ? d.bottom[i].map((r) => r[0]).filter((v) => v !== null) : [];
  const opts = d.presets.map((p) => [p, d.opt[p] ? d.opt[p][i] : null]).filter(([, v]) => v !== null);
  const mean = s ? s.mean[i] : null, std = s ? s.std[i] : null, max = s ? s.max[i] : null;
  const hist = s && s.hist && s.hist[i] && s.hist_lo[i] !== null && s.hist_hi[i] !== null ? s.hist[i] : null;
  const vals = [...top, ...bottom, ...opts.map((o) => o[1])];
  if (mean !== null) vals.push(mean, mean - (std || 0), mean + (std || 0));
  if (max !== null) vals.push(max);
  if (hist) vals.push(s.hist_lo[i], s.hist_hi[i]);
  const box = el("div", { class: "chart", id: "chart" });
  if (!vals.length) { box.append(el("p", { class: "note", text: "No activation data for this unit." })); return box; }
  let lo = Math.min(0, ...vals), hi = Math.max(...vals);
  if (hi === lo) hi = lo + 1;
  const pad = (hi - lo) * 0.04; lo -= pad; hi += pad;
  const W = 420, H = 120, L = 8, R = 8, axisY = 92;
  const X = (v) => L + (v - lo) / (hi - lo) * (W - L - R);
  const g = [];
  if (hist) {
    const n = hist.length, peak = Math.max(1, ...hist), hlo = s.hist_lo[i], hhi = s.hist_hi[i];
    hist.forEach((c, k) => {
      const x0 = X(hlo + (hhi - hlo) * k / n), x1 = X(hlo + (hhi - hlo) * (k + 1) / n);
      const h = (c / peak) * 70;
      g.push(svg("rect", { x: x0.toFixed(1), y: (axisY - h).toFixed(1), width: Math.max(0.5, x1 - x0 - 0.5).toFixed(1), height: h.toFixed(1), fill: "#4b5263" }));
    });
  }
  if (mean !== null && std !== null) {
    g.push(svg("rect", { x: X(mean - std).toFixed(1), y: 22, width: Math.max(1, X(mean + std) - X(mean - std)).toFixed(1), height: axisY - 22, fill: "#6cb6ff", "fill-opacity": 0.10 }));
    g.push(svg("line", { x1: X(mean), x2: X(mean), y1: 22, y2: axisY, stroke: "#6cb6ff", "stroke-width": 1 }));
  }
  if (max !== null) g.push(svg("line", { x1: X(max), x2: X(max), y1: 22, y2: axisY, stroke: "#d9dce3", "stroke-dasharray": "2 2" }));
  for (const v of bottom) g.push(svg("line", { x1: X(v), x2: X(v), y1: axisY - 26, y2: axisY, stroke: "#6c9cff", "stroke-width": 2 }));
  for (const v of top) g.push(svg("line", { x1: X(v), x2: X(v), y1: axisY - 26, y2: axisY, stroke: "#f0a35e", "stroke-width": 2 }));
  for (const [p, v] of opts) {
    const x = X(v);
    g.push(svg("path", { d: `M${x} ${axisY - 40} l5 6 l-5 6 l-5 -6 z`, fill: "#7ee0b0" }, svg("title", { text: `${p}: ${fmt(v)}` })));
  }
  g.push(svg("line", { x1: L, x2: W - R, y1: axisY, y2: axisY, stroke: "#555b66" }));
  if (lo < 0 && hi > 0 && X(0) > L + 40 && X(0) < W - R - 40) g.push(svg("line", { x1: X(0), x2: X(0), y1: axisY, y2: axisY + 4, stroke: "#8b909d" }),
    svg("text", { x: X(0), y: axisY + 14, "text-anchor": "middle", text: "0" }));
  g.push(svg("text", { x: L, y: axisY + 24, text: fmt(lo + pad) }),
    svg("text", { x: W - R, y: axisY + 24, "text-anchor": "end", text: fmt(hi - pad) }));
  box.append(svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "activation chart" }, g));
  const key = (color, text) => el("span", {}, colorKey(color), text);
  box.append(el("div", { class: "legend" },
    hist ? key("#4b5263", "dataset histogram") : null,
    mean !== null ? key("#6cb6ff", "mean ± std") : null, max !== null ? key("#d9dce3", "max") : null,
    top.length ? key("#f0a35e", `top ${top.length}`) : null, bottom.length ? key("#6c9cff", `bottom ${bottom.length}`) : null,
    opts.length ? key("#7ee0b0", "optimized") : null));
  return box;
}

function colorKey(color) {
  const i = el("i");
  i.style.background = color;
  return i;
}

// ------------------------------------------------------------------ missing / dead / failed report
function renderMissing(v) {
  const m = state.model;
  document.title = "issues — deepvis atlas";
  crumbs([m.model.name || "model", "#/"], ["missing, dead and failed units", null]);
  const out = [el("h1", { text: "Missing, dead and failed units" })];
  const fs = m.failed_shards || [];
  out.push(el("h2", { text: `failed shards (${fs.length})` }));
  out.push(fs.length ? el("ul", { class: "plain", id: "failed-shards" }, fs.map((f) =>
    el("li", {}, el("code", { text: f.id }), f.error ? el("pre", { class: "err", text: f.error }) : null)))
    : el("p", { class: "note", text: "none" }));
  let any = false;
  const chips = (layer, units) => el("div", { class: "chips" }, units.map((u) =>
    el("a", { class: "chip", href: unitHref(layer, u), text: `${layer}:${u}` })));
  for (const l of m.layers) {
    const p = l.problems || {};
    const parts = [];
    if ((p.failed || []).length) parts.push(el("p", { class: "bad", text: `${p.failed.length} unit(s) in failed shards` }), chips(l.name, p.failed));
    if ((p.dead || []).length) parts.push(el("p", { class: "bad", text: `${p.dead.length} dead unit(s) (zero gradient)` }), chips(l.name, p.dead));
    for (const [preset, units] of Object.entries(p.missing || {})) {
      if (units.length) parts.push(el("p", { class: "warn", text: `${units.length} unit(s) without a ${preset} image` }), chips(l.name, units));
    }
    if ((p.crops_missing || []).length) parts.push(el("p", { class: "warn", text: `${p.crops_missing.length} unit(s) with missing crops` }), chips(l.name, p.crops_missing));
    if (parts.length) {
      any = true;
      out.push(el("section", { "data-layer": l.name }, el("h2", {}, el("a", { href: layerHref(l.name), text: l.name })), parts));
    }
  }
  if (!any) out.push(el("h2", { text: "units" }), el("p", { class: "note", text: "Every unit has its images." }));
  const skipped = (m.dataset && m.dataset.skipped) || [];
  if (skipped.length || (m.dataset && m.dataset.images_skipped)) {
    out.push(el("h2", { text: `skipped dataset images (${m.dataset.images_skipped ?? skipped.length})` }));
    out.push(el("ul", { class: "plain mono", id: "skipped" }, skipped.map((s) =>
      el("li", { text: typeof s === "string" ? s : `${s.id ?? s.image ?? ""}${s.reason ? ` — ${s.reason}` : ""}` }))));
  }
  show(v, el("div", { class: "problems" }, out));
}

// ------------------------------------------------------------------ jump box, keys
function jump(text) {
  const msg = document.getElementById("jump-msg");
  msg.textContent = "";
  const s = text.trim();
  if (!s) return;
  const layers = state.model.layers.map((l) => l.name);
  const cur = state.route && state.route.layer;
  let layer = null, unit = null;
  const m = /^(.*?)[:\s/#]+(\d+)$/.exec(s);
  if (layers.includes(s)) layer = s;
  else if (m && layers.includes(m[1])) { layer = m[1]; unit = Number(m[2]); }
  else if (/^\d+$/.test(s) && cur) { layer = cur; unit = Number(s); }
  else {
    const hits = layers.filter((n) => n.toLowerCase().includes((m ? m[1] : s).toLowerCase()));
    if (hits.length === 1) { layer = hits[0]; unit = m ? Number(m[2]) : null; }
  }
  if (!layer) { msg.textContent = `no layer ${JSON.stringify(m ? m[1] : s)}`; return; }
  location.hash = unit === null ? layerHref(layer) : unitHref(layer, unit);
  document.getElementById("jump-input").blur();
}

async function step(delta) {
  const r = parseRoute();           // the hash, not the rendered route: quick presses add up
  if (!r || r.page !== "unit") return;
  const d = await loadLayer(r.layer);
  const i = d.pos.get(Number(r.unit));
  if (i === undefined) return;
  const j = i + delta;
  if (j >= 0 && j < d.units.length) location.hash = unitHref(d.name, d.units[j]);
}

function init() {
  document.getElementById("jump").addEventListener("submit", (e) => {
    e.preventDefault();
    jump(document.getElementById("jump-input").value);
  });
  document.addEventListener("keydown", (e) => {
    const tag = e.target && e.target.tagName;
    if (e.altKey || e.ctrlKey || e.metaKey) return;
    if (tag === "INPUT" || tag === "SELECT" || tag === "TEXTAREA") {
      if (e.key === "Escape") e.target.blur();
      return;
    }
    if (e.key === "ArrowLeft") { e.preventDefault(); step(-1); }
    else if (e.key === "ArrowRight") { e.preventDefault(); step(1); }
    else if (e.key === "/") { e.preventDefault(); document.getElementById("jump-input").focus(); }
    else if (e.key === "Escape" && state.route && state.route.page === "unit") location.hash = layerHref(state.route.layer);
  });
  window.addEventListener("hashchange", render);
  render();
}

init();
