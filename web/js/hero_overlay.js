// ComfyUI-HERO front end: the requests waiting for marks, the panel on the HERO_Feedback node and the
// marking overlay. Exports only (no side effects): ComfyUI also loads this file as an extension
// module; hero.js imports it by relative path, which resolves to the same module.
// Marks API: docs/marks_api.md.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";
import { MarkState, moveFocus, etaText } from "./hero_rules.js";
import { S_AUTOOPEN, S_DEFAULT, S_THUMB, beep, el, isTyping, postJSON, setting, toast,
         viewURL } from "./hero_dom.js";

export const NODE_CLASS = "HERO_Feedback";

// ---- state: the requests waiting for marks -----------------------------------------------------

export const requests = new Map(); // token -> request (as sent by the server)
export const answered = new Map(); // node id -> last saved summary {session, round, good, bad, best}
let overlay = null;                // the open Overlay, if any
let changed = () => {};            // called when the waiting requests change (the sidebar redraws)

export function currentOverlay() {
  return overlay;
}

export function onRequestsChanged(fn) {
  changed = fn;
}

function requestForNode(node) {
  for (const r of requests.values()) if (String(r.node) === String(node.id)) return r;
  return null;
}

// A request superseded by a newer one for the same round leaves through the server's
// hero.cancelled event (or GET /hero/pending), like any other request that stops waiting.
export function addRequest(r, { fresh = false } = {}) {
  if (!r || !r.token) return;
  const known = requests.has(r.token);
  requests.set(r.token, r);
  refreshNodes();
  if (!known) {
    if (fresh) beep();
    if (setting(S_AUTOOPEN, true) && !overlay) openOverlay(r);
  }
  changed();
}

export function dropRequest(token, why) {
  const r = requests.get(token);
  requests.delete(token);
  if (overlay && overlay.req.token === token) overlay.close(why);
  refreshNodes();
  changed();
  return r;
}

export async function syncPending() {
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

export function refreshNodes() {
  const nodes = app.graph?._nodes || app.graph?.nodes || [];
  for (const n of nodes) if (n.comfyClass === NODE_CLASS && n._hero) renderNodePanel(n);
}

export function renderNodePanel(node) {
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

export function attachNodePanel(node) {
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

export function openOverlay(req) {
  if (overlay) {
    if (overlay.req.token === req.token) return overlay;
    overlay.close("switch");
  }
  overlay = new Overlay(req);
  return overlay;
}
