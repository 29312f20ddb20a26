// ComfyUI-HERO front end: the entry file that registers the extension and wires the server events.
// Public APIs only: app, api, registerExtension, node.addDOMWidget, app.extensionManager.
// Marks API: docs/marks_api.md. The parts: hero_dom.js (settings, DOM/HTTP helpers, node status
// box), hero_overlay.js (the requests waiting, the node panel, the marking overlay), hero_sidebar.js
// (the session panel), hero_rules.js (the marking rules, no DOM). ComfyUI loads every .js file here
// as a module; only this one has side effects, the others are imported by relative path and so
// evaluated once.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";
import { SETTINGS, findNode, showStatus } from "./hero_dom.js";
import { NODE_CLASS, addRequest, answered, attachNodePanel, currentOverlay, dropRequest,
         onRequestsChanged, openOverlay, refreshNodes, renderNodePanel, requests,
         syncPending } from "./hero_overlay.js";
import { refreshSidebar, registerSidebar } from "./hero_sidebar.js";

export { viewURL } from "./hero_dom.js";

const EXT = "ComfyUI.HERO";

const css = document.createElement("link");
css.rel = "stylesheet";
css.href = new URL("./hero.css", import.meta.url).href;
document.head.appendChild(css);

onRequestsChanged(refreshSidebar);

app.registerExtension({
  name: EXT,
  settings: SETTINGS,

  async setup() {
    api.addEventListener("hero.request", (e) => addRequest(e.detail, { fresh: true }));
    api.addEventListener("hero.answered", (e) => {
      const t = e.detail?.token;
      if (!requests.has(t)) return;
      const overlay = currentOverlay();
      const mine = overlay && overlay.req.token === t;
      if (mine && overlay.busy) return; // our own submission: submit() finishes the job
      dropRequest(t, mine ? "answered-elsewhere" : "gone");
      refreshSidebar();
    });
    // the server's word that a request stopped waiting: timed out, interrupted, or superseded by a
    // newer request for the same round
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
    registerSidebar();
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
                syncPending, get overlay() { return currentOverlay(); } };
