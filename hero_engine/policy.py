"""Policy update on the LoRA parameters: clipped PPO as in DDPO (hero_spec 7.5), and the D3PO loss
(Yang et al. 2024) for the baseline.

PPO, per stored transition (sample i, timestep t) with advantage A_i:

    rho = exp(log pi_theta(x_t' | x_t) - log pi_old(x_t' | x_t))
    L = mean max(-A rho, -A clip(rho, 1 - c, 1 + c)),        c = 1e-4

Each sample trains ``k`` distinct random timesteps of its chain (HERO: 5 of 50); gradients are
accumulated over ``grad_accum * k`` backward passes, then clipped to ``max_grad_norm`` and AdamW
(state kept across rounds) steps.

D3PO, per (good w, bad l) pair and timestep t, with the sampling policy as reference:

    L = -log sigmoid(beta * [log rho(w) - log rho(l)]),   rho = clip(pi_theta / pi_old, 1 - eps, 1 + eps)

A non-finite loss or gradient rejects the whole update: the parameters and optimizer state are
restored and ``UpdateRejected`` says what happened and what to change.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from .sampling import Denoiser, Trajectory, trajectory_log_prob

__all__ = ["PolicyConfig", "PolicyOptimizer", "ppo_update", "d3po_update", "UpdateRejected"]


class UpdateRejected(RuntimeError):
    """The update produced NaN/inf; the previous LoRA and optimizer state were kept."""


@dataclass
class PolicyConfig:
    lr: float = 1e-3
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 1e-4
    adam_eps: float = 1e-8
    train_batch_size: int = 2
    grad_accum: int = 4
    timesteps_per_sample: int = 5
    clip_range: float = 1e-4
    epochs: int = 1           # passes over the round's chains (DDPO's num_inner_epochs; HERO: 1)
    denoise_steps: int = 100  # update "rwr": AdamW steps per round, each over
                              # train_batch_size x grad_accum marked images (denoising.py)
    denoise_fraction: float = 0.5  # update "rwr": the noisiest share of the schedule's steps
                                   # trained (1: all; 0.5: the upper half, content not grain)
    lr_schedule: str = "constant"  # "cosine": each round's update decays lr to 0 (cosine)
    adv_clip: float = 5.0
    max_grad_norm: float = 1.0
    d3po_beta: float = 0.1
    d3po_eps: float = 0.1     # D3PO's ratio clip (yk7333/d3po config.train.eps)
    mixed_precision: str = "auto"  # auto: fp16 autocast on CUDA, fp32 elsewhere; "no" | "fp16" | "bf16"
    # memory modes (memory.py): how the update fits the card; none changes what is learned
    micro_batch: int = 0      # images per backward pass; 0: sized from the free memory (CUDA)
    gradient_checkpointing: bool = False
    chains_on: str = "cpu"    # "cpu": chains stay in host memory (fp16), "device": on the card
    release_models: bool = True  # ComfyUI: unload the VAE and text encoders during the update

    def validate(self) -> "PolicyConfig":
        if self.mixed_precision not in ("auto", "no", "fp16", "bf16"):
            raise ValueError(f"precision must be auto, no, fp16 or bf16, got "
                             f"{self.mixed_precision!r}")
        if self.chains_on not in ("cpu", "device"):
            raise ValueError(f"chains_on must be 'cpu' or 'device', got {self.chains_on!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got "
                             f"{self.lr_schedule!r}")
        if self.micro_batch < 0:
            raise ValueError(f"micro_batch must be 0 (auto) or more, got {self.micro_batch}")
        return self


class PolicyOptimizer:
    """AdamW over the LoRA parameters (ordered by name, so its state can be saved and restored)."""

    def __init__(self, params: dict[str, torch.nn.Parameter], config: PolicyConfig):
        if not params:
            raise ValueError("no trainable LoRA parameters were given to the policy optimizer")
        self.names = sorted(params)
        self.params = [params[n] for n in self.names]
        self.config = config
        self.opt = torch.optim.AdamW(self.params, lr=config.lr,
                                     betas=(config.adam_beta1, config.adam_beta2),
                                     weight_decay=config.weight_decay, eps=config.adam_eps)

    def state_dict(self) -> dict:
        return {"names": self.names, "opt": self.opt.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        if list(sd["names"]) != self.names:
            raise ValueError("the saved policy optimizer belongs to a different set of LoRA "
                             "parameters (rank or target layers changed); start a new session")
        self.opt.load_state_dict(sd["opt"])

    def snapshot(self) -> tuple[list[Tensor], dict]:
        return [p.detach().clone() for p in self.params], copy.deepcopy(self.opt.state_dict())

    def restore(self, snap: tuple[list[Tensor], dict]) -> None:
        with torch.no_grad():
            for p, v in zip(self.params, snap[0]):
                p.copy_(v)
        self.opt.load_state_dict(snap[1])


def _autocast(config: PolicyConfig, device: torch.device):
    mp = config.mixed_precision
    if mp == "auto":
        mp = "fp16" if device.type == "cuda" else "no"
    if mp == "no":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.float16 if mp == "fp16" else torch.bfloat16)


def _train_plan(n: int, T: int, k: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Shuffled sample order [n] and, per sample, k distinct timestep indices [n, k]."""
    if not 1 <= k <= T:
        raise ValueError(f"timesteps_per_sample must be in 1..{T} (the number of sampling steps), "
                         f"got {k}")
    order = torch.randperm(n, generator=generator)
    steps = torch.stack([torch.randperm(T, generator=generator)[-k:].flip(0) for _ in range(n)])
    return order, steps


