"""benchmarks/perf.py runs through a real ComfyUI and reports every figure (numbers are not
asserted: speed is measured by the script, not by tests)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from host_paths import COMFYUI_PATH, HAVE_COMFY, REPO


@pytest.mark.skipif(not HAVE_COMFY, reason=f"ComfyUI not found at COMFYUI_PATH={COMFYUI_PATH}")
def test_perf_script_reports_every_phase(tmp_path):
    env = dict(os.environ, COMFYUI_PATH=str(COMFYUI_PATH))
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "perf.py"),
                        "--models", "toy,sd15-tiny", "--methods", "hero,hero-paper",
                        "--size", "64", "--batch", "2", "--steps", "2", "--denoise-steps", "1",
                        "--encoder-epochs", "2", "--threads", "1", "--out", str(tmp_path)],
                       cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.loads((tmp_path / "perf.json").read_text())["rows"]
    assert [(x["model"], x["update"]) for x in rows] == [
        ("toy", "rwr"), ("toy", "ppo"), ("sd15-tiny", "rwr"), ("sd15-tiny", "ppo")]
    for x in rows:
        assert x["update_s"] > 0 and x["update_step_over_cfg_step"] > 0 and x["round_s"] > 0
        assert x["representation_s"] > 0 and all(v > 0 for v in x["peak_gib"].values())
    comfy = [x for x in rows if x["model"] == "sd15-tiny"]
    for x in comfy:
        assert x["ksampler_s"] > 0 and x["generate_over_ksampler"] > 0
        assert x["representation_full_size_s"] > 0 and x["commit_s"] >= 0
        assert abs(x["train_s"] - (x["representation_s"] + x["extra_samples_s"] + x["update_s"]
                                   + x["commit_s"])) < 1e-6
    # the rwr update trains denoise_steps x 8 image-steps; ppo trains batch x timesteps
    assert comfy[0]["update_image_steps"] == 8 and comfy[1]["update_image_steps"] == 2 * 5
    assert "| sd15-tiny | hero (rwr) |" in r.stdout and "Generate / KSampler" in r.stdout


@pytest.mark.skipif(not HAVE_COMFY, reason=f"ComfyUI not found at COMFYUI_PATH={COMFYUI_PATH}")
def test_perf_script_measures_each_memory_mode(tmp_path):
    """Each memory mode runs in its own process on CPU (its own peak RSS) and reaches ComfyUI:
    checkpointing patches modules, the default releases the encoders' stand-in, keep-models not."""
    env = dict(os.environ, COMFYUI_PATH=str(COMFYUI_PATH))
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "perf.py"),
                        "--models", "sd15-tiny", "--methods", "hero", "--size", "64", "--batch",
                        "2", "--steps", "2", "--denoise-steps", "1", "--encoder-epochs", "2",
                        "--threads", "1", "--memory-modes", "checkpointing,keep-models,micro1",
                        "--out", str(tmp_path)],
                       cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.loads((tmp_path / "perf.json").read_text())["rows"]
    assert [x["memory_mode"] for x in rows] == ["checkpointing", "keep-models", "micro1"]
    ck, keep, one = rows
    assert ck["memory"]["gradient_checkpointing"] and ck["checkpointed_modules"] > 0
    assert ck["released_models"] >= 1 and keep["released_models"] == 0
    assert keep["checkpointed_modules"] == 0 and not keep["memory"]["release_models"]
    assert (ck["train_micro_batch"], one["train_micro_batch"]) == (2, 1)
    assert "| checkpointing (micro-batch 2) |" in r.stdout
