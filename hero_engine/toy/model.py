"""The toy model: pixel-space diffusion (latent = 2 * image - 1, 3x32x32) with a small diffusers
``UNet2DConditionModel`` and the tiny word-level text encoder of ``text.py``.

``load_toy_model()`` builds both from ``weights/toy_model.json`` and loads
``weights/toy_model.safetensors`` (keys ``unet.*`` and ``text_encoder.*``); nothing is downloaded.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from .data import vocabulary
from .text import ToyTextEncoder, WordTokenizer

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

UNET_CONFIG = dict(
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=1,
    block_out_channels=(16, 32, 64),  # 32x32 -> 16x16 -> 8x8; attention (self + cross) at 8x8 + mid
    down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    cross_attention_dim=64, attention_head_dim=16, norm_num_groups=8,
    resnet_time_scale_shift="scale_shift",  # AdaGN time conditioning (helps a small model)
)
TEXT_CONFIG = dict(max_length=12, dim=64, layers=2, heads=4)
# SD1.5's schedule (DDPMScheduler-compatible): scaled_linear betas, 1000 steps, epsilon prediction
SCHEDULE_CONFIG = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                       beta_end=0.012, prediction_type="epsilon")


def default_config() -> dict:
    """The full model config (what train.py writes to toy_model.json)."""
    return {
        "unet": dict(UNET_CONFIG),
        "text_encoder": dict(TEXT_CONFIG, vocab=vocabulary()),
        "scheduler": dict(SCHEDULE_CONFIG),
        "latent_shape": [3, 32, 32],
        # "default_cfg": the default guidance scale (the key toy_model.json has)
        "default_steps": 20, "default_cfg": 3.0, "default_eta": 1.0,
    }


def make_alphas_cumprod(sched: dict) -> Tensor:
    """alphas_cumprod [T] float32 for a DDPMScheduler-style config (linear / scaled_linear betas)."""
    n, b0, b1 = sched["num_train_timesteps"], sched["beta_start"], sched["beta_end"]
    if sched["beta_schedule"] == "linear":
        betas = torch.linspace(b0, b1, n, dtype=torch.float32)
    elif sched["beta_schedule"] == "scaled_linear":
        betas = torch.linspace(b0 ** 0.5, b1 ** 0.5, n, dtype=torch.float32) ** 2
    else:
        raise ValueError(f"unsupported beta_schedule {sched['beta_schedule']!r}")
    return torch.cumprod(1.0 - betas, dim=0)


class ToyModel:
    """UNet + text encoder + schedule; ``denoiser(prompts, guidance_scale)`` gives the engine's
    Denoiser."""

    def __init__(self, config: dict, unet=None, text_encoder=None):
        from diffusers import UNet2DConditionModel

        self.config = config
        self.unet = unet if unet is not None else UNet2DConditionModel(**config["unet"])
        tc = config["text_encoder"]
        self.tokenizer = WordTokenizer(tc["vocab"], tc["max_length"])
        self.text_encoder = text_encoder if text_encoder is not None else ToyTextEncoder(
            len(self.tokenizer.vocab), tc["max_length"], tc["dim"], tc["layers"], tc["heads"])
        self.alphas_cumprod = make_alphas_cumprod(config["scheduler"])
        self.latent_shape = tuple(config["latent_shape"])
        self.default_steps = int(config.get("default_steps", 20))
        self.default_guidance_scale = float(config.get("default_cfg", 3.0))
        self.default_eta = float(config.get("default_eta", 1.0))

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def to(self, device=None, dtype=None) -> "ToyModel":
        """Move/cast the UNet and the text encoder (the schedule stays float32)."""
        cast = dtype is not None and dtype != self.dtype
        for m in (self.unet, self.text_encoder):
            m.to(device=device, dtype=dtype) if cast else m.to(device)
        return self

    def encode_prompts(self, prompts: list[str]) -> Tensor:
        """[B, L, D] prompt embeddings ("" = unconditional)."""
        ids = self.tokenizer(list(prompts)).to(self.device)
        return self.text_encoder(ids)

    @staticmethod
    def decode(x: Tensor) -> Tensor:
        """Latent (VP space, [-1, 1] scale) -> images in [0, 1]."""
        return ((x + 1) / 2).clamp(0, 1)

    def denoiser(self, prompts: list[str], guidance_scale: float | None = None) -> Callable:
        """The engine's Denoiser: ``eps = d(x, t, alpha_bar, index)`` with CFG
        ``eps_u + guidance_scale * (eps_c - eps_u)``. ``index`` picks each sample's prompt (one prompt broadcasts).
        Prompt embeddings are computed once, without grad; gradients flow through the UNet."""
        scale = self.default_guidance_scale if guidance_scale is None else float(guidance_scale)
        prompts = list(prompts)
        if not prompts:
            raise ValueError("denoiser needs at least one prompt")
        with torch.no_grad():
            cond = self.encode_prompts(prompts)
            uncond = self.encode_prompts([""])
        unet = self.unet

        def denoise(x: Tensor, t: Tensor, alpha_bar: Tensor | None = None, index: Tensor | None = None) -> Tensor:
            b = x.shape[0]
            if len(prompts) == 1 or index is None:
                c = cond[:1].expand(b, -1, -1) if len(prompts) == 1 else cond[:b]
            else:
                c = cond[torch.as_tensor(index, device=cond.device).long()]
            xin = x.to(cond.dtype)
            t = torch.as_tensor(t, device=x.device).long().reshape(-1).expand(b)
            if scale == 1.0:
                eps = unet(xin, t, encoder_hidden_states=c).sample
            else:
                u = uncond.expand(b, -1, -1)
                eps_u, eps_c = unet(torch.cat([xin, xin]), torch.cat([t, t]),
                                    encoder_hidden_states=torch.cat([u, c])).sample.chunk(2)
                eps = eps_u + scale * (eps_c - eps_u)
            return eps.to(x.dtype)

        return denoise


def load_toy_model(device="cpu", dtype=torch.float32, weights_dir: str | Path | None = None) -> ToyModel:
    """Load the committed toy model (offline): config json + safetensors, eval mode, frozen."""
    from safetensors.torch import load_file

    wd = Path(weights_dir) if weights_dir else WEIGHTS_DIR
    config = json.loads((wd / "toy_model.json").read_text())
    model = ToyModel(config)
    sd = load_file(str(wd / "toy_model.safetensors"))
    unet_sd = {k[5:]: v.float() for k, v in sd.items() if k.startswith("unet.")}
    te_sd = {k[13:]: v.float() for k, v in sd.items() if k.startswith("text_encoder.")}
    model.unet.load_state_dict(unet_sd, strict=True)
    model.text_encoder.load_state_dict(te_sd, strict=True)
    model.to(device=device, dtype=dtype)
    for m in (model.unet, model.text_encoder):
        m.eval()
        m.requires_grad_(False)
    return model
