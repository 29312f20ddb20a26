// ComfyUI-HERO front end: the settings, small DOM/HTTP helpers and the status box of the HERO nodes.
// Exports only (no side effects): ComfyUI also loads this file as an extension module; hero.js,
// hero_overlay.js and hero_sidebar.js import it by relative path, which resolves to the same module.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

// ---- settings (declared by hero.js's registerExtension; locales/en/settings.json mirrors them) ---

export const S_DEFAULT = "HERO.DefaultMark";
export const S_SOUND = "HERO.Sound";
export const S_THUMB = "HERO.ThumbSize";
export const S_AUTOOPEN = "HERO.AutoOpen";

export const SETTINGS = [
  { id: S_DEFAULT, name: "HERO: default mark of a new image", type: "combo", options: ["bad", "good"],
    defaultValue: "bad", category: ["HERO", "Marking", "Default mark"] },
  { id: S_AUTOOPEN, name: "HERO: open the marking panel when a batch is ready", type: "boolean",
    defaultValue: true, category: ["HERO", "Marking", "Auto open"] },
  { id: S_SOUND, name: "HERO: play a sound when a batch is ready", type: "boolean", defaultValue: true,
    category: ["HERO", "Marking", "Sound"] },
  { id: S_THUMB, name: "HERO: thumbnail size in the marking panel (px)", type: "slider",
    attrs: { min: 64, max: 512, step: 16 }, defaultValue: 160, category: ["HERO", "Marking", "Thumbnail size"] },
];

// ---- small helpers ---------------------------------------------------------------------------

export function el(tag, attrs = {}, ...children) {
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

export function setting(id, fallback) {
  try {
    const v = app.extensionManager?.setting?.get(id);
    return v === undefined || v === null ? fallback : v;
  } catch {
    return fallback;
  }
}

export function toast(severity, summary, detail, life = 4000) {
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

export function beep() {
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

export function isTyping(target) {
  if (!target || !(target instanceof Element)) return false;
  if (target.closest("input, textarea, select, [contenteditable=''], [contenteditable='true']"))
    return true;
  return !!target.isContentEditable;
}

export async function postJSON(path, body) {
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

export function findNode(id) {
  if (id === undefined || id === null || String(id).includes(":")) return null;
  const g = app.graph;
  return g?.getNodeById?.(Number(id)) ?? g?.getNodeById?.(id) ?? null;
}

// ---- status text of the other HERO nodes ---------------------------------------------------------
// HERO_Session / Generate / Train / ApplyLoRA / ExportLoRA return their one-line report as ui.text (e.g. "wrote
// models/loras/hero/x_r0003.safetensors", "kept the session's own settings for: ..."); the front end
// does not draw ui.text on a node by itself, so it goes into a small read-only box, made on the
// node's first report (nodes that never ran keep their saved size).

const STATUS_CLASSES = new Set(["HERO_Session", "HERO_Generate", "HERO_Train", "HERO_ApplyLoRA",
                                "HERO_ExportLoRA"]);

export function showStatus(nodeId, text) {
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
