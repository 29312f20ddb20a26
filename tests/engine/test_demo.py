"""The demo end to end (reduced) and the toy LoRA export read back by diffusers."""
import re
import subprocess
import sys
from pathlib import Path

import torch

from hero_engine.harness.experiment import ExperimentSpec, run_experiment
from hero_engine.lora import load_kohya

ROOT = Path(__file__).resolve().parents[2]


def test_demo_reduced_end_to_end(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "hero_engine", "demo", "--rounds", "2",
                        "--batch-size", "8", "--eval-n", "16", "--steps", "6", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert re.fullmatch(r"success_before=\d\.\d{3} success_after=\d\.\d{3} marks=16", lines[-1])
    progress = [l for l in lines if "round " in l and "good rate" in l]
    assert len(progress) == 2 and "marks 8" in progress[0] and "marks 16" in progress[1]
    for name in ("round_00.png", "round_01.png", "success_vs_marks.png", "base_samples.png",
                 "final_samples.png"):
        assert (out / name).stat().st_size > 0, name
    lora = list(out.glob("hero_*_r02.safetensors"))
    assert len(lora) == 1
    state, meta = load_kohya(lora[0])
    assert meta["hero_marks_used"] == "16" and meta["ss_network_dim"] == "4"
    assert len(state) > 0


def test_demo_rejects_bad_arguments():
    r = subprocess.run([sys.executable, "-m", "hero_engine", "demo", "--batch-size", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--batch-size must be at least 2" in r.stderr


def test_toy_export_reproduces_session_model_in_diffusers(tmp_path):
    """Train the toy LoRA one round, export kohya fp16, load it through diffusers' own kohya
    conversion into a fresh toy UNet: the outputs match the session model within fp16 tolerance."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as Mixin
    from hero_engine.toy import load_toy_model

    from hero_engine.harness.experiment import toy_lr
    spec = ExperimentSpec(task="colour", rounds=1, batch_size=8, eval_n=8, steps=6,
                          lr=toy_lr("hero"), encoder_epochs=5)
    res = run_experiment(spec, tmp_path, save_grids=False, export=True, log=lambda s: None)
    # rebuild the session model: toy UNet + the session's LoRA
    from hero_engine.harness.experiment import toy_backend
    from hero_engine.session import Session
    _, _, be = toy_backend(spec)
    be.load_session(Session.open(res["session"]))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *be.latent_shape, generator=g)
    t = torch.tensor([500, 20])
    ctx = be.encode_prompts(["a shape", "three circles"])
    with torch.no_grad():
        ref = be.unet(x, t, encoder_hidden_states=ctx).sample
        be.load_lora_tensors(None)  # zero LoRA: the base model
        base = be.unet(x, t, encoder_hidden_states=ctx).sample
    assert (ref - base).abs().max() > 1e-3  # the trained LoRA changes the output

    fresh = load_toy_model().unet
    sd, alphas = Mixin.lora_state_dict(res["lora"])
    Mixin.load_lora_into_unet(sd, alphas, fresh, adapter_name="hero_export")
    with torch.no_grad():
        out = fresh(x, t, encoder_hidden_states=ctx).sample
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)
