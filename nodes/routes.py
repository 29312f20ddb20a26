"""HTTP side of the HERO marks API (docs/marks_api.md), registered on ComfyUI's PromptServer.

Importing this module inside ComfyUI adds the routes (ComfyUI mirrors them under ``/api``) and
forwards registry events (``hero.answered``, ``hero.cancelled``) to the websocket. The handlers are
built by :func:`add_routes` so tests can mount them on a plain aiohttp app.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
from pathlib import Path
from typing import Callable, Optional

from aiohttp import web

from . import marks as _marks

log = logging.getLogger("HERO")

MAX_BODY = 64 * 1024      # bytes of a request body (chunked or not)
MAX_DEPTH = 8             # nesting of arrays/objects (a marks body needs 2)
MAX_ITEMS = 2048          # entries of one array or object (a round has at most 1024 images)
MAX_INT_DIGITS = 20       # digits of an integer literal (image indices need 4)
MAX_STRING = 4096         # characters of one string (tokens are 24, names 64)
SESSION_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _json(status: int, body) -> web.Response:
    return web.json_response(body, status=status, headers={"Cache-Control": "no-store"})


class BodyError(ValueError):
    """A request body out of bounds; ``status`` 400 or 413, the message names the limit."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _parse_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:  # never reaches int(): Python's 4300-digit limit raises there
        raise BodyError(f"an integer in the body has {digits} digits; the limit is "
                        f"{MAX_INT_DIGITS} digits")
    return int(text)


def _parse_constant(name: str):
    raise BodyError(f"{name} is not valid JSON; send finite numbers")


def check_shape(obj) -> None:
    """Bounds of a parsed body (iterative: no recursion on hostile input)."""
    stack = [(obj, 1)]
    while stack:
        o, depth = stack.pop()
        if isinstance(o, (list, dict)):
            if depth > MAX_DEPTH:
                raise BodyError(f"the body nests arrays/objects more than {MAX_DEPTH} deep; "
                                f"the limit is {MAX_DEPTH}")
            if len(o) > MAX_ITEMS:
                raise BodyError(f"an array or object in the body has {len(o)} entries; the "
                                f"limit is {MAX_ITEMS}")
            items = o.values() if isinstance(o, dict) else o
            if isinstance(o, dict):
                for k in o:
                    if len(k) > MAX_STRING:
                        raise BodyError(f"a key in the body has {len(k)} characters; the limit "
                                        f"is {MAX_STRING}")
            stack.extend((v, depth + 1) for v in items)
        elif isinstance(o, str) and len(o) > MAX_STRING:
            raise BodyError(f"a string in the body has {len(o)} characters; the limit is "
                            f"{MAX_STRING}")


def parse_body(raw: bytes):
    """Bytes -> JSON value within the bounds above, else :class:`BodyError`."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BodyError(f"the body is not valid JSON: not UTF-8 ({e})") from None
    try:
        obj = json.loads(text, parse_int=_parse_int, parse_constant=_parse_constant)
    except BodyError:
        raise
    except RecursionError:
        raise BodyError(f"the body nests arrays/objects more than {MAX_DEPTH} deep; the limit "
                        f"is {MAX_DEPTH}") from None
    except ValueError as e:  # JSONDecodeError, and any conversion the decoder refuses
        raise BodyError(f"the body is not valid JSON: {e}") from None
    check_shape(obj)
    return obj


async def read_body(request: web.Request, limit: int = MAX_BODY) -> bytes:
    """The whole body (every TCP segment, chunked or not) up to ``limit`` bytes, else
    :class:`BodyError` 413. ``request.content.read(n)`` alone returns only what has arrived."""
    if request.content_length is not None and request.content_length > limit:
        raise BodyError(f"body too large ({request.content_length} bytes; the limit is {limit})",
                        413)
    chunks, size = [], 0
    while True:
        try:
            chunk = await request.content.read(limit + 1 - size)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a client that broke off mid-body
            raise BodyError(f"the body could not be read ({type(e).__name__}: {e})") from None
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise BodyError(f"body too large (more than {limit} bytes; the limit is {limit})",
                            413)
        chunks.append(chunk)


async def _read_json(request: web.Request, limit: int = MAX_BODY):
    """(payload, None) or (None, error response): the whole body, bounded in size (413) and in
    what it holds (400 naming the limit: depth, entries, integer digits, string length)."""
    ctype = request.headers.get("Content-Type", "application/json")
    if "json" not in ctype.lower():
        return None, _json(415, {"error": "send JSON (Content-Type: application/json)"})
    try:
        return parse_body(await read_body(request, limit)), None
    except BodyError as e:
        return None, _json(e.status, {"error": str(e)})


def _is_session_error(e: BaseException) -> bool:
    """hero_engine's SessionError (damaged or stale session), by name: no engine import here."""
    return any(c.__name__ == "SessionError" for c in type(e).__mro__)


