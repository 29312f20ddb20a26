// ComfyUI-HERO front end: the marking panel (node widget + overlay) and the session panel.
// Public APIs only: app, api, registerExtension, node.addDOMWidget, app.extensionManager.
// Marks API: docs/marks_api.md.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";
import { MarkState, moveFocus, etaText } from "./hero_rules.js";

const EXT = "ComfyUI.HERO";
const NODE_CLASS = "HERO_Feedback";
const S_DEFAULT = "HERO.DefaultMark";
const S_SOUND = "HERO.Sound";
const S_THUMB = "HERO.ThumbSize";
const S_AUTOOPEN = "HERO.AutoOpen";

// ---- small helpers ---------------------------------------------------------------------------

const css = document.createElement("link");
css.rel = "stylesheet";
css.href = new URL("./hero.css", import.meta.url).href;
document.head.appendChild(css);

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k === "style") e.style.cssText = v;
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c != null) e.append(c);
  return e;
}

function setting(id, fallback) {
  try {
    const v = app.extensionManager?.setting?.get(id);
    return v === undefined || v === null ? fallback : v;
  } catch {
    return fallback;
  }
}

function toast(severity, summary, detail, life = 4000) {
  try {
    app.extensionManager.toast.add({ severity, summary, detail, life });
  } catch {
    console[severity === "error" ? "error" : "log"](`[HERO] ${summary}: ${detail}`);
  }
}

export function viewURL(img) {
  if (!img) return "";
  const q = new URLSearchParams({ filename: img.filename, subfolder: img.subfolder || "",
                                  type: img.type || "temp" });
  return api.apiURL(`/view?${q.toString()}`);
}

function beep() {
  if (!setting(S_SOUND, true)) return;
  try {
    const Ctx = window.AudioContext || window.webkitAudioContext;
    const ctx = (beep.ctx ||= new Ctx());
    const o = ctx.createOscillator(), g = ctx.createGain();
    o.type = "sine"; o.frequency.value = 880;
    g.gain.setValueAtTime(0.0001, ctx.currentTime);
    g.gain.exponentialRampToValueAtTime(0.15, ctx.currentTime + 0.02);
    g.gain.exponentialRampToValueAtTime(0.0001, ctx.currentTime + 0.25);
    o.connect(g).connect(ctx.destination);
    o.start(); o.stop(ctx.currentTime + 0.26);
  } catch { /* no audio: fine */ }
}

function isTyping(target) {
  if (!target || !(target instanceof Element)) return false;
  if (target.closest("input, textarea, select, [contenteditable=''], [contenteditable='true']"))
    return true;
  return !!target.isContentEditable;
}

async function postJSON(path, body) {
  let res;
  try {
    res = await api.fetchApi(path, { method: "POST", headers: { "Content-Type": "application/json" },
                                     body: JSON.stringify(body) });
  } catch (e) {
    return { status: 0, body: { error: `the server did not answer (${e?.message || e})` } };
  }
  let data = {};
  try { data = await res.json(); } catch { data = { error: `HTTP ${res.status}` }; }
  return { status: res.status, body: data };
}

// ---- state: the requests waiting for marks -----------------------------------------------------

const requests = new Map(); // token -> request (as sent by the server)
const answered = new Map(); // node id -> last saved summary {session, round, good, bad, best}
let overlay = null;         // the open Overlay, if any

function findNode(id) {
  if (id === undefined || id === null || String(id).includes(":")) return null;
  const g = app.graph;
  return g?.getNodeById?.(Number(id)) ?? g?.getNodeById?.(id) ?? null;
}

function requestForNode(node) {
  for (const r of requests.values()) if (String(r.node) === String(node.id)) return r;
  return null;
}

function addRequest(r, { fresh = false } = {}) {
  if (!r || !r.token) return;
  const known = requests.has(r.token);
  // a newer request for the same session+round replaces older ones
  for (const [t, o] of requests) if (o.session === r.session && o.round === r.round && t !== r.token)
    requests.delete(t);
  requests.set(r.token, r);
  refreshNodes();
  if (!known) {
    if (fresh) beep();
    if (setting(S_AUTOOPEN, true) && !overlay) openOverlay(r);
  }
  refreshSidebar();
}

function dropRequest(token, why) {
  const r = requests.get(token);
  requests.delete(token);
  if (overlay && overlay.req.token === token) overlay.close(why);
  refreshNodes();
  refreshSidebar();
  return r;
}

