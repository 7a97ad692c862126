// deepvis live: frames from the webcam, a local video or images go to the local server one at a
// time (the next frame is captured only when the previous answer is back: the latest frame wins,
// lag never queues up). Every string from the server or the user is set as text, never as HTML.
const $ = (id) => document.getElementById(id);
const el = (tag, attrs = {}, ...kids) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") e.textContent = v;
    else if (v !== null && v !== undefined) e.setAttribute(k, v);
  }
  for (const k of kids) if (k) e.append(k);
  return e;
};
const fmt = (v) => (v === null || v === undefined ? "–" : Math.abs(v) >= 100 ? v.toFixed(0) : v.toFixed(2));

const CLIENT = Math.random().toString(36).slice(2, 10);
const state = {
  model: null, layers: new Map(), layer: null, unit: null,
  source: null,          // {kind: "camera"|"video"|"image", el, blob?}
  dirty: false,          // a still image needs (re)sending
  inflight: false, paused: false,
  lastBlob: null,        // the frame the current grid was computed on (for the gradient)
  lastFrame: null,       // the last /api/frame answer
  done: [],              // completion times, for fps
  gradBusy: false, gradAt: 0,
};
const canvas = document.createElement("canvas");

function status(msg, bad = false) {
  const s = $("status");
  s.textContent = msg || "";
  s.className = bad ? "error" : "";
}

async function errorText(r) {
  try { return (await r.json()).error || `${r.status} ${r.statusText}`; } catch { return `${r.status} ${r.statusText}`; }
}

// ---------------------------------------------------------------- model and layers
async function init() {
  const r = await fetch("/api/model");
  if (!r.ok) { status(`cannot load the model: ${await errorText(r)}`, true); return; }
  const m = await r.json();
  state.model = m;
  $("model").textContent = `${m.model.name}${m.model.weights === "none" ? " (random weights)" : ""}`;
  const sel = $("layer");
  for (const l of m.layers) {
    state.layers.set(l.name, l);
    sel.append(el("option", { value: l.name, text: `${l.name}  ${l.shape.join("×")}` }));
  }
  const want = new URLSearchParams(location.search).get("layer");
  setLayer(state.layers.has(want) ? want : m.default_layer);
  sel.addEventListener("change", () => setLayer(sel.value));
  if (m.atlas && !m.atlas.matches) status(m.atlas.reason, true);
  wire();
  requestAnimationFrame(loop);
}

function setLayer(name) {
  state.layer = name;
  $("layer").value = name;
  const l = state.layers.get(name);
  $("grid-title").textContent = `${name} — ${l.units} units, ${l.shape.join("×")}`;
  selectUnit(null);
  state.dirty = true;
}

// ---------------------------------------------------------------- sources
function wire() {
  $("src-camera").addEventListener("click", startCamera);
  $("src-video").addEventListener("change", (e) => { const f = e.target.files[0]; if (f) startVideo(f); });
  $("src-images").addEventListener("change", (e) => addImages([...e.target.files]));
  $("pause").addEventListener("click", () => {
    state.paused = !state.paused;
    $("pause").textContent = state.paused ? "Resume" : "Pause";
    const v = $("video");
    if (state.source && state.source.kind !== "image") state.paused ? v.pause() : v.play();
  });
  document.addEventListener("dragover", (e) => e.preventDefault());
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    const files = [...(e.dataTransfer?.files || [])];
    const vid = files.find((f) => f.type.startsWith("video/"));
    if (vid) startVideo(vid); else addImages(files);
  });
  $("grid").addEventListener("click", onGridClick);
  $("grid").addEventListener("load", () => { sizeGrid(); placeSelection(); });
  $("grad-refresh").addEventListener("click", () => loadGradient().catch((e) => status(`gradient: ${e.message}`, true)));
  document.addEventListener("keydown", (e) => {
    if (state.unit === null || e.target.tagName === "SELECT" || e.target.tagName === "INPUT") return;
    const n = state.layers.get(state.layer).units;
    if (e.key === "ArrowRight") selectUnit((state.unit + 1) % n);
    else if (e.key === "ArrowLeft") selectUnit((state.unit - 1 + n) % n);
  });
}

