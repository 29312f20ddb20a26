"""Base success rate of the toy model on the four tasks (fresh N(0, I) noise, stochastic DDIM).

    python -m hero_engine.toy.measure --n 256 --seed 1234 [--grid docs/img]

Sampling is the engine's evaluation protocol, the benchmark's: ``DiffusersBackend.sample_fresh``
(the engine's ``hero_engine.sampling`` = diffusers DDIM "leading" timesteps, steps_offset=1,
set_alpha_to_one=False, eta=1; the LoRA it adds is the identity, B = 0).
"""
from __future__ import annotations

import argparse
import copy
import time
import weakref
from pathlib import Path

import torch
from torch import Tensor

from ..backends import DiffusersBackend
from ..drawing import image_grid
from .model import ToyModel, load_toy_model
from .tasks import TASKS

_BACKENDS: "weakref.WeakKeyDictionary[ToyModel, DiffusersBackend]" = weakref.WeakKeyDictionary()


def _backend(model: ToyModel) -> DiffusersBackend:
    """The model as an engine backend, made once per model on a copy of its UNet (the backend
    adds a LoRA; the caller's model stays as it is)."""
    be = _BACKENDS.get(model)
    if be is None:
        be = DiffusersBackend(copy.deepcopy(model.unet), model.encode_prompts, model.decode,
                              model.alphas_cumprod, model.latent_shape, [""], model.default_guidance_scale,
                              device=model.device)
        _BACKENDS[model] = be
    return be


def sample_images(model: ToyModel, prompt: str, n: int, seed: int, steps: int | None = None,
                  guidance_scale: float | None = None, eta: float | None = None,
                  batch: int = 64) -> Tensor:
    """``n`` images [n, 3, 32, 32] in [0, 1] for one prompt; reproducible from ``seed``
    (``DiffusersBackend.sample_fresh``, ``batch`` chains at a time)."""
    steps = steps or model.default_steps
    guidance_scale = model.default_guidance_scale if guidance_scale is None else guidance_scale
    eta = model.default_eta if eta is None else eta
    be = _backend(model)
    be.guidance_scale = float(guidance_scale)
    return be.sample_fresh(n, steps, seed, eta=eta, prompts=[prompt], micro_batch=batch)


def save_grid(images: Tensor, ok: Tensor, path: str | Path, cols: int = 8, scale: int = 2) -> None:
    """PNG grid (64-colour palette); each tile framed white if the evaluator calls it a success,
    dark grey otherwise."""
    from PIL import Image

    frames = [(255, 255, 255) if ok[i] else (64, 64, 64) for i in range(images.shape[0])]
    # these grids round each pixel to the nearest of the 256 levels (image_grid truncates): a
    # value half a level above it truncates to the rounded level, so the PNGs stay as they were
    levels = ((images.float() * 255).round() + 0.5) / 255
    img = image_grid(levels, cols, scale=scale, frames=frames, border=2 * scale)
    img = img.quantize(64, dither=Image.Dither.NONE)  # a 64-colour palette keeps the PNGs small
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path, optimize=True)


def measure(model: ToyModel, n: int = 256, seed: int = 1234, tasks=None, grid_dir=None, steps=None,
            guidance_scale=None) -> dict:
    """Success rate per task on ``n`` fresh samples (task k uses seed + k)."""
    res = {}
    for k, name in enumerate(tasks or TASKS):
        task = TASKS[name]
        t0 = time.time()
        scale = guidance_scale if guidance_scale is not None else task.guidance_scale
        imgs = sample_images(model, task.prompt, n, seed + k, steps=steps, guidance_scale=scale)
        scores = task.score(imgs, [task.prompt] * n)
        ok = scores >= task.threshold
        res[name] = dict(success=float(ok.float().mean()), mean_score=float(scores.mean()),
                         n=n, seconds=round(time.time() - t0, 1))
        print(f"{name:8s} {task.prompt!r:36s} success {res[name]['success']:.3f} "
              f"({int(ok.sum())}/{n})  mean score {res[name]['mean_score']:.3f}  [{res[name]['seconds']} s]",
              flush=True)
        if grid_dir:
            save_grid(imgs[:64], ok[:64], Path(grid_dir) / f"toy_{name}.png")
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--tasks", nargs="*", default=None, choices=list(TASKS))
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--cfg", type=float, default=None, help="override every task's guidance scale")
    ap.add_argument("--weights", default=None, help="weights dir (default: the committed weights)")
    ap.add_argument("--grid", default=None, help="write toy_<task>.png grids (first 64 samples) here")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_toy_model(weights_dir=args.weights)
    print(f"toy model: steps {args.steps or model.default_steps}, cfg {args.cfg or 'per task/default'}, "
          f"eta {model.default_eta}, n {args.n}, seed {args.seed}")
    measure(model, args.n, args.seed, args.tasks, args.grid, args.steps, args.cfg)


if __name__ == "__main__":
    main()
