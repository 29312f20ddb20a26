"""Similarity-to-best reward and DDPO advantages (hero_spec sections 6 and 7.4).

    r_i = (1 + cos(E(f_i), E(f*))) / 2          in [0.5, 1] since E(.) >= 0; the best scores 1
    A_i = clip((r_i - mean r) / (std r + 1e-8), -adv_clip, adv_clip)

``similarity-to-all-positive`` (the official alternative): r_i = mean_g (1 + cos(h_i, h_g)) / 2.
``binary`` (the ``ddpo-binary`` baseline, no representation learning): r_i = 1 if good else 0.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["similarity_reward", "binary_reward", "advantages"]


def similarity_reward(h: Tensor, h_best: Tensor) -> Tensor:
    """r_i = (1 + cos(h_i, h*)) / 2 for trunk features h [N, D] and h* [D]."""
    return (1 + F.cosine_similarity(h.float(), h_best.float().reshape(1, -1), dim=-1)) / 2


def similarity_to_positives(h: Tensor, good: Sequence[int]) -> Tensor:
    """r_i = mean over good g of (1 + cos(h_i, h_g)) / 2."""
    hg = h[list(good)].float()
    return ((1 + F.cosine_similarity(h.float()[:, None], hg[None], dim=-1)) / 2).mean(1)


def binary_reward(n: int, good: Sequence[int]) -> Tensor:
    r = torch.zeros(n)
    r[list(good)] = 1.0
    return r


def advantages(rewards: Tensor, clip: float = 5.0, eps: float = 1e-8) -> Tensor:
    """Batch whitening + clipping (per-prompt stat tracking is off in HERO)."""
    r = rewards.float()
    std = r.std(unbiased=False) if len(r) > 1 else torch.tensor(0.0)
    return ((r - r.mean()) / (std + eps)).clamp(-clip, clip)
