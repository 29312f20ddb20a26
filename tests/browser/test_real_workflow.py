"""Browser E2E on the real pack and its example workflow (example_workflows/hero_sd15_round.json).

The UI-format workflow is loaded in the page as a user would open it, its checkpoint loader pointed
at the random SD1.5 checkpoint and its widgets lowered for CPU (64x64, batch 4, 2 steps, 2 encoder
epochs). Round 0 is queued from the page; the marking panel opens on HERO_Feedback; images are
marked with the keyboard and the mouse and submitted; the marks are on disk; the round finishes
(HERO_Train committed, its metrics plot shown in the Preview Image node, HERO_ExportLoRA wrote its
file). Round 1 is queued: the panel shows the current best beside the grid. The session sidebar's
Export button runs the real exporter (POST /hero/export) and the file appears in models/loras/hero/.
Then the same flow with the Vue node renderer (``Comfy.VueNodes.Enabled``, front end >= 1.2x).

One server per host (the two tests share it and the session): COMFYUI_PATH, and also
HERO_COMFYUI_OLD_PATH (default ~/comfy/ComfyUI-0.3.64) when present. Screenshots:
artifacts/browser/<host folder name>/real_*.png.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.browser.conftest import ARTIFACTS, REPO
from tests.browser.panel_helpers import tile, tile_state
from tests.support import comfy_server as cs

WORKFLOW = REPO / "example_workflows" / "hero_sd15_round.json"
SID = "browser_real"
GEN_TIMEOUT = 300  # s: the first round loads the checkpoint and samples on CPU

# widget values (by name) that keep a round small on CPU
LOW = {
    "HERO_Session": {"session_id": SID, "batch_size": 4, "steps": 2, "encoder_epochs": 2,
                     "timesteps_per_sample": 2, "budget": 64, "update_steps": 4},
    "HERO_Generate": {"batch_size": 4, "steps": 2, "width": 64, "height": 64},
    "HERO_Feedback": {"timeout": 600},
}


@pytest.fixture(scope="module", params=cs.hosts(), ids=lambda p: p.name)
def real_server(request, tmp_path_factory, checkpoint):
    if not (REPO / "__init__.py").is_file() or not WORKFLOW.is_file():
        pytest.skip(f"the real pack or {WORKFLOW.name} is not there yet")
    cpath = request.param
    base = tmp_path_factory.mktemp("comfy_real")
    srv = cs.ComfyServer(base, checkpoint=checkpoint, pack_dir=REPO, cpath=cpath)
    srv.artifacts = ARTIFACTS.parent / cpath.name  # one screenshot folder per host
    srv.start()
    srv.post("/settings/Comfy.TutorialCompleted", True)
    yield srv
    srv.stop()
    srv.artifacts.mkdir(parents=True, exist_ok=True)
    try:
        (srv.artifacts / "server-real.log").write_text(srv.log_path.read_text(errors="replace"))
    except OSError:
        pass


def shot(page, name):
    d = page.hero_artifacts
    d.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(d / f"{name}.png"))


@pytest.fixture
def real_page(browser, real_server):
    ctx = browser.new_context(viewport={"width": 1500, "height": 950})
    page = ctx.new_page()
    logs = []
    page.on("console", lambda m: logs.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: logs.append(f"pageerror: {e}\n{getattr(e, 'stack', '')}"))
    page.hero_logs = logs
    page.hero_artifacts = real_server.artifacts
    yield page
    real_server.artifacts.mkdir(parents=True, exist_ok=True)
    (real_server.artifacts / "console-real.log").open("a").write("\n".join(logs) + "\n----\n")
    ctx.close()


# ---- helpers ------------------------------------------------------------------------------------

def sdir(srv):
    return srv.base / "output" / "hero" / SID


def next_round(srv) -> int:
    try:
        return json.loads((sdir(srv) / "session.json").read_text())["next_round"]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def marks_on_disk(srv, k):
    p = sdir(srv) / "rounds" / f"{k:04d}" / "marks.json"
    return json.loads(p.read_text()) if p.exists() else None


def history_errors(srv) -> list:
    status, h = srv.get("/history")
    if status != 200:
        return []
    out = []
    for pid, item in h.items():
        st = item.get("status") or {}
        if st.get("status_str") == "error":
            out.append([m for m in st.get("messages", []) if m[0] == "execution_error"])
    return out


def wait_for(page, srv, selector, timeout_s, what):
    """wait_for_selector, failing early with the server's words if the prompt errored."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return page.wait_for_selector(selector, timeout=5_000)
        except Exception:  # playwright TimeoutError
            errs = history_errors(srv)
            if errs:
                raise AssertionError(f"{what}: the prompt failed: {errs}\n{srv.log_tail(30)}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: {selector} not there after {timeout_s} s\n{srv.log_tail(40)}")


