"""Registry of HERO feedback requests waiting for marks (pure Python, no ComfyUI import).

One request = one round of one session waiting in a ``HERO_Feedback`` node. The node opens a request,
broadcasts it, and blocks in ComfyUI's worker thread in :meth:`MarksRegistry.wait`; the HTTP route
(``POST /hero/marks``) calls :meth:`MarksRegistry.answer`, which validates the marks with the
engine's rules, **writes them to the session on disk**, and only then wakes the node and answers
200. Answers are exactly-once: a token moves ``pending -> saving -> answered`` under a lock, so two
concurrent submissions give one 200 and one 409.

The session is a ``hero_engine.session.Session``; this module uses its ``session_id``,
``record_marks(round_idx, marks)``, ``marks_for(round_idx) -> Marks | None``, ``marks_used`` and
``config.budget``, and tells a stale request by the engine's ``SessionError``.
"""
from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

try:  # inside the pack
    from ..hero_engine.feedback import Marks, MarksError
    from ..hero_engine.session import SessionDamaged, SessionError
except ImportError:  # imported as a top-level module (tests, tools)
    from hero_engine.feedback import Marks, MarksError
    from hero_engine.session import SessionDamaged, SessionError

__all__ = ["PendingRequest", "MarksRegistry", "REGISTRY", "RequestCancelled", "MAX_IMAGES",
           "open_request", "pending", "answer", "wait", "cancel", "get"]

log = logging.getLogger("HERO")

MAX_IMAGES = 1024          # a round never shows more images than this
_KEEP_FINISHED = 512       # finished tokens remembered so late answers get 409, not 404


class RequestCancelled(RuntimeError):
    """The request was cancelled (superseded by a newer request for the same round, or by cancel())."""


def _session_id(session) -> str:
    return str(getattr(session, "session_id", "") or "")


def _marks_used(session) -> Optional[int]:
    v = getattr(session, "marks_used", None)
    try:
        v = v() if callable(v) else v
        return None if v is None else int(v)
    except Exception:  # noqa: BLE001 - a summary value must never break the API
        return None


def _budget(session) -> Optional[int]:
    config = getattr(session, "config", None)
    v = getattr(config, "budget", None) if config is not None else None
    try:
        return None if v is None else int(v)
    except (TypeError, ValueError):
        return None


def _existing_marks(session, round_idx: int) -> Optional[Marks]:
    fn = getattr(session, "marks_for", None)
    if fn is None:
        return None
    try:
        return fn(round_idx)
    except (KeyError, FileNotFoundError, IndexError):
        return None


@dataclass
class PendingRequest:
    token: str
    session: Any
    round: int
    n: int
    images: list
    node_id: str
    current_best: Optional[dict]
    has_current_best: bool
    meta: dict = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    state: str = "pending"            # pending | saving | answered | cancelled
    marks: Optional[Marks] = None
    reason: str = ""                  # why cancelled
    event: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def session_id(self) -> str:
        return _session_id(self.session)

    def to_json(self) -> dict:
        """The public form: the ``hero.request`` event and each entry of ``GET /hero/pending``."""
        d = {
            "token": self.token,
            "session": self.session_id,
            "round": self.round,
            "node": self.node_id,
            "images": [dict(i) for i in self.images],
            "n": self.n,
            "current_best": dict(self.current_best) if self.current_best else None,
            "has_current_best": self.has_current_best,
            "labels_used": _marks_used(self.session),   # old key name: web/js reads it
            "budget": _budget(self.session),
            "created": self.created,
        }
        for k, v in (self.meta or {}).items():
            d.setdefault(k, v)
        return d