async function syncPending() {
  try {
    const res = await api.fetchApi("/hero/pending", { cache: "no-store" });
    if (!res.ok) return;
    const { pending } = await res.json();
    const live = new Set(pending.map((p) => p.token));
    for (const t of [...requests.keys()]) if (!live.has(t)) dropRequest(t, "gone");
    for (const p of pending) addRequest(p);
  } catch (e) {
    console.warn("[HERO] GET /hero/pending failed", e);
  }
}

// ---- the node widget ----------------------------------------------------------------------------

function refreshNodes() {
  const nodes = app.graph?._nodes || app.graph?.nodes || [];
  for (const n of nodes) if (n.comfyClass === NODE_CLASS && n._hero) renderNodePanel(n);
}

function renderNodePanel(node) {
  const box = node._hero.box;
  const r = requestForNode(node);
  box.replaceChildren();
  if (r) {
    box.classList.add("hero-waiting");
    const nThumbs = Math.min(r.images.length, 12);
    const grid = el("div", { class: "hero-node-grid" },
      r.images.slice(0, nThumbs).map((img, i) => el("img", { src: viewURL(img), alt: `image ${i + 1}`,
                                                            loading: "lazy" })));
    box.append(...[
      el("div", { class: "hero-node-title",
                  text: `Round ${r.round} of "${r.session}": ${r.n} images wait for your marks` }),
      grid,
      r.images.length > nThumbs ? el("div", { class: "hero-node-more",
                                              text: `+${r.images.length - nThumbs} more` }) : null,
      el("button", { class: "hero-btn hero-primary", "data-hero": "open",
                     onclick: (e) => { e.stopPropagation(); openOverlay(r); } }, "Open marking panel"),
    ].filter(Boolean)); // DOM append() would print a null as the text "null"
  } else {
    box.classList.remove("hero-waiting");
    const last = answered.get(String(node.id));
    box.append(el("div", { class: "hero-node-title", text: last
      ? `Round ${last.round} saved: good ${last.good.map((i) => i + 1).join(" ") || "-"}` +
        (last.best === null || last.best === undefined ? " · best kept" : ` · best ${last.best + 1}`)
      : "Waiting for a batch: queue the workflow to generate one." }));
  }
  node.setDirtyCanvas?.(true, true);
}

function attachNodePanel(node) {
  if (node._hero) return;
  const box = el("div", { class: "hero-node-panel" });
  // keep canvas shortcuts from firing while clicking in the panel
  box.addEventListener("pointerdown", (e) => e.stopPropagation());
  const w = node.addDOMWidget("hero_marking", "hero_marking", box, {
    serialize: false,
    hideOnZoom: false,
    getValue: () => undefined,
    setValue: () => {},
    getMinHeight: () => 150,
  });
  if (w) w.serialize = false;
  node._hero = { box, widget: w };
  const sz = node.size || [300, 200];
  node.setSize?.([Math.max(sz[0], 320), Math.max(sz[1], node.computeSize?.()[1] || 0)]);
  renderNodePanel(node);
}

// ---- status text of the other HERO nodes ---------------------------------------------------------
// HERO_Session / Generate / Train / ApplyLoRA / ExportLoRA return their one-line report as ui.text (e.g. "wrote
// models/loras/hero/x_r0003.safetensors", "kept the session's own settings for: ..."); the front end
// does not draw ui.text on a node by itself, so it goes into a small read-only box, made on the
// node's first report (nodes that never ran keep their saved size).

const STATUS_CLASSES = new Set(["HERO_Session", "HERO_Generate", "HERO_Train", "HERO_ApplyLoRA",
                                "HERO_ExportLoRA"]);

function showStatus(nodeId, text) {
  const node = findNode(nodeId);
  if (!node || !STATUS_CLASSES.has(node.comfyClass)) return;
  if (!node._heroStatus) {
    const box = el("div", { class: "hero-status" });
    box.addEventListener("pointerdown", (e) => e.stopPropagation());
    const w = node.addDOMWidget?.("hero_status", "hero_status", box, {
      serialize: false, hideOnZoom: false, getValue: () => undefined, setValue: () => {},
      getMinHeight: () => 40,
    });
    if (!w) return;
    w.serialize = false;
    node._heroStatus = { box, widget: w };
    const sz = node.size || [300, 100];
    node.setSize?.([sz[0], Math.max(sz[1], node.computeSize?.()[1] || 0)]);
  }
  node._heroStatus.box.textContent = text;
  node.setDirtyCanvas?.(true, true);
}