def wait_round_done(srv, k, timeout_s=600):
    deadline = time.monotonic() + timeout_s
    while next_round(srv) <= k:
        errs = history_errors(srv)
        assert not errs, f"round {k} failed: {errs}\n{srv.log_tail(30)}"
        assert time.monotonic() < deadline, f"round {k} did not finish training:\n{srv.log_tail(40)}"
        time.sleep(0.5)


def wait_queue_empty(srv, timeout_s=120):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status, q = srv.get("/queue")
        if status == 200 and not q.get("queue_running") and not q.get("queue_pending"):
            return
        time.sleep(0.5)
    raise AssertionError(f"the queue did not empty in {timeout_s} s:\n{srv.log_tail(30)}")


def open_workflow(page, srv, checkpoint):
    page.goto(srv.url)
    page.wait_for_function("window.HERO && window.app && window.app.graph", timeout=120_000)
    wf = json.loads(WORKFLOW.read_text())
    page.evaluate("wf => app.loadGraphData(wf)", wf)
    page.wait_for_function("app.graph._nodes.some(n => n.comfyClass === 'HERO_Feedback')")
    low = dict(LOW, CheckpointLoaderSimple={"ckpt_name": checkpoint.name})
    missing = page.evaluate("""low => { const miss = [];
        for (const [cls, vals] of Object.entries(low)) {
          const n = app.graph._nodes.find(n => n.comfyClass === cls);
          if (!n) { miss.push(cls); continue; }
          for (const [name, v] of Object.entries(vals)) {
            const w = (n.widgets || []).find(w => w.name === name);
            if (!w) miss.push(cls + '.' + name); else w.value = v;
          } }
        app.graph.setDirtyCanvas(true, true);
        return miss; }""", low)
    assert not missing, f"widgets not found in the loaded workflow: {missing}"
    # the example's own values landed on the right widgets (UI order = required, then optional)
    vals = page.evaluate("""() => Object.fromEntries(app.graph._nodes.filter(n => n.comfyClass?.startsWith('HERO_'))
        .map(n => [n.comfyClass, Object.fromEntries((n.widgets || []).filter(w => w.name && w.serialize !== false)
                                                     .map(w => [w.name, w.value]))]))""")
    assert vals["HERO_Feedback"]["marks"] == "" and vals["HERO_ExportLoRA"]["filename_prefix"] == "hero"
    assert vals["HERO_ExportLoRA"]["dtype"] == "fp16" and vals["HERO_Session"]["method"] == "hero"
    return vals


def tiles_loaded(page):
    page.wait_for_function("[...document.querySelectorAll('.hero-overlay .hero-tile img')]"
                           ".every(i => i.complete && i.naturalWidth > 0)", timeout=30_000)


def our_errors(page):
    return [l for l in page.hero_logs
            if (l.startswith("pageerror") and ("ComfyUI-HERO" in l or "hero" in l.lower())) or "[HERO]" in l]


def show_node(page, cls, dx=200, dy=120):
    page.evaluate("""([cls, dx, dy]) => { const n = app.graph._nodes.find(n => n.comfyClass === cls);
        app.canvas.ds.scale = 1; app.canvas.ds.offset = [-n.pos[0] + dx, -n.pos[1] + dy];
        app.canvas.setDirty(true, true); }""", [cls, dx, dy])
    time.sleep(0.7)


# ---- the tests ----------------------------------------------------------------------------------