function stopVideo() {
  const v = $("video");
  if (v.srcObject) { for (const t of v.srcObject.getTracks()) t.stop(); v.srcObject = null; }
  if (v.src) { URL.revokeObjectURL(v.src); v.removeAttribute("src"); v.load(); }
}

function showInput(kind) {
  $("hint").hidden = true;
  $("video").hidden = kind === "image";
  $("still").hidden = kind !== "image";
  $("pause").disabled = kind === "image";
}

async function startCamera() {
  if (!navigator.mediaDevices?.getUserMedia) {
    status("this browser gives no camera here (the webcam needs localhost or https)", true);
    return;
  }
  try {
    const stream = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 }, audio: false });
    stopVideo();
    const v = $("video");
    v.srcObject = stream;
    await v.play();
    state.source = { kind: "camera", el: v };
    showInput("camera");
    status("webcam");
  } catch (e) {
    status(`no webcam: ${e.name}: ${e.message}`, true);
  }
}

async function startVideo(file) {
  stopVideo();
  const v = $("video");
  v.src = URL.createObjectURL(file);
  try {
    await v.play();
    state.source = { kind: "video", el: v };
    showInput("video");
    status(`video: ${file.name}`);
  } catch (e) {
    status(`cannot play ${file.name}: ${e.message}`, true);
  }
}

function addImages(files) {
  files = files.filter((f) => f.size > 0);
  if (!files.length) return;
  const box = $("thumbs");
  box.replaceChildren();
  files.forEach((f, i) => {
    const url = URL.createObjectURL(f);
    const t = el("img", { src: url, alt: f.name, title: f.name, class: "thumb" });
    t.addEventListener("click", () => useImage(f, url, t));
    t.addEventListener("error", () => t.classList.add("broken"));
    box.append(t);
    if (i === 0) useImage(f, url, t);
  });
}

function useImage(file, url, thumb) {
  stopVideo();
  for (const t of $("thumbs").children) t.classList.toggle("on", t === thumb);
  $("still").src = url;
  state.source = { kind: "image", el: $("still"), blob: file, name: file.name };
  showInput("image");
  status(`image: ${file.name}`);
  state.dirty = true;
}

// ---------------------------------------------------------------- the frame loop
function capture(v) {
  // the shorter side to 256 (the model's resize), aspect kept: the server's preprocessing then
  // only crops, and the upload stays small
  const w = v.videoWidth, h = v.videoHeight;
  if (!w || !h) return Promise.resolve(null);
  const s = Math.min(1, 256 / Math.min(w, h));
  canvas.width = Math.round(w * s);
  canvas.height = Math.round(h * s);
  canvas.getContext("2d").drawImage(v, 0, 0, canvas.width, canvas.height);
  return new Promise((res) => canvas.toBlob(res, "image/jpeg", 0.9));
}

async function pump() {
  const src = state.source;
  if (state.inflight || state.paused || !src || !state.layer) return;
  if (src.kind === "image" && !state.dirty) return;
  state.inflight = true;
  state.dirty = false;
  try {
    const blob = src.kind === "image" ? src.blob : await capture(src.el);
    if (!blob) return;
    if (state.model && blob.size > state.model.max_upload_bytes) {
      status(`${src.name || "frame"} is ${(blob.size / 1e6).toFixed(1)} MB; the server accepts ${(state.model.max_upload_bytes / 1e6).toFixed(0)} MB (deepvis live --max-upload-mb)`, true);
      return;
    }
    const q = new URLSearchParams({ layer: state.layer, client: CLIENT });
    if (state.unit !== null) q.set("unit", state.unit);
    const t0 = performance.now();
    const r = await fetch(`/api/frame?${q}`, { method: "POST", body: blob, headers: { "Content-Type": blob.type || "application/octet-stream" } });
    if (r.status === 409) return;                       // superseded by a newer frame
    if (!r.ok) {
      status(await errorText(r), true);
      if (src.kind === "image") {           // nothing on screen may pass for this image's result
        $("top5").replaceChildren();
        $("grid").removeAttribute("src");
        state.lastFrame = null;
        placeSelection();
      }
      return;
    }
    const d = await r.json();
    if (d.layer !== state.layer) return;                // the user switched layers meanwhile
    state.lastBlob = blob;
    render(d, performance.now() - t0);
    if (src.kind === "image" && state.unit !== null && !$("gradient").dataset.unit) await loadGradient();
    // a moving source: the gradient follows the frames about once a second (it costs ~2 forwards)
    if (src.kind !== "image" && state.unit !== null && !state.gradBusy && performance.now() - state.gradAt > 1000) {
      loadGradient().catch((e) => status(`gradient: ${e.message}`, true));
    }
  } catch (e) {
    status(`server unreachable: ${e.message}`, true);
    await new Promise((res) => setTimeout(res, 1000));
  } finally {
    state.inflight = false;
  }
}

