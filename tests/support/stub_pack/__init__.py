"""A throwaway pack for tests: the real HERO_Feedback node and marks routes, plus two stand-in
nodes that open a round of an engine session from any IMAGE batch (HERO_TestBatch) and complete
it (HERO_TestFinish), so the marking flow is testable without the generator/trainer nodes.

:func:`tests.support.stub_pack.build` assembles it in a temp dir (symlinks to the checkout's
``hero_engine``, ``web`` and the four node modules); ComfyUI imports it like any pack.
"""
from __future__ import annotations

import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
HERE = Path(__file__).resolve().parent


def build(dest: Path) -> Path:
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "nodes").mkdir(parents=True)
    (dest / "hero_engine").symlink_to(REPO / "hero_engine", target_is_directory=True)
    (dest / "web").symlink_to(REPO / "web", target_is_directory=True)
    for m in ("marks.py", "routes.py", "feedback.py", "sockets.py"):
        (dest / "nodes" / m).symlink_to(REPO / "nodes" / m)
    shutil.copyfile(HERE / "pack_init.py", dest / "__init__.py")
    shutil.copyfile(HERE / "stub_nodes.py", dest / "nodes" / "__init__.py")
    return dest
