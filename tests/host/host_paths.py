"""Paths of the host tests (a module with its own name: ``from conftest import ...`` breaks when
tests/host and tests/browser are collected in one run, both conftests being ``conftest``)."""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
COMFYUI_PATH = Path(os.path.expanduser(os.environ.get("COMFYUI_PATH", "~/comfy/ComfyUI")))
OLD_PATH = Path(os.path.expanduser(os.environ.get("HERO_COMFYUI_OLD_PATH", "~/comfy/ComfyUI-0.3.64")))
HAVE_COMFY = (COMFYUI_PATH / "comfy" / "samplers.py").is_file()