async function loop() {
  await pump();
  requestAnimationFrame(loop);
}

function render(d, ms) {
  state.lastFrame = d;
  const g = $("grid");
  g.src = d.grid;
  g.dataset.frames = String(Number(g.dataset.frames) + 1);
  const now = performance.now();
  state.done.push(now);
  while (state.done.length > 2 && now - state.done[0] > 2000) state.done.shift();
  const n = state.done.length;
  if (n > 1) $("fps").textContent = `${((n - 1) * 1000 / (now - state.done[0])).toFixed(1)} fps`;
  $("timing").textContent = `${ms.toFixed(0)} ms (model ${d.ms.model.toFixed(0)})`;
  if ($("status").className === "error") status("");
  const ol = $("top5");
  ol.replaceChildren(...d.top5.map((t) => el("li", { "data-index": t.index },
    el("span", { class: "p", text: `${(100 * t.p).toFixed(1)}%` }), el("span", { class: "label", text: t.label }))));
  if (d.unit !== null && d.unit === state.unit) {
    $("unit-map").src = d.unit_map;
    $("unit-facts").textContent = `activation ${fmt(d.unit_max)} · layer range ${fmt(d.range[0])}…${fmt(d.range[1])}`;
  }
}

// the grid shown at an integer zoom that fits the pane (pixelated: tiles stay crisp)
function sizeGrid() {
  const g = $("grid");
  const room = $("grid-wrap").clientWidth || 600;
  const zoom = Math.max(1, Math.floor(room / g.naturalWidth));
  g.style.width = `${g.naturalWidth * zoom}px`;
}

// ---------------------------------------------------------------- units
function tileAt(d, x, y) {
  const [th, tw] = d.tile;
  const row = Math.floor(y / (th + d.sep)), col = Math.floor(x / (tw + d.sep));
  const c = row * d.cols + col;
  return col < d.cols && row < d.rows && c < d.shape[0] ? c : null;
}

function onGridClick(e) {
  const d = state.lastFrame;
  if (!d) return;
  const g = $("grid");
  const s = g.naturalWidth / g.clientWidth;
  const c = tileAt(d, e.offsetX * s, e.offsetY * s);
  if (c !== null) selectUnit(c);
}

function placeSelection() {
  const d = state.lastFrame, box = $("sel"), g = $("grid");
  if (!d || state.unit === null || !g.naturalWidth) { box.hidden = true; return; }
  const z = g.clientWidth / g.naturalWidth;
  const [th, tw] = d.tile;
  const r = Math.floor(state.unit / d.cols), c = state.unit % d.cols;
  Object.assign(box.style, { left: `${c * (tw + d.sep) * z - 1}px`, top: `${r * (th + d.sep) * z - 1}px`,
    width: `${tw * z + 2}px`, height: `${th * z + 2}px` });
  box.hidden = false;
}

function selectUnit(u) {
  state.unit = u;
  for (const id of ["unit-map", "gradient"]) { $(id).removeAttribute("src"); delete $(id).dataset.unit; }
  $("grad-refresh").disabled = u === null;
  $("unit-facts").textContent = "";
  const atlas = $("atlas");
  atlas.replaceChildren();
  atlas.dataset.state = "none";
  placeSelection();
  if (u === null) { $("unit-title").textContent = "No unit selected"; return; }
  $("unit-title").textContent = `${state.layer}:${u}`;
  state.dirty = true;
  loadGradient().catch((e) => status(`gradient: ${e.message}`, true));
  loadAtlas(state.layer, u).catch((e) => status(`atlas: ${e.message}`, true));
}

