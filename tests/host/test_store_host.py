"""Issue 12 on the ComfyUI host (in-process, tiny models): panel exports over HTTP while HERO Train
commits real rounds, export argument checks (before anything is loaded), fingerprint_inputs as
ComfyUI's executor calls it, the HERO Session repair option."""
from __future__ import annotations

import asyncio
import json
import logging
import math
import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from support.pack_import import import_pack_module
from test_adapter import gen, mark_and_train, new_session
from tiny_models import make_model


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


class ServerThread:
    """The HERO routes with the real exporter on a real port, in a thread with its own loop."""

    def __init__(self, root: Path, pack):
        self.root, self.pack = root, pack
        self.ready = threading.Event()
        self.routes = import_pack_module("nodes.routes")

    def __enter__(self):
        from aiohttp import web

        def run():
            self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self.loop)
            routes = web.RouteTableDef()
            self.routes.add_routes(routes, import_pack_module("nodes.marks").MarksRegistry(),
                                   lambda: self.root,
                                   self.routes.SessionViews(exporter=self.pack.nodes._panel_export))
            app = web.Application()
            app.add_routes(routes)
            self.runner = web.AppRunner(app)
            self.loop.run_until_complete(self.runner.setup())
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            self.loop.run_until_complete(site.start())
            self.port = self.runner.addresses[0][1]
            self.ready.set()
            self.loop.run_forever()
            self.loop.run_until_complete(self.runner.cleanup())

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert self.ready.wait(30)
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def __exit__(self, *exc):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


def test_panel_exports_during_real_commits(pack, dirs):
    """The sidebar's Export and summary, sent over HTTP again and again while HERO Train commits
    rounds (the defect: 500 "state folder ... missing", then a session that no longer opens)."""
    root = dirs["output"]
    mp = make_model("sd15")
    s = new_session(pack, root)
    rounds = 4
    stop = threading.Event()
    results = {"export": {}, "summary": {}}
    bad = []
    with ServerThread(root, pack) as srv:
        def hammer():
            while not stop.is_set():
                st, body = _post(srv.url + "/hero/export", {"session": "s1"})
                results["export"][st] = results["export"].get(st, 0) + 1
                if st != 200 and not (st == 409 and "no trained LoRA" in body.get("error", "")):
                    bad.append(("export", st, body))
                if st == 200:
                    st2, summ = _get(srv.url + "/hero/session/s1")
                    if st2 != 200 or summ["last_export"] is None \
                            or summ["last_export"]["round"] < body["round"]:
                        bad.append(("last_export after a 200", st2, summ.get("last_export"), body))
                st, body = _get(srv.url + "/hero/session/s1")
                results["summary"][st] = results["summary"].get(st, 0) + 1
                if st != 200:
                    bad.append(("summary", st, body))
                time.sleep(0.01)

        t = threading.Thread(target=hammer)
        t.start()
        try:
            for r in range(rounds):
                res = mark_and_train(pack, mp, s, gen(pack, mp, "sd15", s))
                assert res.trained and s.round == r + 1
        finally:
            stop.set()
            t.join(60)
        final = _post(srv.url + "/hero/export", {"session": "s1"})
    assert bad == [], bad[:5]
    assert results["export"].get(200, 0) >= rounds, results
    assert final[0] == 200 and final[1]["round"] == rounds
    again = pack.engine_session.Session.open(s.path)
    assert again.round == rounds and again.info["last_export"]["round"] == rounds
    assert again.info["last_export"]["file"] == final[1]["filename"]
    assert (dirs["loras"] / final[1]["filename"]).is_file()
    assert sorted(p.name for p in s.path.glob("state-*")) == ["state-0003", "state-0004"]
    print(f"\npanel exports during {rounds} host commits: {results}")


BAD_PREFIXES = ["true", "True", "false", "null", "-rf", "--x", "CON", "con", "NUL", "lpt1",
                "COM3", "../x", "a/b", "", " ", "a b", "x" * 65, "_lead", "é", True, 5, None]