def _optimizer_loop(popt: PolicyOptimizer, n_backward: int, per_step: int,
                    backward_fn: Callable[[int], dict], callback=None) -> dict:
    """Run ``backward_fn(j)`` for j < n_backward, stepping every ``per_step`` backwards.
    Restores the previous state and raises ``UpdateRejected`` on a non-finite loss or grad."""
    config = popt.config
    snap = popt.snapshot()
    popt.opt.zero_grad(set_to_none=True)
    stats: dict[str, list[float]] = {}
    steps = 0
    n_steps = -(-n_backward // per_step)

    # not torch.optim.lr_scheduler: its schedulers keep their own state and write "initial_lr"
    # into the param groups, which a saved and restored optimizer state would carry across rounds
    def set_lr(k: int) -> None:
        """lr_k = lr (constant) or lr * (1 + cos(pi * k / K)) / 2 for step k of K (cosine)."""
        f = 1.0 if config.lr_schedule == "constant" else (1 + math.cos(math.pi * k / n_steps)) / 2
        for g in popt.opt.param_groups:
            g["lr"] = config.lr * f

    try:
        for j in range(n_backward):
            out = backward_fn(j)
            for key, v in out.items():
                stats.setdefault(key, []).append(float(v))
            if not math.isfinite(out["loss"]):
                raise UpdateRejected("policy loss became NaN/inf")
            last = j == n_backward - 1
            if (j + 1) % per_step == 0 or last:
                norm = torch.nn.utils.clip_grad_norm_(popt.params, config.max_grad_norm)
                if not torch.isfinite(norm):
                    raise UpdateRejected("policy gradient became NaN/inf")
                set_lr(steps)
                popt.opt.step()
                popt.opt.zero_grad(set_to_none=True)
                steps += 1
                if not all(torch.isfinite(p).all() for p in popt.params):
                    raise UpdateRejected("LoRA weights became NaN/inf")
            if callback is not None:
                callback(j + 1, n_backward)
    except BaseException as e:   # noqa: BLE001 - out of memory, interrupted: keep the old LoRA
        popt.restore(snap)
        if not isinstance(e, UpdateRejected):
            raise
        raise UpdateRejected(f"{e}; the update was rejected and the previous LoRA kept. "
                             f"Lower the learning rate (now {config.lr:g}) or use fp32 training, "
                             f"then train the round again (its marks are saved).") from None
    finally:
        set_lr(0)
    res = {k: sum(v) / len(v) for k, v in stats.items()}
    res["optimizer_steps"] = steps
    res["backward_passes"] = n_backward
    return res


def ppo_update(denoiser: Denoiser, traj: Trajectory, advantages: Tensor, popt: PolicyOptimizer,
               generator: torch.Generator, callback: Optional[Callable[[int, int], None]] = None,
               device=None) -> dict:
    """``epochs`` PPO epochs (HERO: one) over the round's trajectories (hero_spec 7.5). Returns
    mean loss, ratio, clip fraction, approx KL, and the step counts. ``device``: where the
    denoiser runs (default: the chains')."""
    config = popt.config
    n, T = traj.log_probs.shape
    if advantages.shape != (n,):
        raise ValueError(f"need one advantage per trajectory ({n}), got {tuple(advantages.shape)}")
    k = min(config.timesteps_per_sample, T)
    bs = config.train_batch_size
    mbs, steps = [], []
    for _ in range(max(1, config.epochs)):   # every epoch: a new order and new timesteps
        order, st = _train_plan(n, T, k, generator)
        mbs += [order[s:s + bs] for s in range(0, n, bs)]
        steps += [st] * len(range(0, n, bs))
    adv = advantages.float().clamp(-config.adv_clip, config.adv_clip)
    dev = traj.latents.device if device is None else torch.device(device)

    def backward(j: int) -> dict:
        mb, kk = mbs[j // k], j % k
        step_idx = steps[j // k][mb, kk]
        with _autocast(config, dev):
            logp = trajectory_log_prob(denoiser, traj, mb, step_idx, dev)
        old = traj.log_probs[mb.to(traj.log_probs.device),
                             step_idx.to(traj.log_probs.device)].to(logp.device)
        a = adv[mb].to(logp.device)
        ratio = torch.exp(logp.float() - old)
        unclipped = -a * ratio
        clipped = -a * ratio.clamp(1 - config.clip_range, 1 + config.clip_range)
        loss = torch.maximum(unclipped, clipped).mean()
        (loss / (config.grad_accum * k)).backward()
        return {"loss": loss.item(), "ratio": ratio.mean().item(),
                "clipfrac": ((ratio - 1).abs() > config.clip_range).float().mean().item(),
                "approx_kl": (0.5 * (logp.float() - old) ** 2).mean().item()}

    return _optimizer_loop(popt, len(mbs) * k, config.grad_accum * k, backward, callback)


def d3po_pairs(good: list[int], bad: list[int], n_pairs: int, generator: torch.Generator
               ) -> tuple[Tensor, Tensor]:
    """(preferred, rejected) batch-index pairs, drawn uniformly from good x bad."""
    w = torch.tensor(good)[torch.randint(len(good), (n_pairs,), generator=generator)]
    l_ = torch.tensor(bad)[torch.randint(len(bad), (n_pairs,), generator=generator)]
    return w, l_


def d3po_update(denoiser: Denoiser, traj: Trajectory, good: list[int], bad: list[int],
                popt: PolicyOptimizer, generator: torch.Generator,
                callback: Optional[Callable[[int, int], None]] = None, device=None) -> dict:
    """One D3PO epoch over len(traj)/2 (good, bad) pairs, ``k`` shared timesteps per pair."""
    config = popt.config
    n, T = traj.log_probs.shape
    if not good or not bad:
        raise ValueError("D3PO needs at least one good and one bad image")
    k = min(config.timesteps_per_sample, T)
    n_pairs = max(1, n // 2)
    w, l_ = d3po_pairs(good, bad, n_pairs, generator)
    steps = torch.stack([torch.randperm(T, generator=generator)[:k] for _ in range(n_pairs)])
    bs = max(1, config.train_batch_size // 2)
    mbs = [torch.arange(s, min(s + bs, n_pairs)) for s in range(0, n_pairs, bs)]
    dev = traj.latents.device if device is None else torch.device(device)

    def backward(j: int) -> dict:
        pi, kk = mbs[j // k], j % k
        step_idx = steps[pi, kk]
        idx = torch.cat([w[pi], l_[pi]])
        with _autocast(config, dev):
            logp = trajectory_log_prob(denoiser, traj, idx, step_idx.repeat(2), dev)
        lp_dev = traj.log_probs.device
        old = traj.log_probs[idx.to(lp_dev), step_idx.repeat(2).to(lp_dev)].to(logp.device)
        # the authors clip each probability ratio to [1 - eps, 1 + eps] (their "Q-value" bound):
        # outside it the pair gives no gradient, a trust region around the sampling policy
        lo, hi = math.log(1 - config.d3po_eps), math.log(1 + config.d3po_eps)
        diff = (logp.float() - old).clamp(lo, hi)
        m = len(pi)
        margin = config.d3po_beta * (diff[:m] - diff[m:])
        loss = -torch.nn.functional.logsigmoid(margin).mean()
        (loss / (config.grad_accum * k)).backward()
        return {"loss": loss.item(), "margin": margin.mean().item()}

    return _optimizer_loop(popt, len(mbs) * k, config.grad_accum * k, backward, callback)