async function loadGradient() {
  const blob = state.lastBlob || state.source?.blob;
  if (!blob || state.unit === null) return;
  const layer = state.layer, unit = state.unit;
  const q = new URLSearchParams({ layer, unit });
  state.gradBusy = true;
  state.gradAt = performance.now();
  let r;
  try { r = await fetch(`/api/gradient?${q}`, { method: "POST", body: blob }); } finally { state.gradBusy = false; }
  if (layer !== state.layer || unit !== state.unit) return;
  if (!r.ok) { status(`gradient: ${await errorText(r)}`, true); return; }
  const img = $("gradient");
  if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
  img.src = URL.createObjectURL(await r.blob());
  img.dataset.unit = String(unit);
}

async function loadAtlas(layer, unit) {
  const box = $("atlas");
  if (!state.model.atlas) {
    box.append(el("p", { class: "muted", text: "No atlas: start deepvis live with --atlas STORE to see what this unit responds to across the dataset." }));
    return;
  }
  box.dataset.state = "loading";
  const r = await fetch(`/api/unit?${new URLSearchParams({ layer, unit })}`);
  if (layer !== state.layer || unit !== state.unit) return;
  const d = r.ok ? await r.json() : { in_atlas: false, reason: await errorText(r) };
  box.replaceChildren(el("h2", { text: "In the atlas" }));
  if (!d.in_atlas) {
    box.append(el("p", { class: "muted", text: d.reason || "not in the atlas" }));
    box.dataset.state = "absent";
    return;
  }
  if (d.viewer) box.append(el("p", {}, el("a", { href: d.viewer, target: "_blank", rel: "noopener", text: "open in the atlas viewer ↗" })));
  if (d.presets.length) {
    box.append(el("div", { class: "row", id: "atlas-opt" }, ...d.presets.map((p) =>
      el("figure", { "data-preset": p.name }, el("img", { src: p.url, alt: `${p.name} optimized image` }), el("figcaption", { text: p.name })))));
  }
  for (const kind of ["top", "bottom"]) {
    if (!d[kind].length) continue;
    box.append(el("h3", { text: kind === "top" ? "top dataset crops" : "bottom dataset crops" }),
      el("div", { class: "row crops", id: `atlas-${kind}` }, ...d[kind].map((t) =>
        el("figure", { "data-rank": t.rank, title: t.image }, cropMedia(t, d.input_size),
          el("figcaption", { text: fmt(t.activation) })))));
  }
  box.dataset.state = "loaded";
}

// a top/bottom crop of the atlas: its object (url), or the box crop_box cut out of it when the
// object is the whole input image (schema 3 atlases); a "missing" placeholder when there is none
function cropMedia(t, S) {
  const missing = () => el("div", { class: "ph", role: "img", "aria-label": "crop missing", text: "missing" });
  if (!t.url) return missing();
  const img = el("img", { src: t.url, alt: t.image });
  const media = t.crop_box ? clipped(img, t.crop_box, S) : img;
  img.addEventListener("error", () => media.replaceWith(missing()), { once: true });
  return media;
}

// a frame of the crops' size holding a clip of the box's aspect, in which the input image is scaled
// and shifted so that exactly the box x0..x1, y0..y1 (pixels of the S x S image) fills it, as the
// atlas viewer's clippedCrop does. S unknown: the image's own size, once loaded.
function clipped(img, box, S) {
  const [x0, y0, x1, y1] = box;
  const bw = Math.max(1, x1 - x0), bh = Math.max(1, y1 - y0);
  // enlarged boxes stay crisp (pixelated), reduced ones are smoothed
  const clip = el("div", { class: `clip${Math.max(bw, bh) < 64 ? " up" : ""}`, "data-box": box.join(",") }, img);
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
  return el("div", { class: "crop-frame" }, clip);
}

window.addEventListener("resize", () => { if ($("grid").naturalWidth) { sizeGrid(); placeSelection(); } });
init();
