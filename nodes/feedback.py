"""HERO_Feedback: show the round's images, wait for the person's good/bad/best marks, save them.

The node saves previews to ComfyUI's temp folder, opens a request in the marks registry,
broadcasts ``hero.request`` over the websocket and blocks the worker thread until
``POST /hero/marks`` has saved the marks to the session (see docs/marks_api.md). The ``marks`` text
input is the no-JS fallback; marks already on disk for this round (resume after a restart) are used
directly.
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from comfy_api.latest import io, ui

from ..hero_engine.feedback import Marks, MarksError
from . import marks as _marks
from .sockets import CATEGORY, Batch, Feedback

log = logging.getLogger("HERO")


@dataclass
class FeedbackResult:
    """What flows on the HERO_FEEDBACK socket."""
    session: Any
    round: int
    marks: Marks
    batch: Any = None

    def __repr__(self) -> str:  # shown in errors/logs
        return (f"FeedbackResult(session={getattr(self.session, 'session_id', '?')!r}, "
                f"round={self.round}, good={list(self.marks.good)}, bad={list(self.marks.bad)}, "
                f"best={self.marks.best})")


def _has_best(session) -> bool:
    fn = getattr(session, "best_image_path", None)
    try:
        p = fn() if callable(fn) else None
    except Exception:  # noqa: BLE001
        p = None
    return p is not None and Path(p).exists()


def _best_view(session) -> Optional[dict]:
    """The session's current best image as a /view entry (output folder, or a temp copy)."""
    import folder_paths
    fn = getattr(session, "best_image_path", None)
    try:
        p = fn() if callable(fn) else None
    except Exception:  # noqa: BLE001
        p = None
    if p is None or not Path(p).exists():
        return None
    p = Path(p).resolve()
    for kind, root in (("output", folder_paths.get_output_directory()),
                       ("temp", folder_paths.get_temp_directory())):
        root = Path(root).resolve()
        try:
            rel = p.relative_to(root)
        except ValueError:
            continue
        return {"filename": rel.name, "subfolder": str(rel.parent).replace(os.sep, "/").strip("."),
                "type": kind}
    tmp = Path(folder_paths.get_temp_directory()) / "hero"
    tmp.mkdir(parents=True, exist_ok=True)
    name = f"best_{getattr(session, 'session_id', 'session')}{p.suffix or '.png'}"
    shutil.copyfile(p, tmp / name)
    return {"filename": name, "subfolder": "hero", "type": "temp"}


def _summary(session, round_idx: int, marks: Marks, how: str) -> dict:
    return {"session": getattr(session, "session_id", ""), "round": round_idx,
            "good": list(marks.good), "bad": list(marks.bad), "best": marks.best, "how": how}


def _eta(session) -> Optional[dict]:
    """How long the next batch takes after Submit (training + generation, from the last round's
    times): shown by the marking panel."""
    fn = getattr(session, "next_batch_eta", None)
    try:
        return fn() if callable(fn) else None
    except Exception:  # noqa: BLE001  (an estimate must never block marking)
        return None


class HERO_Feedback(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HERO_Feedback",
            display_name="HERO Feedback (mark images)",
            category=CATEGORY,
            description=(
                "Shows this round's images for marking and waits for your answer: mark every image "
                "good or bad (at least one of each) and pick the best good image (required in the "
                "first round; later rounds may keep the current best). Mark in the panel on this "
                "node (keys: arrows, G/B, space, S, A, Z, Enter), by POST /hero/marks, or type the "
                "marks below. Marks are saved in the session before the round continues."),
            is_output_node=True,
            not_idempotent=True,
            inputs=[
                Batch.Input("batch", tooltip="The round from HERO Generate (session, round, size)."),
                io.Image.Input("images", tooltip="The decoded images of the round's batch, in batch "
                                                 "order (HERO Generate -> VAE Decode)."),
                io.String.Input("marks", multiline=True, default="", optional=True,
                                tooltip="Optional, no-JS fallback: marks as text, images numbered "
                                        "from 1, e.g. 'good: 1 3 4; best: 3' (unlisted images are "
                                        "bad; 'best: keep' keeps the current best). Leave empty to "
                                        "mark in the panel."),
                io.Int.Input("timeout", default=3600, min=10, max=7 * 24 * 3600, step=10,
                             tooltip="Seconds to wait for marks before the prompt fails. Marks "
                                     "already saved are kept; re-queue to continue."),
            ],
            outputs=[Feedback.Output("feedback", tooltip="The saved marks of this round, for "
                                                         "HERO Train.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return float("nan")

    @classmethod
    def execute(cls, batch, images, marks: str = "", timeout: int = 3600) -> io.NodeOutput:
        import comfy.model_management as mm
        from server import PromptServer

        session = batch.session
        round_idx = int(batch.round)
        n = int(images.shape[0])
        size = int(getattr(batch, "size", n))
        if n != size:
            raise ValueError(f"HERO Feedback got {n} images but the round's batch has {size}: "
                             f"connect the IMAGE decoded from this HERO Generate's latents, "
                             f"unchanged (no crops, no image batching)")

        def done(m: Marks, how: str) -> io.NodeOutput:
            info = _summary(session, round_idx, m, how)
            log.info("HERO: session %s round %d marks (%s): good=%s best=%s", info["session"],
                     round_idx, how, info["good"], info["best"])
            return io.NodeOutput(FeedbackResult(session, round_idx, m, batch), ui={"hero_marks": [info]})

        existing = session.marks_for(round_idx)
        if existing is not None:
            return done(existing, "on disk")

        has_best = _has_best(session)
        if marks and marks.strip():
            try:
                m = Marks.parse(marks, n).validate(n, has_best)
            except MarksError as e:
                raise ValueError(f"HERO Feedback 'marks' text: {e}") from None
            session.record_marks(round_idx, m)
            return done(m, "text")

        previews = ui.PreviewImage(images, cls=cls).values
        previews = [{"filename": p["filename"], "subfolder": p["subfolder"], "type": p["type"]}
                    for p in previews]
        req = _marks.REGISTRY.open_request(
            session, round_idx, n, previews, node_id=str(cls.hidden.unique_id or ""),
            current_best=_best_view(session), has_current_best=has_best,
            meta={"eta": _eta(session)})
        if req.state == "answered":
            return done(req.marks, "on disk")
        PromptServer.instance.send_sync("hero.request", req.to_json())
        m = _marks.REGISTRY.wait(req.token, float(timeout), is_interrupted=mm.processing_interrupted,
                                 interrupt_exc=mm.InterruptProcessingException)
        return done(m, "panel")
