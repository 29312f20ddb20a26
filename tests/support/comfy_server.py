"""A real headless ComfyUI server with this pack, for host and browser tests.

- :func:`build_random_sd15_checkpoint` writes a random but full-width SD1.5 checkpoint that
  ``CheckpointLoaderSimple`` detects (comfyui_guide 6.3: UNet 320 ch, channel_mult [1], one res
  block, one transformer, context 768 + random CLIP-L + TAESD VAE, fp16, ~300 MB). It is built at
  test time in a subprocess of the host's Python (ComfyUI's ``nodes`` module would collide with
  ours in-process) and cached; it is never committed.
- :class:`ComfyServer` starts ``main.py --cpu`` on a free port with ``--base-directory <tmp>`` and
  the pack symlinked as ``<tmp>/custom_nodes/ComfyUI-HERO``; ``stop()``, ``kill()`` (SIGKILL) and
  ``start()`` again on the same base directory simulate a crash/restart.

Environment: ``COMFYUI_PATH`` (default ``~/comfy/ComfyUI``), ``COMFYUI_PYTHON`` (default
``~/comfy/venv/bin/python``, else the current interpreter), ``COMFYUI_FRONT_END_ROOT`` (needed for
0.3.64 whose pinned front end is not the installed one; auto-detected for ~/comfy/ComfyUI-0.3.64).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[2]
PACK_DIR_NAME = "ComfyUI-HERO"
CKPT_NAME = "hero_random_sd15.safetensors"


def comfy_path() -> Path:
    return Path(os.environ.get("COMFYUI_PATH", "~/comfy/ComfyUI")).expanduser()


def hosts() -> list[Path]:
    """The hosts a test runs on: COMFYUI_PATH, plus HERO_COMFYUI_OLD_PATH (default
    ~/comfy/ComfyUI-0.3.64) when it is there and is another host."""
    out = [comfy_path()]
    old = Path(os.path.expanduser(os.environ.get("HERO_COMFYUI_OLD_PATH",
                                                 "~/comfy/ComfyUI-0.3.64")))
    if (old / "main.py").is_file() and os.path.realpath(old) != os.path.realpath(out[0]):
        out.append(old)
    return out


def comfy_python() -> str:
    p = os.environ.get("COMFYUI_PYTHON")
    if p:
        return p
    v = Path("~/comfy/venv/bin/python").expanduser()
    return str(v) if v.exists() else sys.executable


def front_end_root(cpath: Optional[Path] = None) -> Optional[str]:
    env = os.environ.get("COMFYUI_FRONT_END_ROOT")
    if env:
        return env
    cpath = cpath or comfy_path()
    if "0.3.64" in cpath.name:
        cand = cpath.parent / "frontend-1.27.10" / "comfyui_frontend_package" / "static"
        if cand.is_dir():
            return str(cand)
    return None


def host_missing_reason() -> Optional[str]:
    """None when a ComfyUI host is usable, else why not (for pytest.skip)."""
    cpath = comfy_path()
    if not (cpath / "main.py").is_file():
        return (f"ComfyUI host not found at {cpath} (set COMFYUI_PATH to a ComfyUI checkout "
                f"with its requirements installed)")
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- random checkpoint -----------------------------------------------------------------------

_BUILD_SCRIPT = r'''
import sys, torch
sys.path.insert(0, sys.argv[1])
from comfy.cli_args import args
args.cpu = True
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
import comfy.ops, comfy.sd1_clip
from comfy.taesd.taesd import TAESD
from safetensors.torch import save_file
torch.manual_seed(int(sys.argv[3]))
unet_config = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1],
                   channel_mult=[1], transformer_depth=[1],
                   transformer_depth_output=[1, 1], transformer_depth_middle=1, context_dim=768,
                   num_heads=8, num_head_channels=-1, use_linear_in_transformer=False,
                   use_spatial_transformer=True, legacy=False, adm_in_channels=None,
                   use_temporal_attention=False, use_temporal_resblock=False, dtype=torch.float32,
                   operations=comfy.ops.manual_cast)
unet = UNetModel(**unet_config)
def rand_like(k, v):
    if not v.is_floating_point():
        return v
    if v.ndim == 1:
        return torch.ones_like(v.float()) if k.endswith("weight") else torch.zeros_like(v.float())
    return torch.randn_like(v.float()) * 0.02
sd = {}
with torch.no_grad():
    for k, v in unet.state_dict().items():
        sd["model.diffusion_model." + k] = rand_like(k, v)
    clip = comfy.sd1_clip.SD1ClipModel(device="cpu", dtype=torch.float32)
    for k, v in clip.clip_l.state_dict().items():
        if k.startswith("transformer.text_model."):
            sd["cond_stage_model." + k] = rand_like(k, v)
    taesd = TAESD(latent_channels=4)
    for k, v in taesd.state_dict().items():
        if k in ("vae_scale", "vae_shift"):
            t = torch.tensor(1.0 if k == "vae_scale" else 0.0)
        elif v.ndim == 4:  # conv: fan-in init so the decoded images show structure, not flat grey
            t = torch.randn_like(v.float()) * (1.5 / (v[0].numel() ** 0.5))
        else:
            t = torch.randn_like(v.float()) * 0.1
        sd["first_stage_model." + k] = t
sd = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
save_file(sd, sys.argv[2])
print("params", sum(v.numel() for v in sd.values()))
'''


def build_random_sd15_checkpoint(dest: Path, seed: int = 0, timeout: float = 600) -> Path:
    """Write the random SD1.5 checkpoint to ``dest`` (skipped if it exists). Returns ``dest``."""
    dest = Path(dest)
    if dest.is_file() and dest.stat().st_size > 1_000_000:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".partial")
    r = subprocess.run([comfy_python(), "-c", _BUILD_SCRIPT, str(comfy_path()), str(tmp), str(seed)],
                       cwd=str(comfy_path()), capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"building the random checkpoint failed:\n{r.stdout}\n{r.stderr}")
    os.replace(tmp, dest)
    return dest


def cached_checkpoint() -> Path:
    """One checkpoint per machine user, under the temp dir (HERO_TEST_CACHE overrides)."""
    cache = Path(os.environ.get("HERO_TEST_CACHE", Path(tempfile.gettempdir()) / f"hero-test-cache-{os.getuid()}"))
    return build_random_sd15_checkpoint(cache / CKPT_NAME)


# ---- the server --------------------------------------------------------------------------------

class ComfyServer:
    """``with ComfyServer(base_dir, checkpoint=...) as srv: srv.url ...``"""

    def __init__(self, base_dir: Path, checkpoint: Optional[Path] = None, port: Optional[int] = None,
                 cpath: Optional[Path] = None, extra_args: tuple = (), pack_dir: Path = REPO,
                 startup_timeout: float = 180, extra_env: Optional[dict] = None,
                 pack_name: str = PACK_DIR_NAME):
        self.base = Path(base_dir)
        self.cpath = Path(cpath) if cpath else comfy_path()
        self.port = port or free_port()
        self.extra_args = tuple(extra_args)
        self.startup_timeout = startup_timeout
        self.extra_env = dict(extra_env or {})  # e.g. PYTHONPATH entries to put first
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = self.base / "server.log"
        for d in ("custom_nodes", "models/checkpoints", "input", "output", "temp", "user"):
            (self.base / d).mkdir(parents=True, exist_ok=True)
        link = self.base / "custom_nodes" / pack_name  # a Registry install uses the node id
        if not link.exists():
            link.symlink_to(Path(pack_dir).resolve(), target_is_directory=True)
        if checkpoint is not None:
            dst = self.base / "models" / "checkpoints" / Path(checkpoint).name
            if not dst.exists():
                try:
                    dst.symlink_to(Path(checkpoint).resolve())
                except OSError:
                    shutil.copyfile(checkpoint, dst)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list:
        cmd = [comfy_python(), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base), "--disable-api-nodes",
               "--database-url", "sqlite:///:memory:", "--disable-auto-launch"]
        fe = front_end_root(self.cpath)
        if fe:
            cmd += ["--front-end-root", fe]
        return cmd + list(self.extra_args)

    def start(self) -> "ComfyServer":
        if self.proc is not None and self.proc.poll() is None:
            return self
        logf = open(self.log_path, "ab")
        logf.write(f"\n==== start {time.ctime()} {' '.join(self.command())}\n".encode())
        logf.flush()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        threads = os.environ.get("HERO_TEST_THREADS")
        if threads:  # a busy machine: OpenMP threads waiting for a core slow small ops ~20x
            env["OMP_NUM_THREADS"] = threads
        shim = self._templates_shim()
        if shim:
            env["PYTHONPATH"] = shim + os.pathsep + env.get("PYTHONPATH", "")
        for k, v in self.extra_env.items():
            env[k] = v + os.pathsep + env[k] if k == "PYTHONPATH" and env.get(k) else v
        self.proc = subprocess.Popen(self.command(), cwd=str(self.cpath), stdout=logf,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)
        logf.close()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} during startup:\n"
                                   f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/system_stats", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)
        self.kill()
        raise TimeoutError(f"ComfyUI did not answer /system_stats in {self.startup_timeout} s:\n"
                           f"{self.log_tail()}")

    def _templates_shim(self) -> Optional[str]:
        """0.3.64 serves ``comfyui_workflow_templates/templates`` and dies if that folder is
        missing (newer template packages split it out). Shadow the package with an empty one for
        that host only; templates are not needed by the tests."""
        fm = self.cpath / "app" / "frontend_management.py"
        try:
            if 'comfyui_workflow_templates) / "templates"' not in fm.read_text():
                return None
        except OSError:
            return None
        r = subprocess.run([comfy_python(), "-c", "import importlib.resources as r, "
                            "comfyui_workflow_templates as t; print(r.files(t) / 'templates')"],
                           capture_output=True, text=True)
        if r.returncode == 0 and Path(r.stdout.strip()).is_dir():
            return None
        shim = self.base / "_shim"
        (shim / "comfyui_workflow_templates" / "templates").mkdir(parents=True, exist_ok=True)
        (shim / "comfyui_workflow_templates" / "__init__.py").write_text("# test shim\n")
        return str(shim)

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 20) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL, as in a crash (the session on disk must survive)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def restart(self, hard: bool = False) -> "ComfyServer":
        self.kill() if hard else self.stop()
        return self.start()

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- tiny HTTP client (stdlib only) ------------------------------------------------------------
    def request(self, method: str, path: str, body=None, timeout: float = 30):
        """(status, parsed JSON or bytes)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw, status, ctype = r.read(), r.status, r.headers.get("Content-Type", "")
        except urllib.error.HTTPError as e:
            raw, status, ctype = e.read(), e.code, e.headers.get("Content-Type", "")
        return status, (json.loads(raw) if "json" in ctype else raw)

    def get(self, path: str, **kw):
        return self.request("GET", path, **kw)

    def post(self, path: str, body, **kw):
        return self.request("POST", path, body, **kw)

    def queue(self, graph: dict, client_id: Optional[str] = None) -> str:
        status, res = self.post("/prompt", {"prompt": graph, "client_id": client_id or uuid.uuid4().hex})
        if status != 200:
            raise RuntimeError(f"/prompt refused the graph ({status}): {res}")
        return res["prompt_id"]

    def wait_history(self, prompt_id: str, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, h = self.get(f"/history/{prompt_id}")
            if status == 200 and prompt_id in h:
                return h[prompt_id]
            time.sleep(0.3)
        raise TimeoutError(f"prompt {prompt_id} not finished in {timeout} s:\n{self.log_tail()}")

    def wait_pending(self, timeout: float = 120, session: Optional[str] = None) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, res = self.get("/hero/pending")
            if status == 200:
                for p in res["pending"]:
                    if session is None or p["session"] == session:
                        return p
            time.sleep(0.3)
        raise TimeoutError(f"no HERO request pending after {timeout} s:\n{self.log_tail()}")
