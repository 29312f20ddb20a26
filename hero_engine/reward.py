"""Similarity-to-best reward and DDPO advantages (hero_spec sections 6 and 7.4).

    r_i = (1 + cos(E(f_i), E(f*))) / 2          in [0.5, 1] since E(.) >= 0; the best scores 1
    A_i = clip((r_i - mean r) / (std r + 1e-8), -adv_clip, adv_clip)

``similarity-to-all-positive`` (the official alternative): r_i = mean_g (1 + cos(h_i, h_g)) / 2.
``binary`` (the ``ddpo-binary`` baseline, no representation learning): r_i = 1 if good else 0.

``marks+similarity`` (our ``hero``, not in the paper): the marks are the backbone and the learned
similarity only orders images *within* their class,

    r_i = y_i + c * rank_i / n_class,       y_i = 1 good / 0 bad,  0 <= c < 1,

where rank_i in 0..n_class-1 is the rank of s_i (the similarity to the best) among the images with
the same mark. So every marked-good image outranks every marked-bad one (on the base model the
paper's similarity reward gives 30-54% of the bad images a positive advantage, because the bad
images scatter and the batch mean falls inside them), and the representation still grades which
good image is closest to the best.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["similarity_reward", "similarity_to_positives", "binary_reward",
           "mark_anchored_reward", "within_class_rank", "advantages", "denoising_weights"]


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


def within_class_rank(s: Tensor, labels: Tensor) -> Tensor:
    """rank_i / n_class in [0, 1): the rank of s_i among the entries with the same label (soft
    labels are rounded), 0 for the lowest."""
    out = torch.zeros(len(s))
    lab = labels.round()
    for v in lab.unique():
        idx = torch.nonzero(lab == v).flatten()
        order = torch.argsort(torch.argsort(s[idx].float()))
        out[idx] = order.float() / len(idx)
    return out


def mark_anchored_reward(labels: Tensor, s: Tensor, credit: float = 0.25) -> Tensor:
    """r_i = y_i + credit * rank_i / n_class (module docstring). ``labels`` are the marks (1/0)
    or, for samples nobody marked, the representation's soft labels in [0, 1]."""
    if not 0 <= credit < 1:
        raise ValueError(f"credit must lie in [0, 1), got {credit}")
    return labels.float() + credit * within_class_rank(s, labels)


def advantages(rewards: Tensor, clip: float = 5.0, eps: float = 1e-8) -> Tensor:
    """Batch whitening + clipping (per-prompt stat tracking is off in HERO)."""
    r = rewards.float()
    std = r.std(unbiased=False) if len(r) > 1 else torch.tensor(0.0)
    return ((r - r.mean()) / (std + eps)).clamp(-clip, clip)


def denoising_weights(labels: Tensor, rewards: Tensor) -> Tensor:
    """w_i = r_i if image i is (marked or, unmarked, labelled) good, else 0: the weights of
    reward-weighted denoising (denoising.py). With ``mark_anchored_reward`` a good image weighs
    1 to 1 + credit, graded by its learned similarity to the best; a bad one is never imitated."""
    return torch.where(labels.float() >= 0.5, rewards.float().clamp_min(0), torch.zeros(()))