def test_real_workflow_round(real_page, real_server, checkpoint):
    page, srv = real_page, real_server
    open_workflow(page, srv, checkpoint)
    assert page.locator(".hero-node-panel").count() == 1
    assert "Waiting for a batch" in page.locator(".hero-node-panel").inner_text()

    # --- round 0: queue from the page, mark with keys and mouse, submit ------------------------
    page.evaluate("app.queuePrompt(0, 1)")
    wait_for(page, srv, ".hero-overlay .hero-tile img", GEN_TIMEOUT, "round 0 panel")
    tiles_loaded(page)
    req = srv.wait_pending(30, session=SID)
    assert req["round"] == 0 and req["n"] == 4 and req["current_best"] is None
    assert page.locator(".hero-overlay .hero-nobest").count() == 1
    assert page.locator(".hero-overlay [data-hero=submit]").is_disabled()
    # round 0: only HERO Generate has been timed; the training time is known after this round
    assert req["eta"]["generate_seconds"] > 0 and req["eta"]["train_seconds"] is None
    eta0 = page.locator(".hero-overlay [data-hero=eta]").inner_text()
    assert "timed after the first round" in eta0 and "generating" in eta0, eta0
    shot(page, "real_01_round0_panel")
    kb = page.keyboard
    kb.press("g")                   # image 1 good (keyboard)
    tile(page, 2).dblclick()        # image 3 best (mouse)
    tile(page, 3).click()           # image 4 good ...
    tile(page, 3).click()           # ... and bad again
    kb.press("ArrowLeft")
    kb.press("ArrowLeft")
    kb.press("b")  # image 2 stays bad
    assert tile_state(page) == ["g", "b", "B", "b"]
    assert page.locator(".hero-overlay [data-hero=submit]").is_enabled()
    shot(page, "real_02_round0_marked")
    kb.press("Enter")
    page.wait_for_selector(".hero-overlay", state="detached", timeout=20_000)
    m = marks_on_disk(srv, 0)
    assert m["good"] == [0, 2] and m["bad"] == [1, 3] and m["best"] == 2

    # --- the round finishes: trained, metrics plot shown, LoRA exported by the workflow --------
    wait_round_done(srv, 0)
    wait_queue_empty(srv)
    assert not history_errors(srv)
    page.wait_for_function("document.querySelector('.hero-node-panel').innerText.includes('Round 0 saved')",
                           timeout=20_000)
    exported = srv.base / "models" / "loras" / "hero" / "hero_r0001.safetensors"
    assert exported.is_file(), "HERO_ExportLoRA (after HERO Train) must have written its file"
    # the Preview Image node got HERO_Train's metrics plot (a 768x512 chart)
    prev_id = page.evaluate("app.graph._nodes.find(n => n.comfyClass === 'PreviewImage').id")
    page.wait_for_function(f"""() => {{ const n = app.graph.getNodeById({prev_id});
        return (n.imgs && n.imgs.length && n.imgs[0].naturalWidth > 0) ||
               (app.nodeOutputs && app.nodeOutputs['{prev_id}']?.images?.length); }}""", timeout=20_000)
    status, h = srv.get("/history")
    outs = [it["outputs"].get(str(prev_id)) for it in h.values() if str(prev_id) in it.get("outputs", {})]
    assert outs and outs[-1]["images"], h
    img = outs[-1]["images"][0]
    st, png = srv.get(f"/view?filename={img['filename']}&subfolder={img['subfolder']}&type={img['type']}")
    assert st == 200 and png[:8] == b"\x89PNG\r\n\x1a\n"
    import struct
    assert struct.unpack(">II", png[16:24]) == (768, 512)  # HERO_Train's metrics chart
    # the nodes' one-line reports (ui.text) are shown on the nodes
    page.wait_for_function("[...document.querySelectorAll('.hero-status')].some(b => "
                           "b.textContent.includes('wrote models/loras/hero/hero_r0001.safetensors'))",
                           timeout=20_000)
    status = page.eval_on_selector_all(".hero-status", "bs => bs.map(b => b.textContent)")
    assert any("session browser_real: created, round 0" in t for t in status), status
    assert any("policy loss" in t and "took" in t and "update" in t for t in status), status
    assert any("round 0: 4 images in" in t for t in status), status  # HERO Generate's report
    show_node(page, "HERO_Train", dx=120, dy=60)
    shot(page, "real_03_round0_trained")

    # --- round 1: the current best is shown beside the grid ---------------------------------------
    page.evaluate("app.queuePrompt(0, 1)")
    wait_for(page, srv, ".hero-overlay .hero-tile img", GEN_TIMEOUT, "round 1 panel")
    tiles_loaded(page)
    req = srv.wait_pending(30, session=SID)
    assert req["round"] == 1 and req["has_current_best"] is True
    page.wait_for_function("document.querySelector('.hero-overlay .hero-best img')?.naturalWidth > 0",
                           timeout=15_000)
    assert "Current best" in page.locator(".hero-overlay .hero-best").inner_text()
    # round 1: the wait after Submit = round 0's training + this batch's generation
    assert req["eta"]["train_seconds"] > 0 and req["eta"]["generate_seconds"] > 0
    eta1 = page.locator(".hero-overlay [data-hero=eta]").inner_text()
    assert eta1.startswith("next batch about ") and "training" in eta1, eta1
    kb = page.keyboard
    kb.press("a")                   # all good ...
    kb.press("End")
    kb.press("b")  # ... but the last; best kept
    assert tile_state(page) == ["g", "g", "g", "b"]
    shot(page, "real_04_round1_current_best")
    kb.press("Enter")
    page.wait_for_selector(".hero-overlay", state="detached", timeout=20_000)
    m = marks_on_disk(srv, 1)
    assert m["good"] == [0, 1, 2] and m["best"] is None
    wait_round_done(srv, 1)
    wait_queue_empty(srv)

    # --- the session sidebar: Export LoRA through the real exporter --------------------------------
    page.locator(".hero-sessions-tab-button").first.click()
    card = f".hero-card[data-session={SID}]"
    page.wait_for_selector(f"{card} .hero-plot", timeout=15_000)
    txt = page.locator(card).inner_text()
    assert "2 rounds" in txt and "labels 8 / 64" in txt, txt
    target = srv.base / "models" / "loras" / "hero" / f"{SID}_r0002.safetensors"
    assert not target.exists()
    with page.expect_response(lambda r: r.url.endswith("/hero/export")) as resp:
        page.locator(f"{card} [data-hero=export]").click()
    assert resp.value.status == 200, resp.value.text()
    assert resp.value.json()["filename"] == f"hero/{SID}_r0002.safetensors"
    assert target.is_file()
    page.wait_for_function(f"document.querySelector('{card}').innerText.includes('hero/{SID}_r0002.safetensors')",
                           timeout=15_000)
    page.wait_for_function(f"document.querySelector('{card} img.hero-card-best')?.naturalWidth > 0",
                           timeout=10_000)
    page.get_by_text("HERO LoRA exported").first.wait_for(timeout=10_000)  # the toast
    time.sleep(0.6)  # let it finish fading in for the screenshot
    shot(page, "real_05_sidebar_export")
    from safetensors import safe_open
    with safe_open(str(target), "pt") as f:
        md = f.metadata()
        assert all(k.startswith("lora_unet_") for k in f.keys())
    assert md["hero_session_id"] == SID and md["hero_round"] == "2"
    assert md["sshs_model_hash"] and md["modelspec.thumbnail"].startswith("data:image/jpeg")
    assert (target.with_suffix(".json")).is_file()  # the A1111 card

    # --- the sidebar's two data exports: the marks as pairs, the noises as a .latent ------------
    with page.expect_response(lambda r: r.url.endswith("/hero/export")) as resp:
        page.locator(f"{card} [data-hero=export-preferences]").click()
    assert resp.value.status == 200, resp.value.text()
    body = resp.value.json()
    ds = Path(body["path"])
    pairs = sum(len(marks_on_disk(srv, k)["good"]) * len(marks_on_disk(srv, k)["bad"]) for k in (0, 1))
    assert ds.is_file() and body["pairs"] == pairs == len(ds.read_text().splitlines())
    page.get_by_text("HERO preference pairs exported").first.wait_for(timeout=10_000)
    with page.expect_response(lambda r: r.url.endswith("/hero/export")) as resp:
        page.locator(f"{card} [data-hero=export-noise]").click()
    assert resp.value.status == 200, resp.value.text()
    lat = srv.base / "input" / resp.value.json()["filename"]
    assert lat.is_file() and lat.name == f"hero_{SID}_r0002.latent"
    page.get_by_text("HERO noise latent exported").first.wait_for(timeout=10_000)
    assert not our_errors(page), our_errors(page)