class MarksRegistry:
    """Thread-safe: the worker thread opens/waits, the aiohttp loop answers."""

    def __init__(self):
        self._lock = threading.Lock()
        self._requests: dict[str, PendingRequest] = {}
        self._finished: list[str] = []
        self.listeners: list[Callable[[str, dict], None]] = []

    # -- notification (routes.py adds a listener that forwards to the websocket) -----------------
    def _notify(self, event: str, data: dict) -> None:
        for fn in list(self.listeners):
            try:
                fn(event, data)
            except Exception:  # noqa: BLE001
                log.exception("HERO: marks listener failed for %s", event)

    def _finish_locked(self, req: PendingRequest) -> None:
        self._finished.append(req.token)
        while len(self._finished) > _KEEP_FINISHED:
            self._requests.pop(self._finished.pop(0), None)

    # -- API ---------------------------------------------------------------------------------------
    def open_request(self, session, round_idx: int, n: int, images: list, node_id: str = "",
                     current_best: Optional[dict] = None, meta: Optional[dict] = None,
                     has_current_best: Optional[bool] = None) -> PendingRequest:
        """Register a round waiting for marks. A pending request for the same session and round is
        cancelled (its token then answers 409). If the session already has marks for this round on
        disk (e.g. the server restarted after they were saved), the request is born answered."""
        n = int(n)
        if not 1 <= n <= MAX_IMAGES:
            raise ValueError(f"a round must have 1..{MAX_IMAGES} images (got {n})")
        if len(images) != n:
            raise ValueError(f"{len(images)} preview images for a batch of {n}")
        if has_current_best is None:
            has_current_best = current_best is not None
        req = PendingRequest(token=secrets.token_urlsafe(18), session=session, round=int(round_idx),
                             n=n, images=[dict(i) for i in images], node_id=str(node_id),
                             current_best=current_best, has_current_best=bool(has_current_best),
                             meta=dict(meta or {}))
        existing = _existing_marks(session, req.round)
        superseded = []
        with self._lock:
            for other in self._requests.values():
                if (other.state == "pending" and other.round == req.round
                        and other.session_id == req.session_id):
                    other.state, other.reason = "cancelled", "superseded by a newer request for this round"
                    other.event.set()
                    self._finish_locked(other)
                    superseded.append(other.token)
            if existing is not None:
                req.state, req.marks = "answered", existing
                req.event.set()
                self._requests[req.token] = req
                self._finish_locked(req)
            else:
                self._requests[req.token] = req
        for tok in superseded:
            self._notify("hero.cancelled", {"token": tok, "reason": "superseded"})
        return req

    def get(self, token: str) -> Optional[PendingRequest]:
        with self._lock:
            return self._requests.get(token)

    def pending(self) -> list[dict]:
        with self._lock:
            reqs = [r for r in self._requests.values() if r.state == "pending"]
        reqs.sort(key=lambda r: r.created)
        return [r.to_json() for r in reqs]

    def answer(self, token: Any, payload: Any) -> tuple[int, dict]:
        """Validate, save to disk, wake the node. Returns (HTTP status, JSON body)."""
        if not isinstance(payload, dict):
            return 400, {"error": "the body must be a JSON object {token, good, bad, best}"}
        if not isinstance(token, str) or not token or len(token) > 128:
            return 400, {"error": "'token' must be the request's token string"}
        for k in ("good", "bad"):
            v = payload.get(k)
            if isinstance(v, list) and len(v) > MAX_IMAGES:
                return 400, {"error": f"'{k}' lists {len(v)} indices; a round has at most {MAX_IMAGES}"}
        with self._lock:
            req = self._requests.get(token)
            if req is None:
                return 404, {"error": "unknown token: no request with this token is waiting "
                                      "(the server may have restarted; reload GET /hero/pending)"}
            if req.state != "pending":
                what = {"saving": "these marks are being saved by another submission",
                        "answered": "this round was already answered",
                        "cancelled": f"this request is stale ({req.reason or 'cancelled'})"}[req.state]
                return 409, {"error": what, "state": req.state}
            try:
                marks = Marks.from_json({k: payload.get(k) for k in ("good", "bad", "best")})
                marks.validate(req.n, req.has_current_best)
            except MarksError as e:
                return 400, {"error": str(e)}
            req.state = "saving"
        # write outside the registry lock (the state 'saving' already makes this exactly-once)
        try:
            if _existing_marks(req.session, req.round) is not None:
                raise FileExistsError("round already has marks")
            req.session.record_marks(req.round, marks)
        except Exception as e:  # noqa: BLE001
            try:
                existing = _existing_marks(req.session, req.round)
            except Exception:  # noqa: BLE001
                existing = None
            if existing is not None:  # saved by another path (text fallback, other server): keep
                with self._lock:
                    req.state, req.marks = "answered", existing
                    req.event.set()
                    self._finish_locked(req)
                return 409, {"error": "this round already has marks saved; they were kept",
                             "state": "answered"}
            if isinstance(e, MarksError):  # the session's own rules disagree: let the user fix it
                with self._lock:
                    req.state = "pending"
                return 400, {"error": str(e)}
            # the session moved on: this request is stale (a damaged file is an I/O failure, below)
            if isinstance(e, SessionError) and not isinstance(e, SessionDamaged):
                with self._lock:
                    req.state, req.reason = "cancelled", f"stale: {e}"
                    req.event.set()
                    self._finish_locked(req)
                self._notify("hero.cancelled", {"token": token, "reason": str(e)})
                return 409, {"error": f"this request is stale: {e}", "state": "cancelled"}
            with self._lock:  # an I/O failure: nothing was saved, the request stays answerable
                req.state = "pending"
            log.exception("HERO: saving marks failed")
            return 500, {"error": f"saving the marks failed ({type(e).__name__}: {e}); "
                                  f"nothing was saved, try again"}
        with self._lock:
            req.state, req.marks = "answered", marks
            req.event.set()
            self._finish_locked(req)
        self._notify("hero.answered", {"token": token, "session": req.session_id,
                                       "round": req.round, "saved": marks.num_marked})
        return 200, {"saved": marks.num_marked, "token": token, "session": req.session_id,
                     "round": req.round}

    def cancel(self, token: str, reason: str = "cancelled") -> bool:
        with self._lock:
            req = self._requests.get(token)
            if req is None or req.state not in ("pending",):
                return False
            req.state, req.reason = "cancelled", reason
            req.event.set()
            self._finish_locked(req)
        self._notify("hero.cancelled", {"token": token, "reason": reason})
        return True

    def wait(self, token: str, timeout_s: float, is_interrupted: Optional[Callable[[], bool]] = None,
             interrupt_exc: Optional[Callable[[], BaseException]] = None, poll_s: float = 0.2) -> Marks:
        """Block (worker thread) until the request is answered. On interrupt, cancels the request
        and raises ``interrupt_exc()`` (default ``InterruptedError``); on timeout cancels and raises
        ``TimeoutError`` with a message for the user."""
        req = self.get(token)
        if req is None:
            raise KeyError(f"unknown HERO marks token {token!r}")
        deadline = time.monotonic() + float(timeout_s)
        while not req.event.wait(poll_s):
            if is_interrupted is not None and is_interrupted():
                self.cancel(token, "interrupted")
                raise (interrupt_exc() if interrupt_exc else InterruptedError("HERO: marking interrupted"))
            if time.monotonic() >= deadline:
                if self.cancel(token, "timed out"):
                    raise TimeoutError(
                        f"HERO: no marks received in {timeout_s:g} s for session "
                        f"'{req.session_id}' round {req.round}; re-queue to continue "
                        f"\u2014 marks are kept (earlier rounds and anything already saved)")
        if req.state == "saving":  # the event is set only after saving; defensive
            while req.state == "saving":
                time.sleep(0.01)
        if req.state == "answered" and req.marks is not None:
            return req.marks
        raise RequestCancelled(f"HERO: marks request for session '{req.session_id}' round "
                               f"{req.round} was {req.reason or 'cancelled'}")


REGISTRY = MarksRegistry()
open_request = REGISTRY.open_request
pending = REGISTRY.pending
answer = REGISTRY.answer
wait = REGISTRY.wait
cancel = REGISTRY.cancel
get = REGISTRY.get
