"""Stochastic DDIM(eta) as a Gaussian policy, with per-step log-probs (DDPO convention).

One denoising step t -> t' of DDIM (Song et al. 2021), in VP space
(x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps):

    x0_hat = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)
    sigma_t^2 = (1 - abar_t') / (1 - abar_t) * (1 - abar_t / abar_t')
    s_t = eta * sigma_t
    mu = sqrt(abar_t') x0_hat + sqrt(1 - abar_t' - s_t^2) eps_hat
    x_t' = mu + s_t z,   z ~ N(0, I)

log pi(x_t' | x_t) is the Gaussian log-density *averaged* over latent elements (not summed), as
in ddpo-pytorch's ``ddim_with_logprob``; the PPO clip range of 1e-4 is calibrated for that mean.

The math is written here rather than taken from diffusers' ``DDIMScheduler.step`` because that
step returns only the sample, not the Gaussian's mean and std, and it works on a single timestep
for the whole batch (the PPO update needs a different timestep per sample). ``tests`` check this
module against ``DDIMScheduler`` (eta=0 step, eta=1 variance, timesteps).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import torch
from torch import Tensor

__all__ = [
    "Denoiser", "DDIMSchedule", "Trajectory", "ddim_step_gaussian", "gaussian_log_prob",
    "sample_with_logprob", "trajectory_log_prob",
]


class Denoiser(Protocol):
    """eps_hat = denoiser(x_t, t, abar_t, index), classifier-free guidance already applied.

    x: VP-space latents [B, C, H, W]; t: integer training timesteps [B]; alpha_bar: abar_t [B];
    index: the samples' positions in the round's batch [B] (selects per-sample conditioning).
    """

    def __call__(self, x: Tensor, t: Tensor, alpha_bar: Tensor, index: Tensor) -> Tensor: ...


@dataclass
class DDIMSchedule:
    """The T steps of a sampler: step i goes from ``alpha_bars[i]`` (at integer timestep
    ``timesteps[i]``) to ``alpha_bars[i + 1]``. ``timesteps`` is descending, ``alpha_bars`` has T+1
    entries."""

    timesteps: Tensor  # long [T]
    alpha_bars: Tensor  # float64 [T + 1]

    def __post_init__(self):
        self.timesteps = torch.as_tensor(self.timesteps, dtype=torch.long).flatten()
        self.alpha_bars = torch.as_tensor(self.alpha_bars, dtype=torch.float64).flatten()
        if len(self.alpha_bars) != len(self.timesteps) + 1:
            raise ValueError(
                f"DDIMSchedule needs len(alpha_bars) == len(timesteps) + 1, got "
                f"{len(self.alpha_bars)} and {len(self.timesteps)}")
        if len(self.timesteps) < 1:
            raise ValueError("DDIMSchedule needs at least one step; set steps >= 1")
        ab = self.alpha_bars
        if not bool(((ab > 0) & (ab <= 1)).all()):
            raise ValueError("alpha_bars must lie in (0, 1]")
        if not bool((ab[1:] > ab[:-1]).all()):
            raise ValueError("alpha_bars must increase along the schedule (noise decreases)")

    def __len__(self) -> int:
        return len(self.timesteps)

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: Tensor, num_steps: int, steps_offset: int = 1,
                            final_alpha: Optional[float] = None) -> "DDIMSchedule":
        """diffusers DDIM timesteps ("leading" spacing + ``steps_offset``), e.g. 50 steps of a
        1000-step schedule -> 981, 961, ..., 1. The last step goes to ``final_alpha``; the default
        ``alphas_cumprod[0]`` is diffusers' ``set_alpha_to_one=False`` (SD1.5's config);
        ``final_alpha=1.0`` ends on the clean sample (no noise in the last step)."""
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        n_train = len(ac)
        if not 1 <= num_steps <= n_train:
            raise ValueError(f"num_steps must be in 1..{n_train}, got {num_steps}")
        ratio = n_train // num_steps
        ts = (torch.arange(num_steps, dtype=torch.long) * ratio).flip(0) + steps_offset
        ts = ts.clamp(max=n_train - 1)
        prev = ts - ratio
        fa = float(ac[0]) if final_alpha is None else float(final_alpha)
        ab_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], torch.tensor(fa, dtype=torch.float64))
        return cls(ts, torch.cat([ac[ts[:1]], ab_prev]))

    @classmethod
    def from_sigmas(cls, sigmas: Tensor, training_sigmas: Tensor) -> "DDIMSchedule":
        """ComfyUI / k-diffusion sigmas (x_k = x_0 + sigma eps) -> VP schedule,
        abar = 1 / (1 + sigma^2). ComfyUI's ``ddim_uniform`` ends at sigma = 0 (abar = 1, a
        deterministic last step with no log-prob); we replace that final 0 by the smallest
        training sigma (abar_0), which is exactly diffusers' SD1.5 DDIM (set_alpha_to_one=False).
        Integer timesteps are the nearest training sigmas (``training_sigmas`` ascending [1000])."""
        sig = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
        train = torch.as_tensor(training_sigmas, dtype=torch.float64).flatten()
        if len(sig) < 2:
            raise ValueError("need at least two sigmas (one step)")
        if float(sig[-1]) <= 0:
            sig = sig.clone()
            sig[-1] = train[0]
        log_t = train.log()
        ts = torch.stack([(log_t - s.log()).abs().argmin() for s in sig[:-1]]).long()
        return cls(ts, 1.0 / (1.0 + sig ** 2))


def _bcast(v: Tensor, x: Tensor) -> Tensor:
    return v.to(dtype=x.dtype, device=x.device).reshape(-1, *([1] * (x.dim() - 1)))


def ddim_step_gaussian(x_t: Tensor, eps: Tensor, ab_t: Tensor, ab_prev: Tensor, eta: float
                       ) -> tuple[Tensor, Tensor]:
    """Mean and std of the DDIM(eta) transition x_t -> x_t' (see the module docstring).
    ``ab_t``/``ab_prev`` are per-sample [B] (or scalars)."""
    ab_t = torch.as_tensor(ab_t, dtype=torch.float64, device=x_t.device).expand(x_t.shape[0])
    ab_prev = torch.as_tensor(ab_prev, dtype=torch.float64, device=x_t.device).expand(x_t.shape[0])
    var = (1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)
    std = eta * var.clamp(min=0).sqrt()
    x0_hat = (x_t - _bcast((1 - ab_t).sqrt(), x_t) * eps) / _bcast(ab_t.sqrt(), x_t)
    dir_coef = (1 - ab_prev - std ** 2).clamp(min=0).sqrt()
    mean = _bcast(ab_prev.sqrt(), x_t) * x0_hat + _bcast(dir_coef, x_t) * eps
    return mean, _bcast(std, x_t)


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """log N(x; mean, std^2), averaged over all non-batch elements -> [B]."""
    std = std.to(torch.float32)
    lp = (-((x.float() - mean.float()) ** 2) / (2 * std ** 2) - std.log()
          - 0.5 * math.log(2 * math.pi))
    return lp.mean(dim=tuple(range(1, x.dim())))


@dataclass
class Trajectory:
    """A batch of sampled denoising chains: ``latents[:, i]`` is x before step i,
    ``latents[:, -1]`` the final sample; ``log_probs[:, i]`` = log pi_old(latents[:, i+1] | latents[:, i])."""

    latents: Tensor  # [B, T+1, C, H, W]
    log_probs: Tensor  # [B, T] float32
    schedule: DDIMSchedule
    eta: float

    @property
    def x0(self) -> Tensor:
        return self.latents[:, -1]

    @property
    def x_T(self) -> Tensor:
        return self.latents[:, 0]

    def feature_latents(self, kind: str = "x0") -> Tensor:
        """Input of the representation network: the final latent (``x0``, our default, hero_spec
        11.1) or the latent entering the last step (``t1``, the official code)."""
        if kind == "x0":
            return self.latents[:, -1]
        if kind == "t1":
            return self.latents[:, -2]
        raise ValueError(f"feature latent kind must be 'x0' or 't1', got {kind!r}")

    def __len__(self) -> int:
        return self.latents.shape[0]


@torch.no_grad()
def sample_with_logprob(denoiser: Denoiser, x_T: Tensor, schedule: DDIMSchedule, eta: float = 1.0,
                        generator: Optional[torch.Generator] = None,
                        callback: Optional[Callable[[int, int], None]] = None,
                        index: Optional[Tensor] = None, store_dtype: torch.dtype = torch.float32,
                        ) -> Trajectory:
    """Run the DDIM(eta) chain from ``x_T`` and record every transition and its log-prob.
    The chain is held at ``store_dtype`` (a session stores fp16: pass torch.float16), so the
    stored latents are exactly the ones the log-probs were computed on.
    ``callback(step, total)`` is called after each step (progress bars, interrupts)."""
    if x_T.dim() != 4:
        raise ValueError(f"x_T must be [B, C, H, W], got shape {tuple(x_T.shape)}")
    if x_T.shape[0] == 0:
        raise ValueError("empty batch: batch_size must be at least 1")
    B = x_T.shape[0]
    idx = torch.arange(B, device=x_T.device) if index is None else index.to(x_T.device)
    x = x_T.to(store_dtype).float()
    latents = [x.to(store_dtype)]
    log_probs = []
    for i in range(len(schedule)):
        t = schedule.timesteps[i].expand(B).to(x.device)
        ab_t, ab_prev = schedule.alpha_bars[i], schedule.alpha_bars[i + 1]
        eps = denoiser(x, t, torch.full((B,), float(ab_t), device=x.device), idx).float()
        mean, std = ddim_step_gaussian(x, eps, ab_t, ab_prev, eta)
        noise = torch.randn(x.shape, generator=generator, device=x.device if generator is None
                            else generator.device, dtype=torch.float32).to(x.device)
        # the chain itself is held at ``store_dtype``: what is stored is exactly what the next
        # step and the log-prob saw, so a recomputed log-prob equals the stored one (ratio 1)
        x_prev = (mean + std * noise).to(store_dtype).float()
        if eta > 0:
            log_probs.append(gaussian_log_prob(x_prev, mean, std))
        else:
            log_probs.append(torch.zeros(B, device=x.device))
        x = x_prev
        latents.append(x.to(store_dtype))
        if callback is not None:
            callback(i + 1, len(schedule))
    return Trajectory(torch.stack(latents, 1), torch.stack(log_probs, 1).float(), schedule, eta)


def trajectory_log_prob(denoiser: Denoiser, traj: Trajectory, sample_idx: Tensor, step_idx: Tensor,
                        device=None) -> Tensor:
    """Recompute log pi_theta of stored transitions (sample ``sample_idx[b]``, step ``step_idx[b]``)
    under the current ``denoiser`` (with grad, for the PPO ratio) -> [B]. ``device``: where the
    denoiser runs (default: the chains'); chains kept on the CPU move one micro-batch at a time."""
    sched = traj.schedule
    dev = traj.latents.device if device is None else torch.device(device)
    src = traj.latents.device
    x_t = traj.latents[sample_idx.to(src), step_idx.to(src)].to(dev).float()
    x_prev = traj.latents[sample_idx.to(src), step_idx.to(src) + 1].to(dev).float()
    sample_idx, step_idx = sample_idx.to(dev), step_idx.to(dev)
    ab_t = sched.alpha_bars.to(dev)[step_idx]
    ab_prev = sched.alpha_bars.to(dev)[step_idx + 1]
    t = sched.timesteps.to(dev)[step_idx]
    eps = denoiser(x_t, t, ab_t.float(), sample_idx).float()
    mean, std = ddim_step_gaussian(x_t, eps, ab_t, ab_prev, traj.eta)
    return gaussian_log_prob(x_prev, mean, std)
