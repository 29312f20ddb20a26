"""The HTTP API under split packets and hostile bodies (issue 12; docs/marks_api.md "Limits").

* bodies that arrive in 2-8 TCP writes (plain and chunked) on a real socket are answered exactly
  as the same body sent in one write; chunked bodies over 64 KiB get 413;
* a seeded fuzz sends >= 10,000 hostile requests to every route (marks, export with the real
  exporter, session summary, best.png, list, pending) and asserts: no status >= 500, no file
  created outside the allowed places, and the pending request still answered afterwards.
"""
from __future__ import annotations

import asyncio
import json
import random
import string
import time
from pathlib import Path

import pytest
import torch

from support.pack_import import import_pack_module

marks_mod = import_pack_module("nodes.marks")
routes_mod = import_pack_module("nodes.routes")
S = import_pack_module("hero_engine.session")

N = 4
IMAGES = [{"filename": f"ComfyUI_temp_x_{i:05}_.png", "subfolder": "", "type": "temp"}
          for i in range(N)]


def make_session(root: Path, sid: str, trained: bool = False):
    s = S.Session.create(root / sid, S.HeroConfig(batch_size=N, budget=4000))
    if trained:  # a completed round with a LoRA in the host layout, so exports really write
        names = ["input_blocks.1.1.transformer_blocks.0.attn1.to_q",
                 "input_blocks.1.1.transformer_blocks.0.attn1.to_k"]
        g = torch.Generator().manual_seed(0)
        lora = {}
        for n in names:
            lora[f"{n}.down"] = torch.randn(4, 8, generator=g)
            lora[f"{n}.up"] = torch.randn(8, 4, generator=g)
            lora[f"{n}.alpha"] = torch.tensor(4.0, dtype=torch.float64)
        s.update_info(lora_layout={
            "family": "sd15", "rank": 4, "alpha": 4.0, "model": "SD15",
            "kohya": {n: "lora_unet_" + n.replace(".", "_") for n in names}})
        S.atomic_write_json(s.round_dir(0) / "meta.json", {"size": N})
        s.complete_round(0, {"lora": lora}, {"round": 0, "labels": N}, S.BestRecord(0, 0), N)
    S.atomic_write_json(s.round_dir(s.round) / "meta.json", {"size": N})
    return s


# ---- a real socket -------------------------------------------------------------------------------

async def _serve(reg, root=None):
    from aiohttp import web
    routes = web.RouteTableDef()
    routes_mod.add_routes(routes, reg, (lambda: root) if root else None,
                          routes_mod.SessionViews() if root else None)
    app = web.Application()
    app.add_routes(routes)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, port


async def _raw(port: int, parts: list[bytes], gap: float = 0.015) -> tuple[int, dict]:
    """Send ``parts`` as separate TCP writes (Nagle off, a pause between them); read the answer."""
    import socket
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for p in parts:
        writer.write(p)
        await writer.drain()
        await asyncio.sleep(gap)
    data = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"chunked" in head.lower():
        out, rest = b"", body
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size, 16)
            if n == 0:
                break
            out, rest = out + rest[:n], rest[n + 2:]
        body = out
    return status, json.loads(body) if body.strip() else {}


def _request(body: bytes, chunked: bool = False, path: str = "/hero/marks") -> bytes:
    h = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
         f"Connection: close\r\n")
    if chunked:
        return (h + "Transfer-Encoding: chunked\r\n\r\n").encode()
    return (h + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def _splits(data: bytes, k: int, rng: random.Random) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(data)), k - 1))
    return [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]


def _chunked_parts(body: bytes, k: int, rng: random.Random) -> list[bytes]:
    pieces = _splits(body, k, rng) if len(body) >= k else [body]
    return [_request(b"", chunked=True)] + [f"{len(p):x}\r\n".encode() + p + b"\r\n"
                                           for p in pieces] + [b"0\r\n\r\n"]