// ---- the overlay ---------------------------------------------------------------------------------

class Overlay {
  constructor(req) {
    this.req = req;
    this.state = new MarkState(req.n, { defaultMark: setting(S_DEFAULT, "bad"),
                                        hasCurrentBest: !!req.has_current_best });
    this.focus = 0;
    this.busy = false;
    this.stale = null;
    this.onKey = (e) => this.key(e);
    this.build();
    window.addEventListener("keydown", this.onKey, true);
  }

  build() {
    const r = this.req;
    let thumb = Number(setting(S_THUMB, 160)) || 160;
    if (r.n <= 8) thumb = Math.max(thumb, 240); // few images: show them larger
    this.tiles = r.images.map((img, i) => {
      const t = el("div", { class: "hero-tile", "data-i": String(i), tabindex: "-1",
                            role: "checkbox", "aria-label": `image ${i + 1}` },
        el("img", { src: viewURL(img), alt: `image ${i + 1}`, draggable: "false" }),
        el("span", { class: "hero-num", text: String(i + 1) }),
        el("span", { class: "hero-mark" }),
        el("span", { class: "hero-star", text: "\u2605" }));
      t.addEventListener("click", (e) => { e.preventDefault(); this.focus = i; this.act(() => this.state.toggle(i)); });
      t.addEventListener("dblclick", (e) => { e.preventDefault(); this.focus = i; this.act(() => this.state.toggleBest(i)); });
      return t;
    });
    this.grid = el("div", { class: "hero-grid", style: `--hero-thumb:${thumb}px` }, this.tiles);
    this.counter = el("div", { class: "hero-counter" });
    this.reason = el("div", { class: "hero-reason", role: "status" });
    this.eta = el("div", { class: "hero-help hero-eta", "data-hero": "eta", text: etaText(r.eta) });
    this.submitBtn = el("button", { class: "hero-btn hero-primary", "data-hero": "submit",
                                    onclick: () => this.submit() }, "Submit (Enter)");
    const best = r.current_best
      ? el("div", { class: "hero-best" }, el("div", { class: "hero-side-title", text: "Current best" }),
           el("img", { src: viewURL(r.current_best), alt: "current best" }),
           el("div", { class: "hero-help", text: "Keep it: pick no best this round." }))
      : el("div", { class: "hero-best hero-nobest" },
           el("div", { class: "hero-side-title", text: "No best yet" }),
           el("div", { class: "hero-help", text: "This round must pick a best image." }));
    const help = el("div", { class: "hero-help" },
      "Arrows move \u00b7 G good \u00b7 B bad \u00b7 Space toggle \u00b7 S best \u00b7 A all good \u00b7 Z undo " +
      "\u00b7 Enter submit \u00b7 Esc close \u00b7 click toggles \u00b7 double-click best");
    this.root = el("div", { class: "hero-overlay", role: "dialog", "aria-modal": "true",
                            "aria-label": "HERO marking" },
      el("div", { class: "hero-dialog" },
        el("div", { class: "hero-head" },
          el("div", { class: "hero-title",
                      text: `HERO \u00b7 ${r.session} \u00b7 round ${r.round} \u00b7 ${r.n} images` }),
          el("div", { class: "hero-actions" },
            el("button", { class: "hero-btn", onclick: () => this.act(() => this.state.allGood()) }, "All good (A)"),
            el("button", { class: "hero-btn", onclick: () => this.act(() => this.state.undo()) }, "Undo (Z)"),
            el("button", { class: "hero-btn", "data-hero": "close", onclick: () => this.close("user") }, "Close (Esc)"))),
        el("div", { class: "hero-body" }, this.grid, best),
        el("div", { class: "hero-foot" }, this.counter, this.reason, this.submitBtn),
        this.eta, help));
    document.body.appendChild(this.root);
    this.render();
    this.root.focus?.();
  }

  act(fn) {
    if (this.busy || this.stale) return;
    fn();
    this.render();
  }

