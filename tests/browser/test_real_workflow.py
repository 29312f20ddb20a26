"""Browser E2E on the real pack and its example workflow (example_workflows/hero_sd15_round.json):
load it in the page, point its checkpoint loader at the random SD1.5 checkpoint, queue, mark in the
panel with the keyboard, submit, and wait for the round (generate -> feedback -> train) to finish.

Skipped until the workflow exists. CPU training is slow: generous timeouts.
"""
from __future__ import annotations

import json
import time

import pytest

from tests.browser.conftest import REPO, shot
from tests.support import comfy_server as cs

WORKFLOW = REPO / "example_workflows" / "hero_sd15_round.json"


@pytest.fixture(scope="module")
def real_server(tmp_path_factory, checkpoint):
    if not (REPO / "__init__.py").is_file() or not WORKFLOW.is_file():
        pytest.skip(f"the real pack or {WORKFLOW.name} is not there yet")
    srv = cs.ComfyServer(tmp_path_factory.mktemp("comfy_real"), checkpoint=checkpoint, pack_dir=REPO)
    srv.start()
    yield srv
    srv.stop()


def test_real_workflow_round(browser, real_server, checkpoint):
    srv = real_server
    srv.post("/settings/Comfy.TutorialCompleted", True)
    ctx = browser.new_context(viewport={"width": 1500, "height": 950})
    page = ctx.new_page()
    logs = []
    page.on("pageerror", lambda e: logs.append(f"pageerror: {e}\n{getattr(e, 'stack', '')}"))
    try:
        page.goto(srv.url)
        page.wait_for_function("window.HERO && window.app && window.app.graph", timeout=120_000)
        wf = json.loads(WORKFLOW.read_text())
        page.evaluate("wf => app.loadGraphData(wf)", wf)
        page.evaluate("""name => { for (const n of app.graph._nodes)
                          if (n.comfyClass === 'CheckpointLoaderSimple') n.widgets[0].value = name; }""",
                      checkpoint.name)
        assert page.locator(".hero-node-panel").count() >= 1
        page.evaluate("app.queuePrompt(0, 1)")
        page.wait_for_selector(".hero-overlay .hero-tile", timeout=480_000)
        req = srv.wait_pending(30)
        shot(page, "real_01_panel")
        page.keyboard.press("g")
        page.keyboard.press("s")
        page.keyboard.press("Enter")
        page.wait_for_selector(".hero-overlay", state="detached", timeout=20_000)
        sdir = srv.base / "output" / "hero" / req["session"]
        assert json.loads((sdir / "rounds" / f"{req['round']:04d}" / "marks.json").read_text())["good"] == [0]
        deadline = time.monotonic() + 480
        while time.monotonic() < deadline:
            if json.loads((sdir / "session.json").read_text())["next_round"] > req["round"]:
                break
            time.sleep(1)
        else:
            raise AssertionError(f"the round did not finish training:\n{srv.log_tail()}")
        shot(page, "real_02_trained")
        assert not [l for l in logs if "ComfyUI-HERO" in l], logs
    finally:
        ctx.close()
