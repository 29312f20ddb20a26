"""Speed and memory of a HERO round, against ComfyUI's own sampler (issue #13).

Run with the ComfyUI host's Python (it imports ComfyUI from ``COMFYUI_PATH``):

    COMFYUI_PATH=~/comfy/ComfyUI ~/comfy/venv/bin/python benchmarks/perf.py \
        --models toy,sd15 --size 128 --batch 4 --steps 10 --out perf_out

For every model it measures, on the same weights and settings:
  - KSampler: ComfyUI's ``common_ksampler`` with sampler ``ddim``, scheduler ``ddim_uniform``;
  - HERO Generate: ``nodes/host.generate`` (the chain with its log-probs, the PNGs and the chain
    written to the session), as a time ratio to KSampler;
  - HERO Train: ``nodes/host.train`` on simulated marks, phase by phase (representation, extra
    samples, policy update, commit), and the update's cost per trained image-step as a ratio to one
    CFG sampling image-step of KSampler;
  - the representation's training time per round at the model's real latent size (64 images);
  - peak memory per phase: the GPU's ``max_memory_allocated`` when there is one, else the
    process's peak RSS (which only grows: on CPU a phase's figure is the peak so far, and each
    model, method and memory mode runs in a process of its own);
  - each memory mode of the update (``--memory-modes``, hero_engine/memory.py) on a session of
    its own, with a stand-in of the text encoders' and VAE's size held by ComfyUI as a workflow
    holds them (what ``release_models`` unloads).

Models: ``toy`` (the embedded toy model through the engine, no ComfyUI), ``sd15-tiny`` and
``sdxl-tiny`` (the host tests' 1 M-parameter UNets), ``sd15`` and ``sdxl`` (the real UNet configs
with random weights; ComfyUI's ``comfy/model_detection.py`` lists the same configs). Weights are
random: speed and memory do not depend on them. No file is downloaded.

It prints a table and writes ``perf.json`` to ``--out``. Numbers, not a test: tests/host/test_perf.py
only checks that the script runs and reports every field.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "tests", REPO / "tests" / "host"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

# The real UNet configs (as comfy/model_detection.py's unet_config_from_diffusers_unet lists them)
SD15_UNET = dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True,
                 legacy=False, adm_in_channels=None, in_channels=4, model_channels=320,
                 num_res_blocks=[2, 2, 2, 2], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                 channel_mult=[1, 2, 4, 4], transformer_depth_middle=1,
                 use_linear_in_transformer=False, context_dim=768, num_heads=8,
                 transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                 use_temporal_attention=False, use_temporal_resblock=False)
SDXL_UNET = dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True,
                 legacy=False, num_classes="sequential", adm_in_channels=2816, in_channels=4,
                 model_channels=320, num_res_blocks=[2, 2, 2],
                 transformer_depth=[0, 0, 2, 2, 10, 10], channel_mult=[1, 2, 4],
                 transformer_depth_middle=10, use_linear_in_transformer=True, context_dim=2048,
                 num_head_channels=64, transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
                 use_temporal_attention=False, use_temporal_resblock=False)
MODELS = ("toy", "sd15-tiny", "sdxl-tiny", "sd15", "sdxl")
# The update's memory modes (hero_engine/memory.py), each a change to the session defaults
# (micro-batch auto, chains on the CPU, no checkpointing, autocast auto, other models released)
MEMORY_MODES = {
    "default": {},
    "checkpointing": {"gradient_checkpointing": True},
    "micro1": {"micro_batch": 1},
    "micro2": {"micro_batch": 2},
    "micro8": {"micro_batch": 8},
    "micro8-checkpointing": {"micro_batch": 8, "gradient_checkpointing": True},
    "micro2-checkpointing": {"micro_batch": 2, "gradient_checkpointing": True},
    "chains-device": {"chains_on": "device"},
    "keep-models": {"release_models": False},
    "fp32": {"mixed_precision": "no"},
}
# parameters of the models a real workflow also holds on the card: the text encoders and the VAE
# (CLIP-L 123 M, OpenCLIP-G 695 M, the SD VAE 84 M); the perf run loads a stand-in of that size
ENCODER_PARAMS = {"sd15": 123e6 + 84e6, "sdxl": 123e6 + 695e6 + 84e6}


# -- measurement helpers
def _sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _peak_reset(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device) -> float:
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB on Linux


def timed(device, fn):
    """(result, seconds, peak GiB) of ``fn()``."""
    _sync(device)
    _peak_reset(device)
    t = time.perf_counter()
    r = fn()
    _sync(device)
    return r, time.perf_counter() - t, _peak_gib(device)


def representation_seconds(latent_shape, n: int, device, epochs: int) -> float:
    """One round of representation learning (the session defaults, ``epochs`` steps) on ``n``
    random features of ``latent_shape``: its cost depends on the latent size, not the weights."""
    import dataclasses
    from hero_engine.representation import RepresentationTrainer
    from hero_engine.session import HeroConfig
    config = dataclasses.replace(HeroConfig().representation, epochs=epochs)
    tr = RepresentationTrainer(latent_shape[0], config, device=device)
    g = torch.Generator().manual_seed(0)
    f = torch.randn((n, *latent_shape), generator=g)
    good, bad = list(range(0, n, 2)), list(range(1, n, 2))
    with torch.inference_mode(False), torch.enable_grad():
        _, s, _ = timed(device, lambda: tr.train_round(f, f[0], good, bad, 0, g))
    return s


# -- ComfyUI models
def comfy_model(kind: str, device, dtype):
    import comfy.model_base
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    if kind.endswith("-tiny"):
        from tiny_models import make_model
        return make_model(kind[:-5])
    sdxl = kind == "sdxl"
    unet_config = dict(SDXL_UNET if sdxl else SD15_UNET, dtype=dtype)
    mc = (comfy.supported_models.SDXL if sdxl else comfy.supported_models.SD15)(unet_config)
    base_cls = comfy.model_base.SDXL if sdxl else comfy.model_base.BaseModel
    with torch.inference_mode():
        model = base_cls(mc, model_type=comfy.model_base.ModelType.EPS, device=device)
        g = torch.Generator(device=device).manual_seed(0)
        for p in model.diffusion_model.parameters():   # ComfyUI skips weight init
            p.copy_(torch.randn(p.shape, generator=g, device=device, dtype=torch.float32)
                    .to(p.dtype) * 0.02)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def encoder_standin(kind: str, dtype):
    """A ComfyUI-managed model of the text encoders' and VAE's size (random weights), loaded on
    the device as a workflow's CLIP and VAE would be: what ``release_models`` unloads."""
    import comfy.model_management as mm
    import comfy.model_patcher
    n = int(ENCODER_PARAMS.get(kind, 1e6))
    m = torch.nn.Module()
    m.weight = torch.nn.Parameter(torch.zeros(n, dtype=dtype), requires_grad=False)
    mp = comfy.model_patcher.ModelPatcher(m, load_device=mm.get_torch_device(),
                                          offload_device=mm.unet_offload_device())
    mm.load_models_gpu([mp])
    return mp