def add_routes(routes: web.RouteTableDef, registry: Optional[_marks.MarksRegistry] = None,
               sessions_root: Optional[Callable[[], Path]] = None,
               session_api=None) -> None:
    """Add the HERO routes to ``routes``.

    ``sessions_root()`` -> the directory holding session folders (ComfyUI: ``output/hero``);
    ``session_api`` -> an object with ``list_sessions(root)``, ``summary(root, sid)``,
    ``best_image(root, sid) -> Path|None`` and ``export(root, sid, body) -> dict`` (the defaults
    come from :class:`SessionViews`, which uses ``hero_engine`` only)."""
    reg = registry or _marks.REGISTRY

    @routes.get("/hero/pending")
    async def hero_pending(request: web.Request):
        return _json(200, {"pending": reg.pending()})

    @routes.post("/hero/marks")
    async def hero_marks(request: web.Request):
        payload, err = await _read_json(request)
        if err is not None:
            return err
        if not isinstance(payload, dict):
            return _json(400, {"error": "the body must be a JSON object {token, good, bad, best}"})
        loop = asyncio.get_running_loop()
        # validation is instant; the save is a small fsync'd file: keep it off the event loop
        status, body = await loop.run_in_executor(None, reg.answer, payload.get("token"), payload)
        return _json(status, body)

    if sessions_root is None or session_api is None:
        return

    def _sid(request) -> Optional[str]:
        sid = request.match_info.get("sid", "")
        return sid if SESSION_ID_RE.match(sid) else None

    @routes.get("/hero/sessions")
    async def hero_sessions(request: web.Request):
        loop = asyncio.get_running_loop()
        try:
            items = await loop.run_in_executor(None, session_api.list_sessions, sessions_root())
        except Exception as e:  # noqa: BLE001
            log.exception("HERO: listing sessions failed")
            return _json(500, {"error": f"listing sessions failed: {e}"})
        return _json(200, {"sessions": items})

    @routes.get("/hero/session/{sid}")
    async def hero_session(request: web.Request):
        sid = _sid(request)
        if sid is None:
            return _json(400, {"error": "session ids are 1-64 characters of A-Z a-z 0-9 _ -"})
        loop = asyncio.get_running_loop()
        try:
            s = await loop.run_in_executor(None, session_api.summary, sessions_root(), sid)
        except Exception as e:  # noqa: BLE001
            if _is_session_error(e):  # damaged: the message names the file and the repair
                return _json(409, {"error": str(e), "damaged": True})
            log.exception("HERO: session summary failed")
            return _json(500, {"error": f"reading session '{sid}' failed: {e}"})
        if s is None:
            return _json(404, {"error": f"no session '{sid}'"})
        return _json(200, s)

    @routes.get("/hero/session/{sid}/best.png")
    async def hero_session_best(request: web.Request):
        sid = _sid(request)
        if sid is None:
            return _json(400, {"error": "session ids are 1-64 characters of A-Z a-z 0-9 _ -"})
        loop = asyncio.get_running_loop()
        try:
            p = await loop.run_in_executor(None, session_api.best_image, sessions_root(), sid)
        except Exception as e:  # noqa: BLE001
            if _is_session_error(e):
                return _json(409, {"error": str(e), "damaged": True})
            log.exception("HERO: best image failed")
            return _json(500, {"error": f"reading session '{sid}' failed: {e}"})
        if p is None:
            return _json(404, {"error": f"session '{sid}' has no best image yet"})
        return web.FileResponse(p, headers={"Cache-Control": "no-cache"})

    @routes.post("/hero/export")
    async def hero_export(request: web.Request):
        payload, err = await _read_json(request, 4096)
        if err is not None:
            return err
        if not isinstance(payload, dict):
            return _json(400, {"error": "the body must be a JSON object {session, ...}"})
        sid = payload.get("session")
        if not isinstance(sid, str) or not SESSION_ID_RE.match(sid):
            return _json(400, {"error": "'session' must be a session id (1-64 of A-Z a-z 0-9 _ -)"})
        loop = asyncio.get_running_loop()
        try:
            res = await loop.run_in_executor(None, session_api.export, sessions_root(), sid, payload)
        except FileNotFoundError as e:
            return _json(404, {"error": str(e)})
        except NotImplementedError as e:
            return _json(501, {"error": str(e)})
        except ValueError as e:
            if any(c.__name__ == "NothingToExport" for c in type(e).__mro__):
                return _json(409, {"error": str(e), "nothing": True})  # not yet: not a bad request
            return _json(400, {"error": str(e)})
        except Exception as e:  # noqa: BLE001
            if _is_session_error(e):
                return _json(409, {"error": str(e)})
            log.exception("HERO: export failed")
            return _json(500, {"error": f"export failed: {e}"})
        return _json(200, res)


