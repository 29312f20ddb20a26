"""Session 11's probes of hero's instability on the held-out ``two_circles`` task
(docs/benchmarks.md, "Held-out tasks: what the instability is and is not").

    python docs/bench/session11/probes.py select      # what the marks select, and plain SFT on it
    python docs/bench/session11/probes.py split DIR   # a session's LoRA on the cond / uncond pass

``select``: 256 base samples of the prompt ``circles``; the ones ``two_circles`` calls good are
compared with all of them (colour spread per pixel, "sat"), then the LoRA is fine-tuned on 8 of
them (and on 8 unselected ones) with hero's denoising loss, 200 steps.
``split``: a kept session folder (``bench --keep-sessions``): its last LoRA applied to the
conditional pass only, the unconditional pass only, both, neither, at guidance 3.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from hero_engine.denoising import denoise_update  # noqa: E402
from hero_engine.harness.experiment import ExperimentSpec, toy_backend  # noqa: E402
from hero_engine.policy import PolicyConfig, PolicyOptimizer  # noqa: E402
from hero_engine.sampling import sample_with_logprob  # noqa: E402
from hero_engine.toy.tasks import score_count  # noqa: E402

torch.set_num_threads(1)
_, _, BE = toy_backend(ExperimentSpec(task="colour", prompt="circles"))
SCHED = BE.schedule(6)


def samples(n: int, seed: int, denoiser=None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *BE.latent_shape, generator=g)
    with torch.no_grad():
        tr = sample_with_logprob(denoiser or BE.denoiser(), x, SCHED, 1.0, generator=g,
                                 index=torch.zeros(n, dtype=torch.long))
    return BE.decode(tr.x0).float().clamp(0, 1)


def stats(images: torch.Tensor) -> str:
    sat = (images.max(1).values - images.min(1).values).mean()
    ok = (score_count(images, target=2) >= 0).float().mean()
    return f"sat {sat:.3f}  two_circles {ok:.2f}"


def select() -> None:
    pool_img = samples(256, 7)
    pool_x0 = pool_img * 2 - 1                     # the toy's latent is 2 * image - 1
    good = score_count(pool_img, target=2) >= 0
    print(f"all 256 base samples: {stats(pool_img)};  the {int(good.sum())} good ones: "
          f"{stats(pool_img[good])}")
    for name, x0 in (("8 good", pool_x0[good][:8]), ("8 unselected", pool_x0[:8])):
        BE.load_lora_tensors(None)
        popt = PolicyOptimizer(BE.lora_parameters(), PolicyConfig(lr=1e-3, train_batch_size=8,
                                                                  grad_accum=1))
        denoise_update(BE.denoiser(guidance_scale=1.0), x0, torch.ones(len(x0)), SCHED, popt,
                       torch.Generator().manual_seed(0), 200, 8)
        print(f"after 200 denoising steps on {name}: fresh samples {stats(samples(64, 99))}")


def split(folder: str) -> None:
    states = sorted(Path(folder).glob("state-*"))
    BE.load_lora_tensors(torch.load(states[-1] / "lora.pt"))
    unet, s = BE.unet, BE.guidance_scale

    def denoiser(lora_cond: bool, lora_uncond: bool):
        def run(x, t, ctx, on):
            if on:
                return unet(x, t, encoder_hidden_states=ctx).sample
            unet.disable_adapters()
            try:
                return unet(x, t, encoder_hidden_states=ctx).sample
            finally:
                unet.enable_adapters()

        def den(x, t, alpha_bar, index):
            b = x.shape[0]
            c = run(x, t, BE._cond.expand(b, -1, -1), lora_cond)
            u = run(x, t, BE._uncond.expand(b, -1, -1), lora_uncond)
            return u + s * (c - u)
        return den

    for lc, lu in ((False, False), (True, True), (True, False), (False, True)):
        print(f"{states[-1].name}: LoRA on cond {lc!s:5} uncond {lu!s:5}: "
              f"{stats(samples(64, 123, denoiser(lc, lu)))}")


if __name__ == "__main__":
    {"select": lambda: select(), "split": lambda: split(sys.argv[2])}[sys.argv[1]]()
