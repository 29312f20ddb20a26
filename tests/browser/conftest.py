"""Fixtures for the browser tests: a headless ComfyUI with the HERO pack, Chromium via Playwright.

Skips loudly when the host, Chromium or Playwright is missing. Screenshots go to artifacts/browser/.
Set COMFYUI_PATH=~/comfy/ComfyUI-0.3.64 to run against the older host (front end 1.27.10).
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.support import comfy_server as cs  # noqa: E402
from tests.support import stub_pack  # noqa: E402

ARTIFACTS = REPO / "artifacts" / "browser" / cs.comfy_path().name  # one folder per host

CHROMIUM = os.environ.get("HERO_CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _skip(msg):
    print(f"\n*** SKIPPING HERO browser tests: {msg} ***\n", file=sys.stderr)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def checkpoint():
    why = cs.host_missing_reason()
    if why:
        _skip(why)
    return cs.cached_checkpoint()


@pytest.fixture(scope="module")
def server(tmp_path_factory, checkpoint):
    pack = stub_pack.build(tmp_path_factory.mktemp("pack") / "ComfyUI-HERO")
    base = tmp_path_factory.mktemp("comfy")
    srv = cs.ComfyServer(base, checkpoint=checkpoint, pack_dir=pack)
    srv.start()
    yield srv
    srv.stop()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(srv.log_path, ARTIFACTS / f"server-{base.name}.log")


@pytest.fixture(scope="session")
def browser():
    if not Path(CHROMIUM).exists():
        _skip(f"Chromium not found at {CHROMIUM} (apt-get install -y chromium, or set HERO_CHROMIUM)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _skip("playwright is not installed (pip install playwright)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    ctx = browser.new_context(viewport={"width": 1500, "height": 950})
    pg = ctx.new_page()
    logs = []
    pg.on("console", lambda m: logs.append(f"{m.type}: {m.text}"))
    pg.on("pageerror", lambda e: logs.append(f"pageerror: {e}\n{getattr(e, 'stack', '')}"))
    pg.hero_logs = logs
    yield pg
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "console.log").open("a").write("\n".join(logs) + "\n----\n")
    ctx.close()


def shot(page, name):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    p = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(p))
    return p