  render() {
    const st = this.state;
    this.tiles.forEach((t, i) => {
      const g = st.good[i];
      t.classList.toggle("good", g);
      t.classList.toggle("bad", !g);
      t.classList.toggle("best", st.best === i);
      t.classList.toggle("focus", this.focus === i);
      t.setAttribute("aria-checked", g ? "true" : "false");
      t.querySelector(".hero-mark").textContent = g ? "GOOD" : "BAD";
    });
    const c = st.counts();
    const used = this.req.labels_used ?? 0;
    const budget = this.req.budget;
    this.counter.textContent =
      `good ${c.good} \u00b7 bad ${c.bad} \u00b7 best ${c.best === null ? (st.hasCurrentBest ? "kept" : "\u2013") : "#" + (c.best + 1)}` +
      ` \u00b7 labels ${used} + ${this.req.n}` + (budget ? ` / ${budget}` : "");
    const problems = this.stale ? [this.stale] : st.problems();
    if (!this.errorShown) this.reason.textContent = problems.join(" \u00b7 ");
    this.reason.classList.toggle("hero-error", !!this.errorShown || !!this.stale);
    this.submitBtn.disabled = this.busy || problems.length > 0;
    this.submitBtn.title = problems.join("; ");
    this.tiles[this.focus]?.scrollIntoView?.({ block: "nearest" });
  }

  columns() {
    const first = this.tiles[0]?.offsetTop;
    let cols = 0;
    for (const t of this.tiles) { if (t.offsetTop !== first) break; cols++; }
    return Math.max(1, cols);
  }

  key(e) {
    if (isTyping(e.target)) return;
    const k = e.key;
    const plain = !e.ctrlKey && !e.metaKey && !e.altKey;
    let handled = true;
    this.errorShown = false;
    if (k === "Escape") this.close("user");
    else if (k.startsWith("Arrow") || k === "Home" || k === "End") {
      this.focus = moveFocus(this.focus, k, this.columns(), this.state.n);
      this.render();
    } else if ((k === "z" || k === "Z") && (plain || e.ctrlKey || e.metaKey)) this.act(() => this.state.undo());
    else if (!plain) handled = false;
    else if (k === "g" || k === "G") this.act(() => this.state.setGood(this.focus, true));
    else if (k === "b" || k === "B") this.act(() => this.state.setGood(this.focus, false));
    else if (k === " " || k === "Spacebar") this.act(() => this.state.toggle(this.focus));
    else if (k === "s" || k === "S") this.act(() => this.state.toggleBest(this.focus));
    else if (k === "a" || k === "A") this.act(() => this.state.allGood());
    else if (k === "Enter") this.submit();
    else handled = false;
    if (handled) {
      e.preventDefault();
      e.stopImmediatePropagation();
    }
  }

  async submit() {
    if (this.busy || this.stale) return;
    const problems = this.state.problems();
    if (problems.length) {
      this.reason.textContent = problems.join(" \u00b7 ");
      this.reason.classList.add("hero-error");
      return;
    }
    this.busy = true;
    this.render();
    const { status, body } = await postJSON("/hero/marks", this.state.payload(this.req.token));
    this.busy = false;
    if (status === 200) {
      const c = this.state.counts();
      answered.set(String(this.req.node), { session: this.req.session, round: this.req.round,
        good: this.state.payload("").good, best: c.best });
      toast("success", "HERO marks saved",
            `Round ${this.req.round} of "${this.req.session}": ${body.saved} images marked. Training continues` +
            (etaText(this.req.eta) ? `; ${etaText(this.req.eta)}.` : "."));
      this.submittedHere = true;
      dropRequest(this.req.token, "saved");
      return;
    }
    const msg = body?.error || `HTTP ${status}`;
    toast("error", `HERO: marks not saved (${status || "no answer"})`, msg, 8000);
    this.reason.textContent = `Not saved: ${msg}`;
    this.errorShown = true;
    if (status === 404 || status === 409) {
      this.stale = `This request is no longer waiting: ${msg}`;
      requests.delete(this.req.token);
      refreshNodes();
    }
    this.render();
  }

  close(why) {
    window.removeEventListener("keydown", this.onKey, true);
    this.root.remove();
    if (overlay === this) overlay = null;
    if (why === "answered-elsewhere")
      toast("info", "HERO", `Round ${this.req.round} of "${this.req.session}" was marked elsewhere.`);
    // another request waiting? open it next (auto-open only)
    if (why === "saved" && setting(S_AUTOOPEN, true)) {
      const next = requests.values().next().value;
      if (next) setTimeout(() => { if (!overlay) openOverlay(next); }, 50);
    }
  }
}

function openOverlay(req) {
  if (overlay) {
    if (overlay.req.token === req.token) return overlay;
    overlay.close("switch");
  }
  overlay = new Overlay(req);
  return overlay;
}

