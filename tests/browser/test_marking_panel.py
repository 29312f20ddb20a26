"""Browser E2E: the marking panel in a real ComfyUI page (headless Chromium + Playwright).

Flow: load the round graph into the page, queue it from the page, the overlay opens with the
batch, marks are made with keys and the mouse, Enter submits, the marks are on disk and the round
finishes; a reload mid-wait finds the request again via GET /hero/pending; a rejected submission
shows the server's error and marks answered elsewhere close the panel.

Graph: tests/support/graphs.stub_round_graph (random SD1.5 checkpoint -> KSampler -> VAEDecode ->
HERO_TestBatch -> HERO_Feedback -> HERO_TestFinish) on the stub pack (tests/support/stub_pack).
"""
from __future__ import annotations

import json
import time

from tests.browser.conftest import shot
from tests.browser.panel_helpers import tile, tile_state
from tests.support.graphs import stub_round_graph

SID = "browser1"
GEN_TIMEOUT = 240_000  # ms: first round loads the checkpoint and samples on CPU


def marks_on_disk(server, k, sid=SID):
    p = server.base / "output" / "hero" / sid / "rounds" / f"{k:04d}" / "marks.json"
    return json.loads(p.read_text()) if p.exists() else None


def session_json(server, sid=SID):
    return json.loads((server.base / "output" / "hero" / sid / "session.json").read_text())


def wait_round_done(server, k, sid=SID, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if session_json(server, sid)["next_round"] > k:
                return
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.3)
    raise AssertionError(f"round {k} did not finish:\n{server.log_tail()}")


def open_app(page, server):
    server.post("/settings/Comfy.TutorialCompleted", True)
    page.goto(server.url)
    page.wait_for_function("window.HERO && window.app && window.app.graph", timeout=120_000)