def test_bodies_split_across_tcp_writes(tmp_path):
    rng = random.Random(12)

    async def main():
        results = []
        for case in range(3 * 7 * 2):
            k = 2 + case % 7                   # 2..8 writes
            chunked = bool(case // 7 % 2)
            size_kind = case // 14              # 0: a 79-byte answer, 1: 60 KB of it, 2: a 400
            reg = marks_mod.MarksRegistry()
            s = make_session(tmp_path, f"c{case}")
            req = reg.open_request(s, 0, N, IMAGES)
            good = {"token": req.token, "good": [0, 2], "bad": [1, 3], "best": 0}
            body = json.dumps(good, separators=(",", ":")).encode()
            if size_kind == 1:
                body = body[:-1] + b" " * (60_000 - len(body)) + b"}"
            if size_kind == 2:
                body = json.dumps({**good, "bad": [1]}).encode()  # image 3 unmarked: a 400
            runner, port = await _serve(reg)
            try:
                whole_reg = marks_mod.MarksRegistry()   # the same body, one write, for reference
                ws = make_session(tmp_path, f"w{case}")
                wreq = whole_reg.open_request(ws, 0, N, IMAGES)
                wrunner, wport = await _serve(whole_reg)
                try:
                    wbody = body.replace(req.token.encode(), wreq.token.encode())
                    ref = await _raw(wport, [_request(wbody)])
                finally:
                    await wrunner.cleanup()
                data = _request(body)
                parts = (_chunked_parts(body, k, rng) if chunked else _splits(data, k, rng))
                got = await _raw(port, parts)
            finally:
                await runner.cleanup()
            ref_body = {kk: v for kk, v in ref[1].items() if kk not in ("token", "session")}
            got_body = {kk: v for kk, v in got[1].items() if kk not in ("token", "session")}
            results.append((k, chunked, len(body), got[0], ref[0]))
            assert (got[0], got_body) == (ref[0], ref_body), (k, chunked, len(body), got, ref)
            if ref[0] == 200:
                assert s.marks_for(0) is not None and s.marks_for(0).good == (0, 2)
            else:
                assert got[0] == 400 and "not marked" in got[1]["error"]
                assert s.marks_for(0) is None
        return results

    res = asyncio.run(main())
    assert len(res) == 42 and sum(1 for r in res if r[3] == 200) == 28
    print(f"\nsplit bodies: {len(res)} cases (2-8 writes, plain and chunked, 79 B to 60 KB), "
          f"all answered as if sent whole")


def test_chunked_and_declared_oversize_bodies_413(tmp_path):
    rng = random.Random(3)

    async def main():
        reg = marks_mod.MarksRegistry()
        s = make_session(tmp_path, "big")
        req = reg.open_request(s, 0, N, IMAGES)
        runner, port = await _serve(reg)
        try:
            out = []
            for size in (70_000, 300_000):
                body = b'{"token": "' + req.token.encode() + b'", "pad": "' + b"x" * size + b'"}'
                out.append(await _raw(port, _chunked_parts(body, 6, rng), gap=0.005))
                out.append(await _raw(port, [_request(body)], gap=0))
            # the request still waits and takes a valid answer
            ok = json.dumps({"token": req.token, "good": [0], "bad": [1, 2, 3], "best": 0}).encode()
            out.append(await _raw(port, _splits(_request(ok), 3, rng)))
            return out
        finally:
            await runner.cleanup()

    out = asyncio.run(main())
    assert [o[0] for o in out] == [413, 413, 413, 413, 200], out
    assert all("64" in o[1]["error"] or "65536" in o[1]["error"] for o in out[:4])


# ---- the fuzz ----------------------------------------------------------------------------------

def _dumps(obj) -> bytes:
    """json.dumps, with "<BIGINT:n>" strings written as n-digit integer literals (Python itself
    cannot even make such ints past its 4300-digit conversion limit)."""
    import re
    text = json.dumps(obj)
    return re.sub(r'"<BIGINT:(\d+)>"', lambda m: "9" * int(m.group(1)), text).encode()


def _snapshot(root: Path) -> set:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


class Hostile:
    """Seeded generator of hostile request bodies and paths."""

    def __init__(self, seed: int, token: str, sid: str):
        self.r = random.Random(seed)
        self.token, self.sid = token, sid

    def junk_value(self, depth=0):
        r = self.r
        c = r.randrange(14)
        if c == 0:
            return f"<BIGINT:{r.choice([21, 400, 4301, 5000, 20000])}>"
        if c == 1:
            return r.choice([True, False, None, 0, -1, 2 ** 63, -2 ** 64, 1.5, -0.0, 1e308])
        if c == 2:
            return "".join(r.choice(string.printable) for _ in range(r.randrange(0, 40)))
        if c == 3:
            return r.choice(["../../etc/passwd", "..", "a/b", "\x00", "CON", "-rf", "true",
                             "\u202e\u0000x", "NUL", "x" * 5000, "", " ", "%2e%2e", "C:\\x"])
        if c == 4 and depth < 3:
            return [self.junk_value(depth + 1) for _ in range(r.randrange(0, 6))]
        if c == 5 and depth < 3:
            return {self.junk_key(): self.junk_value(depth + 1) for _ in range(r.randrange(0, 5))}
        if c == 6:
            return list(range(r.choice([1025, 2049, 5000])))
        if c == 7:
            return [r.randrange(-5, 10) for _ in range(r.randrange(0, 8))]
        if c == 8:
            return r.choice([[0, 0], [-1], [3.0], [True], ["0"], [None], [[0]], [1e400]])
        return r.randrange(-3, 8)

    def junk_key(self):
        return self.r.choice(["token", "good", "bad", "best", "session", "filename_prefix",
                              "prefix", "dtype", "", "x" * 5000, "__proto__", "\x00"])

    def nested(self) -> bytes:
        d = self.r.choice([9, 50, 999, 1000, 5000, 20000])
        o, c = self.r.choice([("[", "]"), ('{"a":', "}")])
        return (o * d + "1" + c * d).encode()

    def marks_body(self) -> bytes:
        r = self.r
        c = r.randrange(10)
        if c == 0:
            return self.nested()
        if c == 1:  # the real token, with marks that always break a rule or a bound
            bad = r.choice([{"good": [0, 1, 2, 3], "bad": [], "best": 0},
                            {"good": [0, 99], "bad": [1, 2, 3], "best": 0},
                            {"good": [0, 1], "bad": [2], "best": 0},
                            {"good": [0], "bad": [1, 2, 3], "best": "<BIGINT:5000>"},
                            {"good": [0], "bad": [1, 2, 3], "best": "0"},
                            {"good": [[0]], "bad": [1, 2, 3], "best": 0},
                            {"good": [0], "bad": [1, 2, 3, 3], "best": 0},
                            {"good": [0], "bad": [1, 2, 3], "best": 2}])
            return _dumps({"token": self.token, **bad})
        if c == 2:  # raw bytes, broken JSON, non-UTF-8, NaN, a BOM
            return r.choice([bytes(r.randrange(256) for _ in range(r.randrange(0, 300))),
                             b'{"token": "' + self.token.encode() + b'", "good": [0,',
                             b'{"good": NaN}', b'{"best": Infinity}', b"\xef\xbb\xbf{}",
                             b"\xff\xfe{", b"", b"null", b"[]", b'"x"', b"1" * 5000,
                             b'{"a": 1' + b"0" * 4400 + b"}", b'{"token": "\xc3\x28"}'])
        if c == 3:
            return ('{"token": "%s", "good": [%s], "bad": [1,2,3], "best": 0}'
                    % (self.token, "0" * r.choice([21, 4301, 9000]) + "1")).encode()
        body = {self.junk_key(): self.junk_value() for _ in range(r.randrange(0, 6))}
        if r.random() < 0.5:
            body["token"] = r.choice([self.token + "x", "", "a" * 200, 5, None, [self.token]])
        return _dumps(body)

    def export_body(self) -> bytes:
        r = self.r
        c = r.randrange(6)
        if c == 0:
            return self.nested()
        if c == 1:
            return self.marks_body()
        body = {"session": r.choice([self.sid, self.sid, "nope", "../x", "", 7, None, [self.sid],
                                     "a" * 65, "x/../y"])}
        if r.random() < 0.7:
            body["filename_prefix"] = r.choice(
                ["true", "-rf", "CON", "con", "NUL", "lpt1", "../up", "a/b", "", " ", "x" * 65,
                 True, 5, None, ["a"], {"a": 1}, "ok_name", "null", ".hidden", "a b", "\u00e9",
                 int("1" * 30), "COM3", "nan"])
        if r.random() < 0.5:
            body["dtype"] = r.choice(["bf16", "fp8", "", "FP32", 16, None, True, ["fp16"],
                                      "fp16", "float"])
        if r.random() < 0.2:
            body[self.junk_key()] = self.junk_value()
        return _dumps(body)

    def sid_path(self) -> str:
        from urllib.parse import quote
        r = self.r
        sid = r.choice([self.sid, "nope", "..", "%2e%2e", "a.b", "x" * 65, "x" * 5000, " ",
                        "\x00", "CON", "../../etc", "s%00", "\u00e9", "-", "_" * 64,
                        "".join(r.choice(string.printable) for _ in range(r.randrange(1, 30)))])
        return quote(sid, safe="%") if r.random() < 0.8 else quote(sid, safe="")


def test_hostile_requests_never_5xx(tmp_path, pack, dirs):
    """>= 10,000 hostile requests against every route of an in-process aiohttp app, with the real
    exporter (nodes.nodes._panel_export -> nodes.host.export_lora into ComfyUI's loras folder)."""
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer
    root = dirs["output"] / "hero"
    root.mkdir()
    routes_hp = import_pack_module("nodes.routes")
    reg = marks_mod.MarksRegistry()
    s = make_session(root, "fz", trained=True)
    req = reg.open_request(s, s.round, N, IMAGES)
    before = _snapshot(tmp_path)
    n_target = 10_000
    statuses: dict[int, int] = {}
    fails = []

    async def main():
        routes = web.RouteTableDef()
        routes_hp.add_routes(routes, reg, lambda: root,
                             routes_hp.SessionViews(exporter=pack.nodes._panel_export))
        app = web.Application()
        app.add_routes(routes)
        h = Hostile(2026, req.token, "fz")
        async with TestClient(TestServer(app)) as c:
            async def one(i):
                r = h.r.random()
                ctype = {"Content-Type": h.r.choice(["application/json"] * 9 + ["text/plain"])}
                try:
                    if r < 0.40:
                        resp = await c.post("/hero/marks", data=h.marks_body(), headers=ctype)
                    elif r < 0.70:
                        resp = await c.post("/hero/export", data=h.export_body(), headers=ctype)
                    elif r < 0.82:
                        resp = await c.get("/hero/session/" + h.sid_path())
                    elif r < 0.92:
                        resp = await c.get("/hero/session/" + h.sid_path() + "/best.png")
                    elif r < 0.96:
                        resp = await c.post("/hero/marks", data=_gen(h.marks_body()),
                                            headers=ctype)  # chunked
                    elif r < 0.98:
                        resp = await c.get("/hero/sessions")
                    else:
                        resp = await c.get("/hero/pending")
                    await resp.read()
                except Exception as e:  # noqa: BLE001 - the client must always get an answer
                    fails.append(f"{i}: {type(e).__name__}: {e}")
                    return
                statuses[resp.status] = statuses.get(resp.status, 0) + 1
                if resp.status >= 500:
                    fails.append(f"{i}: {resp.status} {(await resp.text())[:300]}")

            t0 = time.monotonic()
            for start in range(0, n_target, 16):
                await asyncio.gather(*(one(i) for i in range(start, min(n_target, start + 16))))
            dt = time.monotonic() - t0
            # the server is healthy: the pending request is still answerable, once
            ok = {"token": req.token, "good": [0, 1], "bad": [2, 3], "best": 0}
            r1 = await c.post("/hero/marks", json=ok)
            r2 = await c.post("/hero/marks", json=ok)
            summary = await (await c.get("/hero/session/fz")).json()
            return dt, r1.status, r2.status, summary

    dt, s1, s2, summary = asyncio.run(main())
    total = sum(statuses.values())
    print(f"\nhostile requests: {total} in {dt:.1f} s, statuses {dict(sorted(statuses.items()))}, "
          f"{sum(v for k, v in statuses.items() if k >= 500)} with status >= 500")
    assert fails == [], fails[:5]
    assert total >= n_target
    assert not [k for k in statuses if k >= 500]
    assert statuses.get(200, 0) > 10 and statuses.get(400, 0) > 3000
    assert (s1, s2) == (200, 409)
    assert s.marks_for(s.round) is not None and s.marks_for(s.round).best == 0
    assert summary["round"] == 1 and summary["last_export"]["file"].startswith("hero/")
    # no file anywhere but the allowed ones: the exports and the marks of the answer
    new = _snapshot(tmp_path) - before
    allowed = {"output/hero/fz/rounds/0001/marks.json", "output/hero/fz/.commit.lock"}
    stray = sorted(f for f in new if f not in allowed
                   and not (f.startswith("loras/hero/")
                            and f.endswith(("_r0001.safetensors", "_r0001.json"))))  # + A1111 card
    assert stray == [], stray
    exported = sorted(f for f in new if f.startswith("loras/hero/"))
    assert exported and all(Path(f).name.split("_r0001")[0] in ("ok_name", "fz") for f in exported)
    assert dt < 180, f"{total} requests took {dt:.0f} s"


async def _gen(data: bytes):
    for i in range(0, len(data), 7):
        yield data[i:i + 7]