def test_export_arguments_checked_before_loading(pack, dirs):
    host = pack.host
    mp = make_model("sd15")
    s = new_session(pack, dirs["output"])
    mark_and_train(pack, mp, s, gen(pack, mp, "sd15", s))
    calls = []
    orig = s.load_state

    def spy(names=None):
        calls.append(names)
        return orig(names)
    s.load_state = spy
    for bad in BAD_PREFIXES:
        with pytest.raises(host.HeroHostError, match="filename_prefix"):
            host.export_lora(s, bad, "fp16")
    for bad in ("bf16", "fp8", "", "float", 16, True):
        with pytest.raises(host.HeroHostError, match=r"unknown dtype .*fp16, fp32"):
            host.export_lora(s, "ok", bad)
    assert calls == [], "nothing may be loaded before the arguments are checked"
    res = host.export_lora(s, "ok32", "FP32")
    assert calls == [("lora",)], "an export loads the LoRA only, not the 128 MB encoder"
    from safetensors import safe_open
    with safe_open(res["path"], "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.float32 for k in f.keys())
    assert s.info["last_export"]["file"] == "hero/ok32_r0001.safetensors"
    assert host.export_lora(s, " hero-1 ")["filename"] == "hero/hero-1_r0001.safetensors"
    # the panel export gives the same checks as a 400 naming the problem
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer
    routes = import_pack_module("nodes.routes")

    async def main():
        rt = web.RouteTableDef()
        routes.add_routes(rt, import_pack_module("nodes.marks").MarksRegistry(),
                          lambda: dirs["output"], routes.SessionViews(exporter=pack.nodes._panel_export))
        app = web.Application()
        app.add_routes(rt)
        out = []
        async with TestClient(TestServer(app)) as c:
            for body in ({"session": "s1", "filename_prefix": "true"},
                         {"session": "s1", "filename_prefix": "-rf"},
                         {"session": "s1", "filename_prefix": "CON"},
                         {"session": "s1", "filename_prefix": True},
                         {"session": "s1", "dtype": "bf16"},
                         {"session": "s1"}):
                r = await c.post("/hero/export", json=body)
                out.append((r.status, (await r.json())))
        return out
    out = asyncio.run(main())
    assert [o[0] for o in out] == [400, 400, 400, 400, 400, 200], out
    assert "reads as a value" in out[0][1]["error"] and "starting with a letter" in out[1][1]["error"]
    assert "reserved device name" in out[2][1]["error"] and "must be text" in out[3][1]["error"]
    assert "unknown dtype 'bf16'" in out[4][1]["error"]
    assert out[5][1]["filename"] == "hero/s1_r0001.safetensors"
    assert not [p for p in (dirs["loras"] / "hero").iterdir()
                if p.name.lower().startswith(("true", "-", "con"))]


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.msgs = []

    def emit(self, record):
        self.msgs.append(record.getMessage())


def test_fingerprint_inputs_as_comfyui_calls_it(pack, comfy, monkeypatch):
    """ComfyUI's IsChangedCache calls fingerprint_inputs with the node's inputs as keywords. The
    old ``_nan(**kw)`` as a classmethod failed on every prompt (logged `_nan() takes 0 positional
    arguments but 1 was given`) and NaN came from the executor's fallback instead."""
    import execution
    import nodes as comfy_nodes
    from comfy_execution.graph import DynamicPrompt
    prompt = {
        "1": {"class_type": "HERO_Session", "inputs": {"session_id": "x", "batch_size": 4,
                                                       "seed": 1}},
        "2": {"class_type": "HERO_ExportLoRA", "inputs": {"filename_prefix": "hero",
                                                          "session": ["1", 0]}},
        "3": {"class_type": "HERO_Train", "inputs": {"model": ["9", 0]}},
    }
    for n in pack.nodes.NODES:
        monkeypatch.setitem(comfy_nodes.NODE_CLASS_MAPPINGS, n.__name__, n)
    h = _Records()
    logging.getLogger().addHandler(h)
    try:
        cache = execution.IsChangedCache("p1", DynamicPrompt(prompt), None)
        got = {k: asyncio.run(cache.get(k)) for k in prompt}
    finally:
        logging.getLogger().removeHandler(h)
    assert not [m for m in h.msgs if "positional" in m or "WARNING" in m], h.msgs
    for k, v in got.items():  # our function's result (a list per input batch), not the fallback
        assert isinstance(v, list) and len(v) == 1 and math.isnan(v[0]), (k, v)


def test_session_node_repair_option(pack, dirs):
    mp = make_model("sd15")
    s = new_session(pack, dirs["output"] / "hero", name="rep")  # where HERO Session looks
    for _ in range(2):
        mark_and_train(pack, mp, s, gen(pack, mp, "sd15", s))
    shutil.rmtree(s.path / "state-0002")
    config = pack.engine_session.HeroConfig()
    with pytest.raises(pack.engine_session.SessionDamaged,
                       match=r"state-0002 .* is missing.*state-0001.*'repair' option"):
        pack.nodes.open_session("rep", config)
    s2, created, _ = pack.nodes.open_session("rep", config, repair=True)
    assert not created and s2.round == 1 and s2.marks_for(1) is not None
    # round 1 trains again from its saved marks: HERO Generate re-uses the stored batch
    b = gen(pack, mp, "sd15", s2)
    assert b.reused and b.round == 1
    from types import SimpleNamespace
    fb = SimpleNamespace(session=s2, round=1, marks=s2.marks_for(1), batch=b)
    with torch.inference_mode():
        assert pack.host.train(mp, s2, fb).trained
    assert pack.engine_session.Session.open(s2.path).round == 2
    # a folder with a session's remains but no session.json is not silently replaced
    (s.path / "session.json").unlink()
    with pytest.raises(pack.engine_session.SessionDamaged, match="missing file"):
        pack.nodes.open_session("rep", config)
    assert pack.nodes.open_session("rep", config, repair=True)[0].round == 2