// ---- the session panel (sidebar tab) -----------------------------------------------------------

let sidebarEl = null;

function goodRatePlot(rates) {
  const W = 220, H = 60, pad = 4;
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("class", "hero-plot");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", "good rate per round");
  const frame = document.createElementNS(ns, "rect");
  Object.entries({ x: 0.5, y: 0.5, width: W - 1, height: H - 1, class: "hero-plot-frame" })
    .forEach(([k, v]) => frame.setAttribute(k, v));
  svg.append(frame);
  const pts = rates.map((r, i) => [pad + (rates.length === 1 ? (W - 2 * pad) / 2 : (i * (W - 2 * pad)) / (rates.length - 1)),
                                   H - pad - (Math.max(0, Math.min(1, r ?? 0)) * (H - 2 * pad))]);
  if (pts.length > 1) {
    const line = document.createElementNS(ns, "polyline");
    line.setAttribute("points", pts.map((p) => p.join(",")).join(" "));
    line.setAttribute("class", "hero-plot-line");
    svg.append(line);
  }
  for (const [x, y] of pts) {
    const c = document.createElementNS(ns, "circle");
    c.setAttribute("cx", x); c.setAttribute("cy", y); c.setAttribute("r", 2.5);
    c.setAttribute("class", "hero-plot-dot");
    svg.append(c);
  }
  return svg;
}

const EXPORT_TITLES = { lora: "HERO LoRA exported", preferences: "HERO preference pairs exported",
                        noise: "HERO noise latent exported" };

async function exportSession(sid, btn, kind = "lora") {
  btn.disabled = true;
  const { status, body } = await postJSON("/hero/export", kind === "lora" ? { session: sid } : { session: sid, kind });
  btn.disabled = false;
  if (status === 200) {
    const extra = kind === "preferences" ? ` (${body.pairs} pairs)` : kind === "noise" ? ` (${body.noises} noises)` : "";
    toast("success", EXPORT_TITLES[kind] || "HERO export", (body.filename || body.path || "done") + extra);
    refreshSidebar();
  } else if (status === 409 && body?.nothing) {
    toast("info", "HERO: nothing to export yet", body.error || "", 6000);
  } else {
    toast("error", `HERO export failed (${status || "no answer"})`, body?.error || "", 8000);
  }
}

async function refreshSidebar() {
  const root = sidebarEl;
  if (!root) return;
  let sessions = [];
  let error = null;
  try {
    const res = await api.fetchApi("/hero/sessions", { cache: "no-store" });
    const data = await res.json();
    if (!res.ok) error = data.error || `HTTP ${res.status}`;
    sessions = data.sessions || [];
  } catch (e) {
    error = String(e?.message || e);
  }
  const waiting = [...requests.values()];
  root.replaceChildren(...[
    el("div", { class: "hero-side-head" },
      el("span", { text: "HERO sessions" }),
      el("button", { class: "hero-btn", onclick: () => { syncPending(); refreshSidebar(); } }, "Refresh")),
    waiting.length ? el("div", { class: "hero-side-waiting" },
      waiting.map((r) => el("button", { class: "hero-btn hero-primary", onclick: () => openOverlay(r) },
                            `Mark round ${r.round} of ${r.session} (${r.n})`))) : null,
    error ? el("div", { class: "hero-error", text: error }) : null,
    !error && sessions.length === 0 ? el("div", { class: "hero-help",
      text: "No sessions yet. Add HERO nodes and queue a round." }) : null,
    sessions.map((s) => {
      if (s.error) return el("div", { class: "hero-card" }, el("b", { text: s.session_id }),
                             el("div", { class: "hero-error", text: s.error }));
      const exp = s.last_export;
      return el("div", { class: "hero-card", "data-session": s.session_id },
        el("div", { class: "hero-card-title" }, el("b", { text: s.session_id }),
           el("span", { class: "hero-help", text: s.done ? " done" : "" })),
        el("div", { class: "hero-help",
                    text: `${s.round} rounds \u00b7 labels ${s.labels_used} / ${s.budget}` }),
        s.good_rate?.length ? goodRatePlot(s.good_rate) : el("div", { class: "hero-help", text: "no trained rounds yet" }),
        s.best_url ? el("img", { class: "hero-card-best", alt: "best image",
                                 src: api.apiURL(s.best_url) + `?t=${Math.round(s.mtime || 0)}` }) : null,
        el("div", { class: "hero-help",
                    text: exp ? `last LoRA: ${typeof exp === "string" ? exp : exp.file || exp.filename || exp.path}` +
                                 (exp.round !== undefined ? ` (round ${exp.round})` : "") : "no LoRA exported yet" }),
        el("button", { class: "hero-btn", "data-hero": "export", disabled: !s.good_rate?.length,
                       title: s.good_rate?.length ? "Write the LoRA to models/loras/hero/" : "Complete a round first",
                       onclick: (e) => exportSession(s.session_id, e.currentTarget) },
           "Export LoRA"),
        el("button", { class: "hero-btn", "data-hero": "export-preferences", disabled: !s.good_rate?.length,
                       title: "Write the marks as good-vs-bad pairs (JSONL) into the session's exports/ folder",
                       onclick: (e) => exportSession(s.session_id, e.currentTarget, "preferences") },
           "Export marks"),
        el("button", { class: "hero-btn", "data-hero": "export-noise", disabled: !s.best_url,
                       title: "Write the best and good initial noises as input/<name>.latent for Load Latent",
                       onclick: (e) => exportSession(s.session_id, e.currentTarget, "noise") },
           "Export noises"));
    })].flat().filter(Boolean));
}

