"""Import the pack's modules outside ComfyUI without running the pack's ``__init__`` files.

The pack uses relative imports (``from ..hero_engine.feedback import Marks``), and the repo's
``nodes`` package name collides with ComfyUI's ``nodes.py``; so the repo is mounted as a synthetic
package ``hero_pack`` (and ``hero_pack.nodes``) whose ``__path__`` points at the checkout."""
from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACK = "hero_pack"


def _mount() -> None:
    if PACK not in sys.modules:
        pkg = types.ModuleType(PACK)
        pkg.__path__ = [str(REPO)]
        sys.modules[PACK] = pkg
    if f"{PACK}.nodes" not in sys.modules:
        sub = types.ModuleType(f"{PACK}.nodes")
        sub.__path__ = [str(REPO / "nodes")]
        sys.modules[f"{PACK}.nodes"] = sub


def import_pack_module(name: str):
    """``import_pack_module("nodes.marks")`` -> the module ``hero_pack.nodes.marks``."""
    _mount()
    return importlib.import_module(f"{PACK}.{name}")
