"""Host tests: ComfyUI at COMFYUI_PATH (default ~/comfy/ComfyUI), imported in-process on CPU.

One ComfyUI per process: ``test_inprocess_old_host`` re-runs the in-process tests in a child
process against HERO_COMFYUI_OLD_PATH (default ~/comfy/ComfyUI-0.3.64)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
for _p in (Path(__file__).parent, REPO / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from host_paths import COMFYUI_PATH, HAVE_COMFY, OLD_PATH  # noqa: E402,F401


def _setup_comfy() -> None:
    if str(COMFYUI_PATH) not in sys.path:
        sys.path.insert(0, str(COMFYUI_PATH))
    from comfy.cli_args import args
    args.cpu = True
    import comfy.model_management  # noqa: F401


@pytest.fixture(scope="session")
def comfy():
    if not HAVE_COMFY:
        pytest.skip(f"ComfyUI not found at COMFYUI_PATH={COMFYUI_PATH} (set COMFYUI_PATH to a "
                    f"ComfyUI checkout to run the host tests)")
    _setup_comfy()
    import comfy.model_management as mm
    return mm


@pytest.fixture
def dirs(comfy, tmp_path, monkeypatch):
    """Output dir and loras dir in tmp_path (folder_paths redirected)."""
    import folder_paths
    out = tmp_path / "output"
    loras = tmp_path / "loras"
    out.mkdir()
    loras.mkdir()
    old_out = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(out))
    fnp = folder_paths.folder_names_and_paths
    old = fnp.get("loras")
    fnp["loras"] = ([str(loras)], old[1] if old else {".safetensors"})
    yield {"output": out, "loras": loras}
    folder_paths.set_output_directory(old_out)
    if old is not None:
        fnp["loras"] = old


@pytest.fixture
def pack(comfy):
    """The pack's modules (mounted as ``hero_pack``)."""
    from support.pack_import import import_pack_module
    from types import SimpleNamespace
    return SimpleNamespace(host=import_pack_module("nodes.host"),
                           host_models=import_pack_module("nodes.host_models"),
                           host_lora=import_pack_module("nodes.host_lora"),
                           host_sampler=import_pack_module("nodes.host_sampler"),
                           nodes=import_pack_module("nodes.nodes"),
                           engine_session=import_pack_module("hero_engine.session"),
                           feedback=import_pack_module("hero_engine.feedback"),
                           lora=import_pack_module("hero_engine.lora"))


@pytest.fixture(scope="session", autouse=True)
def _threads():
    """HERO_TEST_THREADS=1 on a machine busy with other work (as tests/engine; the test servers
    get OMP_NUM_THREADS from it too, tests/support/comfy_server.py)."""
    n = os.environ.get("HERO_TEST_THREADS")
    if n:
        import torch
        torch.set_num_threads(int(n))
    yield