// ---- registration ----------------------------------------------------------------------------------

app.registerExtension({
  name: EXT,
  settings: [
    { id: S_DEFAULT, name: "HERO: default mark of a new image", type: "combo", options: ["bad", "good"],
      defaultValue: "bad", category: ["HERO", "Marking", "Default mark"] },
    { id: S_AUTOOPEN, name: "HERO: open the marking panel when a batch is ready", type: "boolean",
      defaultValue: true, category: ["HERO", "Marking", "Auto open"] },
    { id: S_SOUND, name: "HERO: play a sound when a batch is ready", type: "boolean", defaultValue: true,
      category: ["HERO", "Marking", "Sound"] },
    { id: S_THUMB, name: "HERO: thumbnail size in the marking panel (px)", type: "slider",
      attrs: { min: 64, max: 512, step: 16 }, defaultValue: 160, category: ["HERO", "Marking", "Thumbnail size"] },
  ],

  async setup() {
    api.addEventListener("hero.request", (e) => addRequest(e.detail, { fresh: true }));
    api.addEventListener("hero.answered", (e) => {
      const t = e.detail?.token;
      if (!requests.has(t)) return;
      const mine = overlay && overlay.req.token === t;
      if (mine && overlay.busy) return; // our own submission: submit() finishes the job
      dropRequest(t, mine ? "answered-elsewhere" : "gone");
      refreshSidebar();
    });
    api.addEventListener("hero.cancelled", (e) => {
      const t = e.detail?.token;
      if (requests.has(t)) dropRequest(t, "cancelled");
    });
    api.addEventListener("executed", (e) => {
      const out = e.detail?.output?.hero_marks?.[0];
      if (out) { answered.set(String(e.detail.node), out); refreshNodes(); refreshSidebar(); }
      const text = e.detail?.output?.text;
      if (text?.length) {
        try { showStatus(e.detail.node, [].concat(text).join("\n")); } catch (err) { console.warn("[HERO] status", err); }
        if (findNode(e.detail.node)?.comfyClass === "HERO_Train") refreshSidebar();
      }
    });
    api.addEventListener("reconnected", () => syncPending());
    api.addEventListener("execution_interrupted", () => syncPending());
    try {
      app.extensionManager.registerSidebarTab({
        id: "hero-sessions", icon: "pi pi-thumbs-up", title: "HERO", tooltip: "HERO sessions",
        type: "custom",
        render: (root) => {
          sidebarEl = el("div", { class: "hero-sidebar" });
          root.replaceChildren(sidebarEl);
          refreshSidebar();
        },
      });
    } catch (e) {
      console.warn("[HERO] sidebar tab unavailable", e);
    }
    await syncPending();
  },

  nodeCreated(node) {
    if (node.comfyClass === NODE_CLASS) attachNodePanel(node);
  },

  loadedGraphNode(node) {
    if (node.comfyClass === NODE_CLASS) { attachNodePanel(node); renderNodePanel(node); }
  },

  afterConfigureGraph() {
    refreshNodes();
  },
});

// for tests and power users (read-only view + opening the panel)
window.HERO = { requests, openOverlay: (t) => requests.get(t) && openOverlay(requests.get(t)),
                syncPending, get overlay() { return overlay; } };