# ---- session panel views (hero_engine only) ---------------------------------------------------

class SessionViews:
    """Read-only summaries of the sessions under ``root`` for the session panel, and its export.

    ``exporter(session, body: dict) -> dict`` writes the session's LoRA (e.g. into
    ``models/loras``), preferences or noises and returns ``{"path", "filename", ...}``; ``POST
    /hero/export`` calls it. None (the default): the pack's own, ``nodes.nodes._panel_export``,
    imported on the first export (it needs ComfyUI)."""

    def __init__(self, exporter: Optional[Callable] = None):
        self.exporter = exporter

    def _exporter(self) -> Callable:
        if self.exporter is not None:
            return self.exporter
        try:
            from .nodes import _panel_export
        except ImportError:
            raise NotImplementedError("export from the panel is not available in this build; "
                                      "queue the HERO Export LoRA node instead") from None
        return _panel_export

    @staticmethod
    def _engine():
        from ..hero_engine import session as S
        return S

    def _open(self, root: Path, sid: str):
        S = self._engine()
        p = Path(root) / sid
        if not (p / "session.json").is_file():
            return None
        return S.Session.open(p, cleanup=False)  # views never delete; the node's open cleans

    def _view(self, s) -> dict:
        d = s.summary()
        hist = d.get("history") or []
        d["good_rate"] = [h.get("good_rate") for h in hist]
        # "labels": each round's marks (the history's and the front end's old key name)
        d["labels_per_round"] = [h.get("labels") for h in hist]
        bp = s.best_image_path()
        d["best_url"] = (f"/hero/session/{s.session_id}/best.png"
                         if bp is not None and Path(bp).is_file() else None)
        info = d.get("info") or {}
        d["last_export"] = info.get("last_export")
        d["done"] = bool(getattr(s, "done", False))
        try:
            d["mtime"] = (Path(s.path) / "session.json").stat().st_mtime
        except OSError:
            d["mtime"] = None
        return d

    def list_sessions(self, root: Path) -> list:
        root = Path(root)
        out = []
        if not root.is_dir():
            return out
        for p in sorted(root.iterdir()):
            if not (p.is_dir() and SESSION_ID_RE.match(p.name) and (p / "session.json").is_file()):
                continue
            try:
                out.append(self._view(self._open(root, p.name)))
            except Exception as e:  # noqa: BLE001 - one damaged session must not hide the others
                out.append({"session_id": p.name, "error": str(e)})
        out.sort(key=lambda d: -(d.get("mtime") or 0))
        return out

    def summary(self, root: Path, sid: str):
        s = self._open(root, sid)
        return None if s is None else self._view(s)

    def best_image(self, root: Path, sid: str):
        s = self._open(root, sid)
        if s is None:
            return None
        p = s.best_image_path()
        if p is None:
            return None
        p = Path(p).resolve()
        base = Path(s.path).resolve()
        if base not in p.parents or not p.is_file():  # never serve outside the session folder
            return None
        return p

    def export(self, root: Path, sid: str, body: dict) -> dict:
        s = self._open(root, sid)
        if s is None:
            raise FileNotFoundError(f"no session '{sid}'")
        return self._exporter()(s, body)


def _install() -> None:
    """Register on the running ComfyUI server (import side effect inside ComfyUI)."""
    try:
        from server import PromptServer  # ComfyUI
    except ImportError:
        return
    inst = getattr(PromptServer, "instance", None)
    if inst is None:
        return
    import folder_paths  # ComfyUI

    def root() -> Path:
        return Path(folder_paths.get_output_directory()) / "hero"

    add_routes(inst.routes, _marks.REGISTRY, root, SessionViews())

    def forward(event: str, data: dict) -> None:
        inst.send_sync(event, data)

    if not getattr(_marks.REGISTRY, "_hero_ws_forward", False):
        _marks.REGISTRY.listeners.append(forward)
        _marks.REGISTRY._hero_ws_forward = True


_install()
