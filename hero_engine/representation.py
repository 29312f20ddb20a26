"""Feedback-Aligned Representation Learning (hero_spec section 5).

Trunk E: three conv3x3 + ReLU blocks (channels C -> 8 -> 16 -> 32), each followed by a 2x2
max-pool while the map is larger than 8x8, then an adaptive average pool to 8x8 (the official code
flattens a fixed 32x8x8 map; this takes any latent size and channel count), flatten (2048) ->
Linear 2048 -> 2048 -> ReLU.  h = E(f) >= 0.
Head g: Linear 2048 -> 2048 -> ReLU -> Linear 2048 -> 1024 -> ReLU -> Linear 1024 -> 512.

Triplet loss on z = g(E(f)) with anchor = best, positive = a good image, negative = a bad image:

    d(u, v) = (1 - cos(u, v)) / 2            (per-sample cosine over the feature axis)
    L = mean_j max(0, d(z_a, z_p_j) - d(z_a, z_n_j) + m),   m = 0.5

The official code took the cosine over the batch axis (``dim=0``, hero_spec 10.2);
``official_dim0_bug=True`` reproduces that for parity experiments only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["RepresentationNet", "triplet_distance", "triplet_loss", "sample_triplets",
           "RepresentationTrainer"]


class RepresentationNet(nn.Module):
    """E (``trunk``) and g (``head``) of hero_spec 5.2 for latents of shape [C, H, W]."""

    def __init__(self, in_channels: int = 4, trunk_dim: int = 2048,
                 head_dims: Sequence[int] = (2048, 1024, 512)):
        super().__init__()
        self.in_channels = in_channels
        self.convs = nn.ModuleList([nn.Conv2d(in_channels, 8, 3, padding=1),
                                    nn.Conv2d(8, 16, 3, padding=1),
                                    nn.Conv2d(16, 32, 3, padding=1)])
        self.trunk_dim = trunk_dim
        self.fc = nn.Linear(32 * 8 * 8, trunk_dim)
        layers: list[nn.Module] = []
        d = trunk_dim
        for i, h in enumerate(head_dims):
            layers.append(nn.Linear(d, h))
            if i < len(head_dims) - 1:
                layers.append(nn.ReLU())
            d = h
        self.head = nn.Sequential(*layers)

    def trunk(self, f: Tensor) -> Tensor:
        """h = E(f) in R^trunk_dim (2048), elementwise >= 0 (reward features)."""
        if f.dim() != 4 or f.shape[1] != self.in_channels:
            raise ValueError(f"representation net expects latents [B, {self.in_channels}, H, W], "
                             f"got {tuple(f.shape)}; the session was created for "
                             f"{self.in_channels}-channel latents")
        x = f.float()
        for conv in self.convs:
            x = F.relu(conv(x))
            if x.shape[-1] > 8 and x.shape[-2] > 8:
                x = F.max_pool2d(x, 2)
        x = F.adaptive_avg_pool2d(x, 8)
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, f: Tensor) -> Tensor:
        """z = g(E(f)) in R^512 (triplet features)."""
        return self.head(self.trunk(f))


def triplet_distance(u: Tensor, v: Tensor, official_dim0_bug: bool = False) -> Tensor:
    """d(u, v) = (1 - cos(u, v)) / 2 per sample, in [0, 1]."""
    return (1 - F.cosine_similarity(u, v, dim=0 if official_dim0_bug else -1)) / 2


def triplet_loss(z_a: Tensor, z_p: Tensor, z_n: Tensor, margin: float = 0.5,
                 official_dim0_bug: bool = False) -> Tensor:
    """mean max(0, d(a, p) - d(a, n) + margin)."""
    d_ap = triplet_distance(z_a, z_p, official_dim0_bug)
    d_an = triplet_distance(z_a, z_n, official_dim0_bug)
    return F.relu(d_ap - d_an + margin).mean()


def sample_triplets(n: int, good: Sequence[int], bad: Sequence[int], best: Optional[int],
                    generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """n (positive, negative) index pairs, uniform with replacement, redrawn every epoch.
    Positives exclude the new best; if no positive is left (the only good image became the best),
    the best image itself is the positive (hero_spec 11.5)."""
    pos = [i for i in good if i != best] or ([best] if best is not None else list(good))
    if not pos or not bad:
        raise ValueError("triplets need at least one good and one bad image")
    p = torch.tensor(pos)[torch.randint(len(pos), (n,), generator=generator)]
    q = torch.tensor(list(bad))[torch.randint(len(bad), (n,), generator=generator)]
    return p, q


@dataclass
class RepresentationConfig:
    lr: float = 1e-5
    epochs: int = 500
    margin: float = 0.5
    batch_size: int = 2048
    official_dim0_bug: bool = False
    trunk_dim: int = 2048            # official: 2048 (sized for 4x64x64 SD latents)
    head_dims: tuple = (2048, 1024, 512)


class RepresentationTrainer:
    """The network and its Adam state, continued across rounds (never re-initialised, hero_spec 5.4)."""

    def __init__(self, in_channels: int, config: RepresentationConfig = RepresentationConfig(),
                 seed: int = 0, device: str | torch.device = "cpu"):
        self.config = config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = RepresentationNet(in_channels, config.trunk_dim,
                                         tuple(config.head_dims)).to(device)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=config.lr, betas=(0.9, 0.999))

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def train_round(self, features: Tensor, best_feature: Tensor, good: Sequence[int],
                    bad: Sequence[int], best: Optional[int], generator: torch.Generator,
                    n_triplets: Optional[int] = None) -> list[float]:
        """``epochs`` Adam steps of the triplet loss on the marked features [N, C, H, W] (this
        round's, or every round's with replay) with anchor = the best feature [C, H, W]
        (possibly from an earlier round). Each step draws ``n_triplets`` triplets (default N).
        Returns the losses."""
        config = self.config
        n_img = features.shape[0]
        n = n_triplets or n_img
        f = features.to(self.device).float()
        a = best_feature.to(self.device).float().unsqueeze(0)
        self.net.train()
        losses = []
        fa = torch.cat([a, f])  # row 0 = anchor, row 1 + i = image i
        for _ in range(config.epochs):
            p, q = sample_triplets(n, good, bad, best, generator)
            for s in range(0, n, config.batch_size):
                pp, qq = p[s:s + config.batch_size], q[s:s + config.batch_size]
                # embed each distinct image once and index the triplets out of it: the same loss
                # and gradient as embedding every (a, p, n) row, at (N + 1) / (2B + 1) the cost
                used = torch.unique(torch.cat([pp, qq]))
                z_used = self.net(torch.cat([fa[:1], fa[1 + used]]))
                pos = torch.full((n_img,), -1, dtype=torch.long)
                pos[used] = torch.arange(1, len(used) + 1)
                za = z_used[:1].expand(len(pp), -1)
                zp, zn = z_used[pos[pp]], z_used[pos[qq]]
                loss = triplet_loss(za, zp, zn, config.margin, config.official_dim0_bug)
                if not torch.isfinite(loss):
                    raise FloatingPointError("representation loss is not finite; the encoder "
                                             "update was rejected (lower repr_lr)")
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.opt.step()
                losses.append(loss.item())
        self.net.eval()
        return losses

    @torch.no_grad()
    def features(self, f: Tensor, which: str = "trunk") -> Tensor:
        """Reward features: the trunk E(f) (official, hero_spec 5.2) or the head g(E(f)) that the
        triplet loss shapes directly."""
        self.net.eval()
        h = self.net.trunk(f.to(self.device).float())
        return self.net.head(h) if which == "head" else h

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.net.load_state_dict(sd["net"])
        self.opt.load_state_dict(sd["opt"])
