"""Install the pack the way ComfyUI-Manager does and check it changes nothing in the user's
environment: copy the pack's files into a fresh host's ``custom_nodes`` (the host's
``--base-directory``: its own custom_nodes, models, input, output), ``pip install -r
requirements.txt`` into the host's venv (first as a dry run whose report must install nothing,
then for real: ``pip list`` must be identical), start the host, and run a round with diffusers
and peft made unimportable, which proves the ComfyUI path needs neither.

Run: ``COMFYUI_PATH=~/comfy/ComfyUI ~/comfy/venv/bin/python -m pytest tests/host/test_install.py``"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from support import comfy_server as cs
from test_publish_host import order_graph

REPO = Path(__file__).resolve().parents[2]
HERO_NODES = {"HERO_Session", "HERO_Generate", "HERO_Feedback", "HERO_Train", "HERO_ApplyLoRA",
              "HERO_ExportLoRA", "HERO_ExportPreferences", "HERO_ExportNoise"}


def copy_pack(dest: Path) -> list[str]:
    """The files a git clone of this checkout would hold (tracked, plus new files not ignored
    yet, so uncommitted work is tested too)."""
    r = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "-c", "-o", "--exclude-standard"],
                       capture_output=True, check=True)
    files = [f for f in r.stdout.decode().split("\0") if f and (REPO / f).is_file()]
    for f in files:
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, dest / f)
    return files


def pip_list(py: str) -> dict:
    r = subprocess.run([py, "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
                       capture_output=True, text=True, check=True)
    return {d["name"].lower(): d["version"] for d in json.loads(r.stdout)}


def blocker(dir_: Path) -> Path:
    """A PYTHONPATH entry on which ``import diffusers`` and ``import peft`` fail."""
    for name in ("diffusers", "peft"):
        (dir_ / name).mkdir(parents=True, exist_ok=True)
        (dir_ / name / "__init__.py").write_text(
            f"raise ImportError('{name} is blocked by tests/host/test_install.py: the ComfyUI "
            f"path must not need it')\n")
    return dir_


def test_manager_style_install_changes_nothing_and_nodes_register(tmp_path):
    reason = cs.host_missing_reason()
    if reason:
        pytest.skip(reason)
    if shutil.which("git") is None:
        pytest.skip("git not installed")
    host = tmp_path / "host"
    # a Registry install puts the pack in custom_nodes/<node id> (pyproject's name)
    node_id = re.search(r'^name = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    pack = host / "custom_nodes" / node_id
    files = copy_pack(pack)
    assert "requirements.txt" in files and "__init__.py" in files
    py = cs.comfy_python()
    before = pip_list(py)

    # 1. what pip would do: nothing to install, upgrade or downgrade (no index: nothing leaks out)
    report = tmp_path / "report.json"
    r = subprocess.run([py, "-m", "pip", "install", "--dry-run", "--no-index", "--report",
                        str(report), "-r", str(pack / "requirements.txt"),
                        "--disable-pip-version-check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    plan = json.loads(report.read_text())
    assert plan["install"] == [], [(i["metadata"]["name"], i["metadata"]["version"])
                                   for i in plan["install"]]
    # 2. the install itself, as the Manager runs it
    r = subprocess.run([py, "-m", "pip", "install", "--no-index", "-r",
                        str(pack / "requirements.txt"), "--disable-pip-version-check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert pip_list(py) == before

    # 3. the fresh host loads the copy, with diffusers and peft unimportable
    shim = blocker(tmp_path / "block")
    r = subprocess.run([py, "-c", "import diffusers"], capture_output=True, text=True,
                       env={"PYTHONPATH": str(shim), "PATH": "/usr/bin:/bin"})
    assert r.returncode != 0 and "blocked by tests/host/test_install.py" in r.stderr
    ckpt = cs.cached_checkpoint()
    srv = cs.ComfyServer(host, checkpoint=ckpt, extra_env={"PYTHONPATH": str(shim)},
                         pack_name=node_id)
    assert sorted(p.name for p in (host / "custom_nodes").iterdir()) == [node_id]  # the copy only
    srv.start()
    try:
        st, info = srv.get("/object_info")
        assert st == 200 and HERO_NODES <= set(info), sorted(k for k in info if "HERO" in k)
        log = srv.log_path.read_text(errors="replace")
        failed = [ln for ln in log.splitlines() if "IMPORT FAILED" in ln and node_id in ln]
        assert not failed and f"custom_nodes/{node_id}" in log, failed
        assert "ComfyUI-HERO failed to load" not in log
        st, ext = srv.get("/extensions")
        assert any(e.endswith(f"/{node_id}/js/hero.js") for e in ext), ext
        # the template browser's category is the folder name: the node id for a Registry install
        st, tpl = srv.get("/workflow_templates")
        assert st == 200 and set(tpl) == {node_id}, tpl
        assert {"hero_sd15_round", "hero_sdxl_round", "hero_use_exported_lora",
                "hero_start_from_noise"} <= set(tpl[node_id])
        st, wf = srv.get(f"/api/workflow_templates/{node_id}/hero_sd15_round.json")
        assert st == 200 and {n["properties"]["cnr_id"] for n in wf["nodes"]
                              if n["type"].startswith("HERO_")} == {node_id}
        # a whole round (generate, marks from the node's text field, train, the three exports)
        h = srv.wait_history(srv.queue(order_graph(ckpt.name)), 600)
        assert h.get("status", {}).get("status_str") == "success", \
            json.dumps(h.get("status"))[-2000:] + srv.log_tail(80)
        assert (host / "models" / "loras" / "hero" / "after_r0001.safetensors").is_file()
        assert "blocked by tests/host/test_install.py" not in srv.log_path.read_text(errors="replace")
    finally:
        srv.stop()