def vue_nodes_supported(page) -> bool:
    return bool(page.evaluate("""() => { try { const s = app.extensionManager.setting;
        return s.get('Comfy.VueNodes.Enabled') !== undefined; } catch { return false; } }"""))


def test_real_workflow_vue_nodes(real_page, real_server, checkpoint):
    """The same round with the Vue node renderer: the node panel is inside the Vue node, the
    overlay opens, marks are saved, the round finishes."""
    page, srv = real_page, real_server
    page.goto(srv.url)
    page.wait_for_function("window.HERO && window.app && window.app.graph", timeout=120_000)
    if not vue_nodes_supported(page):
        pytest.skip("this front end has no Comfy.VueNodes.Enabled setting")
    try:
        # switch the renderer with the workflow open (the Vue nodes then show the lowered values)
        open_workflow(page, srv, checkpoint)
        page.evaluate("app.extensionManager.setting.set('Comfy.VueNodes.Enabled', true)")
        assert page.evaluate("app.extensionManager.setting.get('Comfy.VueNodes.Enabled')") is True
        page.wait_for_selector("[data-node-id]", timeout=20_000)
        page.wait_for_function("document.querySelectorAll('[data-node-id]').length >= 9", timeout=20_000)
        time.sleep(1)
        # front end 1.27.10's (experimental) Vue nodes render no DOM widgets at all, not even the
        # core multiline prompt of CLIP Text Encode: our node panel is then absent, and marking
        # goes through the overlay (auto-open) and the sidebar only (docs/nodes.md)
        dom_widgets = page.locator("[data-node-id] textarea").count() > 0
        if dom_widgets:
            page.wait_for_selector("[data-node-id] .hero-node-panel", timeout=20_000)  # in the Vue node
            assert page.locator(".hero-node-panel").count() == 1
            assert "Waiting for a batch" in page.locator(".hero-node-panel").first.inner_text()
        k = next_round(srv)
        page.evaluate("app.queuePrompt(0, 1)")
        wait_for(page, srv, ".hero-overlay .hero-tile img", GEN_TIMEOUT, "Vue nodes: panel")
        tiles_loaded(page)
        req = srv.wait_pending(30, session=SID)
        assert req["round"] == k
        page.keyboard.press("Escape")
        page.wait_for_selector(".hero-overlay", state="detached", timeout=5_000)
        if dom_widgets:
            # the node panel (inside the Vue node) lists the waiting batch and reopens the overlay
            node_panel = page.locator("[data-node-id] .hero-node-panel").first
            page.wait_for_function("document.querySelector('[data-node-id] .hero-node-panel')"
                                   ".innerText.includes('wait for your marks')", timeout=10_000)
            assert "null" not in node_panel.inner_text()
            assert node_panel.locator("img").count() == 4
            shot(page, "real_06_vue_node_panel")
            node_panel.locator("[data-hero=open]").click()
        else:
            # reopen from the session sidebar instead
            page.locator(".hero-sessions-tab-button").first.click()
            btn = page.locator(".hero-side-waiting button").first
            btn.wait_for(timeout=10_000)
            shot(page, "real_06_vue_no_dom_widgets_sidebar")
            btn.click()
        page.wait_for_selector(".hero-overlay .hero-tile", timeout=10_000)
        tile(page, 0).click()
        page.keyboard.press("ArrowRight")
        page.keyboard.press("s")
        assert tile_state(page) == ["g", "B", "b", "b"]
        shot(page, "real_07_vue_marked")
        page.locator(".hero-overlay [data-hero=submit]").click()
        page.wait_for_selector(".hero-overlay", state="detached", timeout=20_000)
        m = marks_on_disk(srv, k)
        assert m["good"] == [0, 1] and m["best"] == 1
        wait_round_done(srv, k)
        wait_queue_empty(srv)
        if dom_widgets:
            page.wait_for_function("document.querySelector('[data-node-id] .hero-node-panel')"
                                   f".innerText.includes('Round {k} saved')", timeout=20_000)
        assert not our_errors(page), our_errors(page)
    finally:
        srv.post("/settings/Comfy.VueNodes.Enabled", False)
