// ComfyUI-HERO front end: the session panel (a sidebar tab): sessions, good rate, exports.
// Exports only (no side effects): ComfyUI also loads this file as an extension module; hero.js
// imports it by relative path, which resolves to the same module.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";
import { el, postJSON, toast } from "./hero_dom.js";
import { openOverlay, requests, syncPending } from "./hero_overlay.js";

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

export async function refreshSidebar() {
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

export function registerSidebar() {
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
}
