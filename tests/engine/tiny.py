"""A tiny diffusers UNet backend for engine tests (random weights, built from a config)."""
import zlib

import torch
from diffusers import UNet2DConditionModel

from hero_engine.backends import DiffusersBackend
from hero_engine.harness.evaluator import SimulatedEvaluator
from hero_engine.session import HeroConfig
from hero_engine.policy import PolicyConfig
from hero_engine.representation import RepresentationConfig


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
        attention_head_dim=4)


def encode(prompts):
    out = []
    for p in prompts:
        g = torch.Generator().manual_seed(zlib.crc32(p.encode()))
        out.append(torch.randn(4, 16, generator=g))
    return torch.stack(out)


def decode(x):
    return torch.sigmoid(x[:, :3] * 2)


def tiny_backend(seed=0):
    ac = torch.cumprod(1 - torch.linspace(0.00085, 0.012, 1000), 0)
    return DiffusersBackend(tiny_unet(seed), encode, decode, ac, (4, 8, 8), ["a red thing"],
                            guidance_scale=3.0, rank=2, alpha=2.0, family="toy")


def tiny_config(**kw):
    base = dict(batch_size=6, steps=4, budget=18, seed=0,
                policy=PolicyConfig(lr=1e-3, timesteps_per_sample=2, grad_accum=2),
                representation=RepresentationConfig(epochs=5, lr=1e-4))
    base.update(kw)
    return HeroConfig(**base)


def redness(images, prompts):
    return images[:, 0].mean(dim=(1, 2)) - images[:, 1:].mean(dim=(1, 2, 3))


def evaluator():
    return SimulatedEvaluator(redness, threshold=0.0)


def query_fn(be, ev, session):
    """The simulated person's answer for ``loop.run_round``: marks and the new best's score."""
    def q(batch):
        best = session.best
        m, scores = ev.query(batch.images, be.prompts, None if best is None else best.score)
        return m, (float(scores[m.best]) if m.best is not None else None)
    return q


def train_again(session):
    """Train the session's round in progress from its saved marks on a fresh tiny backend (what a
    restarted host does) and commit it; returns the backend."""
    from hero_engine import loop
    be = tiny_backend()
    be.load_session(session)
    plan = loop.prepare_learning(session)
    popt = be.policy_optimizer(session)
    loop.apply_policy_update(session, plan, be.denoiser(), popt,
                             conditional=be.denoiser(guidance_scale=1.0))   # as run_round does
    loop.complete_round(session, plan, be.lora_tensors(), popt)
    return be