def test_mark_round_keyboard_mouse_reload_and_errors(page, server, checkpoint):
    open_app(page, server)
    graph = stub_round_graph(checkpoint.name, SID, batch=6, size=64)
    page.evaluate("g => app.loadApiJson(g, 'hero-round')", graph)
    page.wait_for_function("app.graph._nodes.some(n => n.comfyClass === 'HERO_Feedback')")
    assert page.locator(".hero-node-panel").count() == 1
    assert "Waiting for a batch" in page.locator(".hero-node-panel").inner_text()

    # --- round 0: queue from the page, mark with keys and mouse -------------------------------
    page.evaluate("app.queuePrompt(0, 1)")
    page.wait_for_selector(".hero-overlay .hero-tile img", timeout=GEN_TIMEOUT)
    page.wait_for_function("[...document.querySelectorAll('.hero-overlay .hero-tile img')]"
                           ".every(i => i.complete && i.naturalWidth > 0)", timeout=30_000)
    assert tile_state(page) == ["b"] * 6
    submit = page.locator(".hero-overlay [data-hero=submit]")
    assert submit.is_disabled()
    assert "mark at least one image good" in page.locator(".hero-reason").inner_text()
    shot(page, "01_round0_before_marking")

    kb = page.keyboard
    kb.press("g")                       # 1 good
    kb.press("ArrowRight")
    kb.press("ArrowRight")
    kb.press("s")                       # 3 best (and good)
    kb.press("ArrowRight")
    kb.press(" ")  # 4 good ...
    kb.press("z")                       # ... undone
    assert tile_state(page) == ["g", "b", "B", "b", "b", "b"]
    tile(page, 1).click()               # 2 good
    tile(page, 1).click()               # 2 bad again
    tile(page, 4).dblclick()            # 5 best -> 3 just good
    kb.press("ArrowLeft")
    kb.press("b")  # focus moved to 4 by the click? keep it bad anyway
    assert tile_state(page) == ["g", "b", "g", "b", "B", "b"]
    assert submit.is_enabled()
    assert "good 3 \u00b7 bad 3 \u00b7 best #5" in page.locator(".hero-counter").inner_text()
    # typing in an input must not mark images
    page.evaluate("""() => { const i = document.createElement('input'); i.id = 'hero-probe-input';
                            document.body.appendChild(i); i.focus(); }""")
    kb.press("a")
    assert tile_state(page) == ["g", "b", "g", "b", "B", "b"]
    page.evaluate("document.getElementById('hero-probe-input').remove()")
    shot(page, "02_round0_marked")

    kb.press("Enter")
    page.wait_for_selector(".hero-overlay", state="detached", timeout=20_000)
    m = marks_on_disk(server, 0)
    assert m["good"] == [0, 2, 4] and m["bad"] == [1, 3, 5] and m["best"] == 4
    wait_round_done(server, 0)
    page.wait_for_function("document.querySelector('.hero-node-panel').innerText.includes('Round 0 saved')",
                           timeout=20_000)
    page.evaluate("""() => { const n = app.graph._nodes.find(n => n.comfyClass === 'HERO_Feedback');
                             app.canvas.ds.offset = [-n.pos[0] + 500, -n.pos[1] + 200];
                             app.canvas.setDirty(true, true); }""")
    time.sleep(0.5)
    shot(page, "03_round0_saved")

    # --- round 1: reload while the node waits; the panel comes back from /hero/pending ----------
    page.evaluate("app.queuePrompt(0, 1)")
    page.wait_for_selector(".hero-overlay .hero-tile", timeout=GEN_TIMEOUT)
    pend = server.wait_pending(30, session=SID)
    assert pend["round"] == 1 and pend["has_current_best"] is True
    page.reload()
    page.wait_for_function("window.HERO && window.app && window.app.graph", timeout=120_000)
    page.wait_for_selector(".hero-overlay .hero-tile", timeout=30_000)
    assert "round 1" in page.locator(".hero-title").inner_text()
    page.wait_for_selector(".hero-overlay .hero-best img")  # the current best is shown
    kb = page.keyboard
    kb.press("End")
    kb.press("g")  # 6 good, best kept (a best exists)
    assert page.locator(".hero-overlay [data-hero=submit]").is_enabled()
    shot(page, "04_round1_after_reload")
    kb.press("Enter")
    page.wait_for_selector(".hero-overlay", state="detached", timeout=20_000)
    m = marks_on_disk(server, 1)
    assert m["good"] == [5] and m["best"] is None
    wait_round_done(server, 1)

    # --- round 2: a submission the server rejects shows its error; marks from elsewhere close --
    page.evaluate("app.queuePrompt(0, 1)")
    page.wait_for_selector(".hero-overlay .hero-tile", timeout=GEN_TIMEOUT)
    pend = server.wait_pending(30, session=SID)

    def corrupt(route):
        body = json.loads(route.request.post_data)
        body["good"] = body["good"] + [99]
        route.continue_(post_data=json.dumps(body))
    page.route("**/hero/marks", corrupt)
    page.keyboard.press("g")
    page.keyboard.press("Enter")
    page.wait_for_function("document.querySelector('.hero-reason').innerText.includes('Not saved')",
                           timeout=10_000)
    reason = page.locator(".hero-reason").inner_text()
    assert "out of range" in reason, reason
    assert page.locator(".hero-overlay").count() == 1  # stays open: nothing was saved
    shot(page, "05_round2_server_error")
    page.unroute("**/hero/marks")
    assert marks_on_disk(server, 2) is None
    status, body = server.post("/hero/marks", {"token": pend["token"], "good": [1], "bad": [0, 2, 3, 4, 5],
                                              "best": None})
    assert status == 200, body
    page.wait_for_selector(".hero-overlay", state="detached", timeout=10_000)  # hero.answered
    wait_round_done(server, 2)
    assert marks_on_disk(server, 2)["good"] == [1]

    # --- the session panel -----------------------------------------------------------------------
    page.evaluate("window.HERO.syncPending()")
    page.locator(".hero-sessions-tab-button").first.click()
    page.wait_for_selector(f".hero-card[data-session={SID}] .hero-plot", timeout=15_000)
    txt = page.locator(f".hero-card[data-session={SID}]").inner_text()
    assert "3 rounds" in txt and "labels 18 / 64" in txt
    page.wait_for_function(f"document.querySelector('.hero-card[data-session={SID}] img.hero-card-best')"
                           "?.naturalWidth > 0", timeout=10_000)
    shot(page, "06_session_panel")
    # only our errors: front end 1.27.10 throws one of its own while registering core settings
    errors = [l for l in page.hero_logs
              if (l.startswith("pageerror") and "ComfyUI-HERO" in l) or "[HERO]" in l]
    assert not errors, errors
