"""Standalone backend: a diffusers ``UNet2DConditionModel`` with a peft LoRA (the toy model, a
diffusers SD pipeline's UNet). The ComfyUI backend lives in ``nodes/host.py``."""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
from torch import Tensor

from . import lora as lora_mod
from . import toy as _toy  # noqa: F401  (registers the toy LoRA family, this backend's default)
from .policy import PolicyOptimizer
from .sampling import DDIMSchedule, Denoiser, sample_with_logprob
from .session import Session

__all__ = ["DiffusersBackend", "cfg_denoiser"]


def cfg_denoiser(unet, cond: Tensor, uncond: Tensor, guidance_scale: float) -> Denoiser:
    """Classifier-free guidance: eps_hat = eps(x, t, "") + guidance_scale (eps(x, t, c) -
    eps(x, t, "")), one batched UNet call.
    ``cond`` is [1 or N, L, D]; the sample's ``index`` picks its row when there are N."""

    def denoiser(x: Tensor, t: Tensor, alpha_bar: Tensor, index: Tensor) -> Tensor:
        b = x.shape[0]
        c = cond.expand(b, -1, -1) if cond.shape[0] == 1 else cond[index.to(cond.device)]
        u = uncond.expand(b, -1, -1)
        dtype = next(unet.parameters()).dtype
        if guidance_scale == 1.0:   # eps(x, t, c) alone, as ComfyUI skips the unconditional pass
            return unet(x.to(dtype), t, encoder_hidden_states=c.to(dtype)).sample.float()
        out = unet(torch.cat([x, x]).to(dtype), torch.cat([t, t]),
                   encoder_hidden_states=torch.cat([u, c]).to(dtype)).sample.float()
        eps_u, eps_c = out.chunk(2)
        return eps_u + guidance_scale * (eps_c - eps_u)

    return denoiser