def comfy_conds(kind: str, width: int, height: int):
    g = torch.Generator().manual_seed(1)
    sdxl = kind.startswith("sdxl")
    dim = 64 if kind.endswith("-tiny") else (2048 if sdxl else 768)
    out = []
    for _ in range(2):
        c = torch.randn(1, 77, dim, generator=g) * 0.5
        extra = ({"pooled_output": torch.randn(1, 1280, generator=g), "width": width,
                  "height": height} if sdxl else {})
        out.append([[c, extra]])
    return out


def bench_comfy(kind: str, a, device, dtype, method: str, mode: str = "default") -> dict:
    import nodes as comfy_nodes   # ComfyUI's nodes.py
    from support.pack_import import import_pack_module
    from tiny_models import TinyVAE   # decodes by upsampling: VAE cost is not what is compared
    host = import_pack_module("nodes.host")
    S = import_pack_module("hero_engine.session")
    P = import_pack_module("hero_engine.policy")
    F = import_pack_module("hero_engine.feedback")
    M = import_pack_module("hero_engine.memory")
    w, h = a.size, a.size
    mp = comfy_model(kind, device, dtype)
    pos, neg = comfy_conds(kind, w, h)
    lat = {"samples": torch.zeros(a.batch, 4, h // 8, w // 8)}

    def ksampler(steps):
        with torch.inference_mode():
            return comfy_nodes.common_ksampler(mp, 1, steps, a.cfg, "ddim", "ddim_uniform", pos,
                                               neg, lat)[0]["samples"]

    ksampler(1)   # load the model onto the device, warm the kernels
    _, t_ks, m_ks = timed(device, lambda: ksampler(a.steps))
    policy = P.PolicyConfig(denoise_steps=a.denoise_steps, timesteps_per_sample=a.ppo_timesteps)
    root = Path(tempfile.mkdtemp(prefix="hero-perf-"))
    R = import_pack_module("hero_engine.representation")
    config = S.HeroConfig(method=method, batch_size=a.batch, steps=a.steps,
                          guidance_scale=a.cfg, policy=policy,
                          representation=R.RepresentationConfig(epochs=a.encoder_epochs))
    config = M.with_memory_settings(config, **MEMORY_MODES[mode])
    session = S.Session.create(root / f"{kind}-{method}-{mode}", config)
    encoders = encoder_standin(kind, dtype)   # noqa: F841 (held, as a workflow holds its CLIP)

    def generate():
        with torch.inference_mode():
            return host.generate(mp, pos, neg, TinyVAE(), session, width=w, height=h, seed=1)

    batch, t_gen, m_gen = timed(device, generate)
    n = batch.size
    session.record_marks(batch.round, F.Marks(list(range(0, n, 2)), list(range(1, n, 2)), 0))
    fb = SimpleNamespace(session=session, round=batch.round, marks=session.marks_for(batch.round),
                         batch=batch)

    def train():
        with torch.inference_mode():
            return host.train(mp, session, fb)

    res, t_train, m_train = timed(device, train)
    m = res.metrics
    enc, extra, upd = (float(m.get(k) or 0.0) for k in ("encoder_seconds", "extra_seconds",
                                                        "policy_seconds"))
    step = t_ks / (a.batch * a.steps)   # one CFG sampling image-step
    if config.update == "rwr":
        image_steps = policy.denoise_steps * policy.train_batch_size * policy.grad_accum
    elif config.update == "ppo":
        image_steps = n * policy.timesteps_per_sample * policy.epochs
    else:   # d3po: a good and a bad chain per pair
        image_steps = 2 * min(len(fb.marks.good), len(fb.marks.bad)) * policy.timesteps_per_sample
    lat_shape = (4, 64, 64) if kind == "sd15" else (4, 128, 128) if kind == "sdxl" else \
        (4, h // 8, w // 8)
    return {"model": kind, "method": method, "update": config.update, "device": str(device),
            "memory_mode": mode, "memory": {k: getattr(config.policy, k) for k in M.MEMORY_SETTINGS},
            "train_micro_batch": m.get("train_micro_batch"),
            "released_models": m.get("released_models"),
            "checkpointed_modules": m.get("checkpointed_modules"),
            "dtype": str(dtype).replace("torch.", ""), "size": a.size, "batch": a.batch,
            "steps": a.steps, "cfg": a.cfg,
            "ksampler_s": t_ks, "generate_s": t_gen, "generate_over_ksampler": t_gen / t_ks,
            "train_s": t_train, "representation_s": enc, "extra_samples_s": extra,
            "update_s": upd, "commit_s": max(0.0, t_train - enc - extra - upd),
            "update_image_steps": image_steps,
            "update_step_over_cfg_step": (upd / image_steps) / step,
            "encoder_epochs": a.encoder_epochs,
            "representation_full_size_s": representation_seconds(lat_shape, 64, device,
                                                                 a.encoder_epochs),
            "representation_full_size_latent": list(lat_shape),
            "peak_gib": {"ksampler": m_ks, "generate": m_gen, "train": m_train},
            "round_s": t_gen + t_train}


# -- the toy model (engine only: there is no ComfyUI MODEL of it)
def bench_toy(a, device, method: str, mode: str = "default") -> dict:
    from hero_engine import loop
    from hero_engine.harness.experiment import ExperimentSpec, toy_backend, toy_config
    from hero_engine.harness.evaluator import SimulatedEvaluator
    from hero_engine.memory import MEMORY_SETTINGS, with_memory_settings
    from hero_engine.session import Session
    spec = ExperimentSpec(task="colour", method=method, batch_size=a.batch,
                          ppo_timesteps=a.ppo_timesteps)
    toy, task, be = toy_backend(spec, device)
    steps = a.steps
    config = toy_config(spec, steps, be.guidance_scale)
    config.policy.denoise_steps = a.denoise_steps
    config.representation.epochs = a.encoder_epochs
    config = with_memory_settings(config, **MEMORY_MODES[mode])
    root = Path(tempfile.mkdtemp(prefix="hero-perf-"))
    session = Session.create(root / f"toy-{method}-{mode}", config)
    ev = SimulatedEvaluator(task.score, task.threshold)
    be.sample_fresh(2, 1, 0)   # warm-up
    _, t_s, m_s = timed(device, lambda: be.sample_fresh(a.batch, steps, 1))

    def query(batch):
        marks, scores = ev.query(batch.images, be.prompts * batch.size, None)
        return marks, float(scores[marks.best])

    m, t_round, m_round = timed(device, lambda: loop.run_round(session, be, query))
    step = t_s / (a.batch * steps)
    pol = config.policy
    image_steps = (pol.denoise_steps * pol.train_batch_size * pol.grad_accum if config.update == "rwr"
                   else a.batch * pol.timesteps_per_sample * pol.epochs)
    upd = float(m.get("policy_seconds") or 0.0)
    enc = float(m.get("encoder_seconds") or 0.0)
    return {"model": "toy", "method": method, "update": config.update, "device": str(device),
            "memory_mode": mode, "memory": {k: getattr(config.policy, k) for k in MEMORY_SETTINGS},
            "train_micro_batch": m.get("train_micro_batch"),
            "dtype": "float32", "size": 32, "batch": a.batch, "steps": steps, "cfg": be.guidance_scale,
            "sample_fresh_s": t_s, "generate_s": float(m["generate_seconds"]),
            "generate_over_sample_fresh": float(m["generate_seconds"]) / t_s,
            "representation_s": enc, "extra_samples_s": float(m.get("extra_seconds") or 0.0),
            "update_s": upd, "update_image_steps": image_steps,
            "update_step_over_cfg_step": (upd / image_steps) / step,
            "round_s": t_round, "peak_gib": {"round": m_round, "sample": m_s}}


def _row(r: dict) -> str:
    ratio = r.get("generate_over_ksampler", r.get("generate_over_sample_fresh"))
    peak = max(r["peak_gib"].values())
    return (f"| {r['model']} | {r['method']} ({r['update']}) | {r.get('memory_mode', '')} "
            f"(micro-batch {r.get('train_micro_batch')}) | {r['device']} {r['dtype']} | "
            f"{r['size']}px x{r['batch']}, {r['steps']} st | {ratio:.2f} | "
            f"{r['update_step_over_cfg_step']:.2f} | {r['representation_s']:.2f} | "
            f"{r['update_s']:.2f} | {r['round_s']:.1f} | {peak:.2f} |")


def table(rows: list[dict]) -> str:
    head = ("| model | method (update) | memory mode | device | size, batch, steps | "
            "Generate / KSampler | update step / CFG step | representation s | update s | "
            "round s | peak GiB |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|")
    return "\n".join([head] + [_row(r) for r in rows])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="toy,sd15-tiny",
                    help=f"comma-separated, from {', '.join(MODELS)}")
    ap.add_argument("--methods", default="hero,hero-paper",
                    help="hero (reward-weighted denoising) and/or hero-paper (PPO)")
    ap.add_argument("--size", type=int, default=128, help="image side in pixels (SD models)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--cfg", type=float, default=7.5)
    ap.add_argument("--denoise-steps", type=int, default=5,
                    help="AdamW steps of the rwr update (the session default is 100; the cost per "
                         "image-step does not depend on it)")
    ap.add_argument("--ppo-timesteps", type=int, default=5)
    ap.add_argument("--encoder-epochs", type=int, default=None,
                    help="representation steps per round (default: the session's, "
                         "RepresentationConfig.epochs; its time grows linearly with it)")
    ap.add_argument("--dtype", default="auto", help="auto: fp16 on CUDA, fp32 on CPU")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--memory-modes", default="default",
                    help=f"comma-separated memory modes of the update, each measured on its own "
                         f"session: {', '.join(MEMORY_MODES)} (on CPU each mode runs in its own "
                         f"process, as each model and method, so that each peak RSS is its own)")
    ap.add_argument("--out", default="hero_out/perf")
    a = ap.parse_args(argv)
    modes = [m for m in a.memory_modes.split(",") if m]
    for m in modes:
        if m not in MEMORY_MODES:
            ap.error(f"unknown memory mode {m!r}; choose from {', '.join(MEMORY_MODES)}")
    if a.encoder_epochs is None:
        from hero_engine.representation import RepresentationConfig
        a.encoder_epochs = RepresentationConfig().epochs
    models = [m for m in a.models.split(",") if m]
    for m in models:
        if m not in MODELS:
            ap.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    if a.size % 8 or a.batch < 2:
        ap.error("--size must be a multiple of 8 and --batch at least 2")
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"auto": torch.float16 if device.type == "cuda" else torch.float32,
             "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]
    if any(m != "toy" for m in models):
        comfy_path = Path(os.environ.get("COMFYUI_PATH", Path.home() / "comfy" / "ComfyUI"))
        if not (comfy_path / "comfy" / "samplers.py").is_file():
            ap.error(f"no ComfyUI at COMFYUI_PATH={comfy_path}: set COMFYUI_PATH, or run only "
                     f"--models toy")
        sys.path.insert(0, str(comfy_path))
        from comfy.cli_args import args as comfy_args
        comfy_args.cpu = device.type == "cpu"
        import comfy.model_management  # noqa: F401
        import folder_paths
        folder_paths.set_output_directory(tempfile.mkdtemp(prefix="hero-perf-out-"))
    rows = []
    methods = [x for x in a.methods.split(",") if x]
    combos = [(mode, m, method) for mode in modes for m in models for method in methods]
    argv_all = list(argv if argv is not None else sys.argv[1:])
    if device.type == "cpu" and len(combos) > 1:
        # the process's peak RSS only grows: one child process per (mode, model, method)
        import subprocess
        own = ("--memory-modes", "--models", "--methods", "--out")
        base = [x for i, x in enumerate(argv_all)
                if x not in own and (i == 0 or argv_all[i - 1] not in own)]
        for mode, m, method in combos:
            child = Path(tempfile.mkdtemp(prefix=f"hero-perf-{mode}-"))
            print(f"[perf] {m} / {method} / memory {mode} (own process) ...", flush=True)
            r = subprocess.run([sys.executable, str(Path(__file__).resolve()), *base,
                                "--models", m, "--methods", method, "--memory-modes", mode,
                                "--out", str(child)])
            if r.returncode:
                print(f"[perf] {m} / {method} / memory {mode} failed (exit {r.returncode})",
                      flush=True)
                return r.returncode
            rows += json.loads((child / "perf.json").read_text())["rows"]
        combos = []
    for mode, m, method in combos:
        print(f"[perf] {m} / {method} / memory {mode} ...", flush=True)
        r = (bench_toy(a, device, method, mode) if m == "toy"
             else bench_comfy(m, a, device, dtype, method, mode))
        print(f"[perf] {json.dumps(r)}", flush=True)
        rows.append(r)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.node(), "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
            "argv": argv if argv is not None else sys.argv[1:]}
    (out / "perf.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(table(rows))
    print(f"wrote {out / 'perf.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
