"""The marks API: registry (nodes/marks.py) and HTTP routes (nodes/routes.py), without ComfyUI.

Runs on the engine session (hero_engine.session.Session) mounted as the pack would see it; the
routes are mounted on a plain aiohttp app. Docs: docs/marks_api.md.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.support.pack_import import import_pack_module

marks_mod = import_pack_module("nodes.marks")
routes_mod = import_pack_module("nodes.routes")
fb = import_pack_module("hero_engine.feedback")
sess_mod = import_pack_module("hero_engine.session")
Marks, MarksError = fb.Marks, fb.MarksError

N = 4
IMAGES = [{"filename": f"ComfyUI_temp_x_{i:05}_.png", "subfolder": "", "type": "temp"} for i in range(N)]


def make_session(tmp_path, sid="s1", n=N, budget=40):
    config = sess_mod.HeroConfig(batch_size=n, budget=budget)
    s = sess_mod.Session.create(tmp_path / sid, config)
    sess_mod.atomic_write_json(s.round_dir(0) / "meta.json", {"size": n})
    return s


@pytest.fixture
def reg():
    return marks_mod.MarksRegistry()


@pytest.fixture
def session(tmp_path):
    return make_session(tmp_path)


def test_pending_json_shape(reg, session):
    req = reg.open_request(session, 0, N, IMAGES, node_id="7", current_best=None)
    (p,) = reg.pending()
    assert p["token"] == req.token and len(req.token) >= 20
    assert p["session"] == "s1" and p["round"] == 0 and p["node"] == "7" and p["n"] == N
    assert p["images"] == IMAGES and p["current_best"] is None and p["has_current_best"] is False
    assert p["labels_used"] == 0 and p["budget"] == 40
    json.dumps(p)


def test_answer_saves_before_200_and_wakes_waiter(reg, session):
    req = reg.open_request(session, 0, N, IMAGES, node_id="7")
    got = {}
    t = threading.Thread(target=lambda: got.setdefault("m", reg.wait(req.token, 10)))
    t.start()
    status, body = reg.answer(req.token, {"token": req.token, "good": [0, 2], "bad": [1, 3], "best": 2})
    assert status == 200 and body["saved"] == N
    # on disk at the moment the answer is given
    assert session.marks_for(0) == Marks([0, 2], [1, 3], 2)
    assert sess_mod.Session.open(session.path).marks_for(0) == Marks([0, 2], [1, 3], 2)
    t.join(5)
    assert got["m"] == Marks([0, 2], [1, 3], 2)
    assert reg.pending() == []
    status, body = reg.answer(req.token, {"good": [0, 2], "bad": [1, 3], "best": 2})
    assert status == 409 and "already answered" in body["error"]


@pytest.mark.parametrize("payload, needle", [
    ({"good": [0, 1], "bad": [2], "best": 0}, "not marked"),
    ({"good": [0, 1], "bad": [2, 3], "best": None}, "first round must pick a best"),
    ({"good": [0, 1], "bad": [2, 3], "best": 3}, "not marked good"),
    ({"good": [0, 1, 2, 3], "bad": [], "best": 0}, "no image is marked bad"),
    ({"good": [0, 9], "bad": [1, 2, 3], "best": 0}, "out of range"),
    ({"good": "0 1", "bad": [2, 3], "best": 0}, "must be a list"),
    ({"good": [0, True], "bad": [2, 3], "best": 0}, "must be a list"),
    ({"good": [0, 1], "bad": [2, 3], "best": "0"}, "'best' must be an integer"),
    ({"good": [0, 1], "bad": [1, 2, 3], "best": 0}, "both good and bad"),
    ({"good": list(range(5000)), "bad": [], "best": 0}, "at most"),
])
def test_bad_payloads_400(reg, session, payload, needle):
    req = reg.open_request(session, 0, N, IMAGES)
    status, body = reg.answer(req.token, payload)
    assert status == 400, body
    assert needle in body["error"]
    assert session.marks_for(0) is None
    # still answerable after a rejected submission
    status, _ = reg.answer(req.token, {"good": [0], "bad": [1, 2, 3], "best": 0})
    assert status == 200


def test_unknown_token_404_and_non_dict(reg, session):
    assert reg.answer("nope", {"good": [], "bad": []})[0] == 404
    assert reg.answer(None, {"good": [], "bad": []})[0] == 400
    assert reg.answer("x", ["good"])[0] == 400


def test_exactly_once_under_concurrency(reg, session):
    req = reg.open_request(session, 0, N, IMAGES)
    calls = []
    orig = session.record_marks

    def slow_record(k, m):
        calls.append(k)
        time.sleep(0.05)
        return orig(k, m)
    session.record_marks = slow_record
    results = []
    barrier = threading.Barrier(12)

    def submit(i):
        barrier.wait()
        best = i % 2  # two different answers racing
        results.append(reg.answer(req.token, {"good": [0, 1], "bad": [2, 3], "best": best}))
    ts = [threading.Thread(target=submit, args=(i,)) for i in range(12)]
    [t.start() for t in ts]
    [t.join(10) for t in ts]
    codes = sorted(s for s, _ in results)
    assert codes == [200] + [409] * 11
    assert len(calls) == 1
    assert reg.wait(req.token, 1) == session.marks_for(0)


def test_wait_timeout_then_late_answer_409(reg, session):
    req = reg.open_request(session, 0, N, IMAGES)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="no marks received in 0.5 s.*re-queue to continue"):
        reg.wait(req.token, 0.5, poll_s=0.05)
    assert 0.4 < time.monotonic() - t0 < 3
    assert reg.pending() == []
    status, body = reg.answer(req.token, {"good": [0], "bad": [1, 2, 3], "best": 0})
    assert status == 409 and "stale" in body["error"]
    assert session.marks_for(0) is None


def test_wait_interrupt_raises_given_exception(reg, session):
    class Interrupted(Exception):
        pass
    flag = threading.Event()
    req = reg.open_request(session, 0, N, IMAGES)
    threading.Timer(0.3, flag.set).start()
    with pytest.raises(Interrupted):
        reg.wait(req.token, 30, is_interrupted=flag.is_set, interrupt_exc=Interrupted, poll_s=0.05)
    assert reg.get(req.token).state == "cancelled"
    assert reg.answer(req.token, {"good": [0], "bad": [1, 2, 3], "best": 0})[0] == 409


def test_existing_marks_on_disk_answer_immediately(reg, session):
    session.record_marks(0, Marks([1], [0, 2, 3], 1))
    req = reg.open_request(session, 0, N, IMAGES)
    assert req.state == "answered" and reg.pending() == []
    assert reg.wait(req.token, 0.1) == Marks([1], [0, 2, 3], 1)
    assert reg.answer(req.token, {"good": [0], "bad": [1, 2, 3], "best": 0})[0] == 409


def test_marks_saved_elsewhere_meanwhile_kept_409(reg, session):
    req = reg.open_request(session, 0, N, IMAGES)
    session.record_marks(0, Marks([3], [0, 1, 2], 3))  # e.g. the text fallback
    status, body = reg.answer(req.token, {"good": [0], "bad": [1, 2, 3], "best": 0})
    assert status == 409 and "kept" in body["error"]
    assert reg.wait(req.token, 0.1) == Marks([3], [0, 1, 2], 3)


def test_new_request_supersedes_same_round(reg, session):
    events = []
    reg.listeners.append(lambda e, d: events.append((e, d)))
    a = reg.open_request(session, 0, N, IMAGES)
    b = reg.open_request(session, 0, N, IMAGES)
    assert [p["token"] for p in reg.pending()] == [b.token]
    assert reg.answer(a.token, {"good": [0], "bad": [1, 2, 3], "best": 0})[0] == 409
    with pytest.raises(marks_mod.RequestCancelled):
        reg.wait(a.token, 0.1)
    assert reg.answer(b.token, {"good": [0], "bad": [1, 2, 3], "best": 0})[0] == 200
    assert ("hero.cancelled", {"token": a.token, "reason": "superseded"}) in events
    assert any(e == "hero.answered" and d["token"] == b.token for e, d in events)


def test_stale_session_round_409(reg, tmp_path):
    s = make_session(tmp_path, "s2")
    req = reg.open_request(s, 5, N, IMAGES)  # not the session's round in progress
    status, body = reg.answer(req.token, {"good": [0], "bad": [1, 2, 3], "best": 0})
    assert status == 409 and "stale" in body["error"]


def test_keep_best_allowed_when_session_has_best(reg, session):
    req = reg.open_request(session, 0, N, IMAGES, current_best={"filename": "b.png", "subfolder": "",
                                                               "type": "output"})
    assert req.has_current_best
    status, body = reg.answer(req.token, {"good": [0], "bad": [1, 2, 3], "best": None})
    # the engine session itself knows it has no best yet -> its rule wins, nothing saved
    assert status == 400 and "best" in body["error"]
    assert session.marks_for(0) is None


# ---- HTTP -------------------------------------------------------------------------------------

def _run_app(reg, coro_fn, root=None, views=None):
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    async def main():
        routes = web.RouteTableDef()
        routes_mod.add_routes(routes, reg, (lambda: root) if root else None,
                              (views or routes_mod.SessionViews()) if root else None)
        app = web.Application()
        app.add_routes(routes)
        async with TestClient(TestServer(app)) as client:
            return await coro_fn(client)
    return asyncio.run(main())


def test_http_routes(reg, session):
    req = reg.open_request(session, 0, N, IMAGES, node_id="3")

    async def go(c):
        r = await c.get("/hero/pending")
        assert r.status == 200
        pend = (await r.json())["pending"]
        assert [p["token"] for p in pend] == [req.token]
        r = await c.post("/hero/marks", data=b"x" * (70 * 1024),
                         headers={"Content-Type": "application/json"})
        assert r.status == 413
        r = await c.post("/hero/marks", data=b"good=1", headers={"Content-Type": "text/plain"})
        assert r.status == 415
        r = await c.post("/hero/marks", data=b"{nope", headers={"Content-Type": "application/json"})
        assert r.status == 400 and "not valid JSON" in (await r.json())["error"]
        r = await c.post("/hero/marks", json=[1, 2])
        assert r.status == 400
        r = await c.post("/hero/marks", json={"token": "zzz", "good": [0], "bad": [1, 2, 3], "best": 0})
        assert r.status == 404
        r = await c.post("/hero/marks", json={"token": req.token, "good": [0, 1, 2, 3], "bad": [],
                                               "best": 0})
        assert r.status == 400 and "bad" in (await r.json())["error"]
        r = await c.post("/hero/marks", json={"token": req.token, "good": [0, 2], "bad": [1, 3],
                                               "best": 0})
        assert r.status == 200 and (await r.json())["saved"] == N
        assert session.marks_for(0) == Marks([0, 2], [1, 3], 0)
        r = await c.post("/hero/marks", json={"token": req.token, "good": [0, 2], "bad": [1, 3],
                                               "best": 0})
        assert r.status == 409
        r = await c.get("/hero/pending")
        assert (await r.json())["pending"] == []
    _run_app(reg, go)


def test_http_session_panel_routes(reg, tmp_path, monkeypatch):
    from PIL import Image
    s = make_session(tmp_path, "panel_1")
    views = routes_mod.SessionViews()
    # a build without the pack's exporter (nodes/nodes.py cannot be imported)
    monkeypatch.setitem(sys.modules, routes_mod.__package__ + ".nodes", None)
    (tmp_path / "not a session").mkdir()

    async def go(c):
        r = await c.get("/hero/sessions")
        assert r.status == 200
        (d,) = (await r.json())["sessions"]
        assert d["session_id"] == "panel_1" and d["round"] == 0 and d["budget"] == 40
        assert d["good_rate"] == [] and d["best_url"] is None
        r = await c.get("/hero/session/panel_1")
        assert r.status == 200 and (await r.json())["labels_used"] == 0
        assert (await c.get("/hero/session/nope")).status == 404
        assert (await c.get("/hero/session/a.b")).status == 400
        assert (await c.get("/hero/session/" + "x" * 65)).status == 400
        assert (await c.get("/hero/session/panel_1/best.png")).status == 404
        # a best image inside the session is served
        s._meta["best"] = {"round": 0, "index": 1, "score": None}
        p = s.image_path(0, 1)
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (255, 0, 0)).save(p)
        sess_mod.atomic_write_json(s.path / "session.json", s._meta)
        r = await c.get("/hero/session/panel_1/best.png")
        assert r.status == 200 and (await r.read())[:4] == b"\x89PNG"
        r = await c.get("/hero/sessions")
        assert (await r.json())["sessions"][0]["best_url"] == "/hero/session/panel_1/best.png"
        r = await c.post("/hero/export", json={"session": "../etc"})
        assert r.status == 400
        r = await c.post("/hero/export", json={"session": "missing"})
        assert r.status == 404
        r = await c.post("/hero/export", json={"session": "panel_1"})
        assert r.status == 501 and "HERO Export LoRA" in (await r.json())["error"]
        views.exporter = lambda sess, body: {"filename": f"hero/{sess.session_id}.safetensors"}
        r = await c.post("/hero/export", json={"session": "panel_1"})
        assert r.status == 200 and (await r.json())["filename"] == "hero/panel_1.safetensors"
    _run_app(reg, go, root=tmp_path, views=views)