class DiffusersBackend:
    """Drives the engine on a diffusers UNet. ``encode_prompts(list[str]) -> [B, L, D]``;
    ``decode(latents) -> images [B, 3, H, W] in [0, 1]``."""

    def __init__(self, unet, encode_prompts: Callable[[list[str]], Tensor],
                 decode: Callable[[Tensor], Tensor], alphas_cumprod: Tensor,
                 latent_shape: tuple[int, ...], prompts: list[str], guidance_scale: float,
                 rank: int = 4, alpha: float = 4.0, family: str = "toy", device="cpu",
                 lora_seed: int = 0, targets: tuple[str, ...] = lora_mod.DEFAULT_TARGETS):
        self.unet = unet.to(device)
        self.unet.requires_grad_(False)
        self.encode_prompts = encode_prompts
        self.decode = decode
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod)
        self.latent_shape = tuple(latent_shape)
        self.prompts = list(prompts)
        self.guidance_scale = guidance_scale
        self.family = family
        self.alpha = float(alpha)
        self.device = torch.device(device)
        lora_mod.add_lora(self.unet, rank=rank, alpha=alpha, seed=lora_seed, targets=targets)
        self._initial = self.lora_tensors()
        with torch.no_grad():
            self._cond = encode_prompts(self.prompts).to(self.device)
            self._uncond = encode_prompts([""]).to(self.device)

    # -- LoRA state
    def lora_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.unet.named_parameters() if ".lora_" in n}

    def lora(self) -> "lora_mod.LoraState":
        """The LoRA on the UNet now (module names = diffusers names, the family's kohya names)."""
        return lora_mod.state_from_peft(self.unet, family=self.family)

    def lora_tensors(self) -> dict[str, Tensor]:
        """The LoRA now in the form the session stores (``LoraState.to_tensors()``)."""
        return self.lora().to_tensors()

    def load_lora_tensors(self, tensors: Optional[dict[str, Tensor]]) -> None:
        """Load a session's stored LoRA (``None``: back to the initial LoRA, B = 0); sessions
        from older versions, which stored the peft parameters, are read too."""
        tensors = self._initial if tensors is None else tensors
        try:
            lora = lora_mod.read_session_lora(tensors, family=self.family, alpha=self.alpha)
            lora_mod.load_state_into_peft(self.unet, lora)
        except lora_mod.LoraFormatError as e:
            raise ValueError(f"the session's LoRA does not fit this model (different rank or "
                             f"target layers); use the model and settings the session was made "
                             f"with ({e})") from None

    def load_session(self, session: Session) -> None:
        self.load_lora_tensors(session.load_state(("lora",)).get("lora"))

    def policy_optimizer(self, session: Session) -> PolicyOptimizer:
        popt = PolicyOptimizer(self.lora_parameters(), session.config.policy)
        st = session.load_state()
        if "policy_opt" in st:
            popt.load_state_dict(st["policy_opt"])
        return popt

    @contextlib.contextmanager
    def training(self, config):
        """The update's memory modes on this UNet (memory.py): with ``gradient_checkpointing``
        diffusers recomputes each block's activations in the backward pass."""
        on = bool(config.gradient_checkpointing)
        if on:
            self.unet.enable_gradient_checkpointing()
        try:
            yield
        finally:
            if on:
                self.unet.disable_gradient_checkpointing()

    # -- sampling
    def schedule(self, steps: int) -> DDIMSchedule:
        return DDIMSchedule.from_alphas_cumprod(self.alphas_cumprod, steps)

    def denoiser(self, prompts: Optional[list[str]] = None,
                 guidance_scale: Optional[float] = None) -> Denoiser:
        """The guided sampler's prediction (``guidance_scale``: default the backend's; 1.0: the
        conditional prediction alone, what reward-weighted denoising trains)."""
        cond = self._cond if prompts is None else self.encode_prompts(prompts).to(self.device)
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        return cfg_denoiser(self.unet, cond, self._uncond, scale)

    @contextlib.contextmanager
    def merged_lora(self):
        """Sampling without gradients with the LoRA folded into the weights, W' = W + (alpha/r) B A
        (peft's ``merge``): one matmul a layer instead of three, about 15% faster on the toy.
        The base weights are copied back exactly afterwards: peft's ``unmerge`` subtracts the
        delta again, which leaves rounding drift in W. Not for the generation whose log-probs
        the PPO update recomputes unmerged: the ratio would start off 1 by rounding."""
        from peft.tuners.lora import LoraLayer
        layers = [m for m in self.unet.modules() if isinstance(m, LoraLayer) and not m.merged]
        # the copies wait in host memory: on an 8 GB card SD1.5's LoRA-wrapped weights would
        # otherwise take about another 0.5 GB of it while sampling
        saved = [(m, m.get_base_layer().weight.detach().to("cpu", copy=True)) for m in layers]
        try:
            for m in layers:
                m.merge()
            yield
        finally:
            for m, w in saved:
                if m.merged:
                    m.unmerge()   # peft's bookkeeping (merged_adapters); W is restored below
                m.get_base_layer().weight.data.copy_(w)

    @torch.no_grad()
    def sample_fresh(self, n: int, steps: int, seed: int, eta: float = 1.0,
                     prompts: Optional[list[str]] = None, micro_batch: int = 64,
                     x_T: Optional[Tensor] = None) -> Tensor:
        """Images from fresh N(0, I) noise (no feedback guidance): the evaluation protocol.
        ``x_T`` replaces the fresh noise (e.g. a session's guided noise). The LoRA is merged
        for the duration (``merged_lora``)."""
        g = torch.Generator().manual_seed(seed)
        x = torch.randn((n, *self.latent_shape), generator=g) if x_T is None else x_T.float()
        den = self.denoiser(prompts)
        out = []
        with self.merged_lora():
            for s in range(0, n, micro_batch):
                idx = torch.arange(s, min(n, s + micro_batch))
                tr = sample_with_logprob(den, x[idx].to(self.device), self.schedule(steps), eta,
                                         generator=g, index=idx.to(self.device) % len(self._cond))
                out.append(self.decode(tr.x0).float().clamp(0, 1).cpu())
        return torch.cat(out)
