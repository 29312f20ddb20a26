"""Reward-weighted denoising on the LoRA (not in HERO; our ``hero``'s update, ``update="rwr"``).

The images the person marked good are taught to the model with its own training loss, weighted by
how good the marks and the learned representation say they are (reward-weighted regression, Lee
et al. 2023, "Aligning Text-to-Image Models using Human Feedback"; DPOK's supervised term):

    L(theta) = sum_i w_i E_{t, eps} || eps - eps_hat_theta(sqrt(abar_t) x0_i + sqrt(1 - abar_t) eps, t) ||^2
               / sum_i w_i

x0_i are the final latents of every image marked so far (the marks are scarce: each marked-good
image keeps teaching in every later round), t is a step of the sampler's own schedule, and eps_hat
is the conditional prediction eps(x_t, t, c) (the LoRA fine-tuning loss; classifier-free guidance
at sampling then extrapolates what it learned). The weights come from ``reward.denoising_weights``: zero for a marked-bad image, so only what the
person approved is imitated.

Why not PPO here: a DDPO step moves the LoRA by a policy gradient whose sign, on 64 marks, follows
the batch's seed more than its evidence (docs/benchmarks.md, "ablations"); the denoising loss
uses every pixel of each approved image, so the same marks carry far more signal per step, and
it is what an exported LoRA is used with: fresh noise, not the session's guided noise.

A non-finite loss or gradient rejects the whole update as in ``policy.py``.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from .policy import PolicyOptimizer, _autocast, _optimizer_loop
from .sampling import DDIMSchedule, Denoiser

__all__ = ["denoising_loss", "denoise_update"]


def denoising_loss(denoiser: Denoiser, x0: Tensor, weights: Tensor, schedule: DDIMSchedule,
                   step_idx: Tensor, noise: Tensor, index: Tensor) -> Tensor:
    """sum_i w_i || eps_i - eps_hat(x_t_i, t_i) ||^2 / sum_i w_i over a micro-batch, with x_t_i
    noised to the schedule's step ``step_idx[i]`` (mean over latent elements)."""
    dev = x0.device
    ab = schedule.alpha_bars.to(dev)[step_idx.to(dev)].float()
    t = schedule.timesteps.to(dev)[step_idx.to(dev)]
    view = (-1,) + (1,) * (x0.dim() - 1)
    x_t = ab.sqrt().view(view) * x0.float() + (1 - ab).sqrt().view(view) * noise
    eps = denoiser(x_t, t, ab, index).float()
    per = ((eps - noise) ** 2).flatten(1).mean(1)
    w = weights.to(per.device).float()
    return (w * per).sum() / w.sum().clamp_min(1e-8)


def denoise_update(denoiser: Denoiser, x0: Tensor, weights: Tensor, schedule: DDIMSchedule,
                   popt: PolicyOptimizer, generator: torch.Generator, steps: int,
                   samples_per_step: int, index: Optional[Tensor] = None,
                   callback: Optional[Callable[[int, int], None]] = None) -> dict:
    """``steps`` AdamW steps of ``denoising_loss``, each over ``samples_per_step`` images drawn
    with probability proportional to their weight (micro-batches of ``train_batch_size``).
    ``index``: each image's conditioning row (default 0). Returns the mean loss and step counts."""
    config = popt.config
    n = len(x0)
    if n == 0 or not (weights > 0).any():
        raise ValueError("reward-weighted denoising needs at least one image with a positive "
                         "weight (a marked-good image)")
    if steps < 1 or samples_per_step < 1:
        raise ValueError("denoise steps and samples per step must be at least 1")
    if not 0 < config.denoise_fraction <= 1:
        raise ValueError(f"denoise_fraction must lie in (0, 1], got {config.denoise_fraction}")
    T = len(schedule.timesteps)
    dev = x0.device
    bs = max(1, min(config.train_batch_size, samples_per_step))
    per_step = -(-samples_per_step // bs)
    total = steps * per_step
    # importance-sample by weight, then weight the loss uniformly: the same expectation as the
    # weighted loss over all images, with no step spent on a zero-weight image
    p = weights.float().clamp_min(0)
    pick = torch.multinomial(p / p.sum(), total * bs, replacement=True, generator=generator)
    # the noisiest ceil(fraction * T) steps (index 0 is the noisiest): the content the person
    # marked is decided there; the last steps only add the samples' fine grain
    t_idx = torch.randint(max(1, math.ceil(config.denoise_fraction * T)), (total * bs,),
                          generator=generator)
    idx = torch.zeros(n, dtype=torch.long) if index is None else index.long().cpu()
    ones = torch.ones(bs)

    def backward(j: int) -> dict:
        sl = slice(j * bs, (j + 1) * bs)
        i = pick[sl]
        noise = torch.randn((len(i), *x0.shape[1:]), generator=generator).to(dev)
        with _autocast(config, dev):
            loss = denoising_loss(denoiser, x0[i.to(dev)], ones[:len(i)], schedule, t_idx[sl],
                                  noise, idx[i].to(dev))
        (loss / per_step).backward()
        return {"loss": loss.item()}

    return _optimizer_loop(popt, total, per_step, backward, callback)
