"""Feedback-Guided Image Generation: the next round's initial noises (hero_spec section 4).

Round 0 draws xi_i ~ N(0, I). Later rounds draw a centre c_i for every sample,

    c_i = xi*               for the first floor(beta N) samples,
    c_i ~ Uniform(G)        for the rest (with replacement),

and perturb it variance-preservingly,

    xi_i = sqrt(1 - eps^2) c_i + eps n_i,   n_i ~ N(0, I),

so xi_i ~ N(0, I) whenever c_i is. G is the pool of this round's good noises (the new best excluded),
xi* the best image's noise. With beta = 0 the centres are uniform over G + {xi*}. An empty G (the only
good image became the best) seeds every sample from xi* instead of crashing as the official code does.

``fresh_ratio`` (not in HERO; 0 = the official behaviour) keeps the last floor(fresh_ratio N) samples
of every batch at N(0, I), and the beta split applies to the rest. The benchmark's ablations showed
why one may want it: a batch made only of near-copies of the good noises carries little good-vs-bad
contrast for the reward and none of the fresh-noise region the evaluation samples from.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = ["initial_noise", "next_noise_pool"]


def initial_noise(n: int, shape: tuple[int, ...], generator: torch.Generator,
                  best_noise: Optional[Tensor] = None, pool: Optional[Tensor] = None,
                  beta: float = 0.5, epsilon: float = 0.1, fresh_ratio: float = 0.0
                  ) -> tuple[Tensor, Tensor]:
    """Return (noises [n, *shape] float32, centre_ids [n]). ``centre_ids`` is -1 for N(0, I)
    samples, -2 for best-centred ones and k >= 0 for pool entry k (for logging and tests)."""
    if n < 1:
        raise ValueError(f"batch size must be at least 1, got {n}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta (best image ratio) must be in [0, 1], got {beta}")
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon (noise perturbation) must be in [0, 1], got {epsilon}")
    if not 0.0 <= fresh_ratio < 1.0:
        raise ValueError(f"fresh_ratio must be in [0, 1), got {fresh_ratio}")
    fresh = torch.randn((n, *shape), generator=generator, dtype=torch.float32)
    if best_noise is None:
        return fresh, torch.full((n,), -1, dtype=torch.long)
    n_fresh = int(math.floor(fresh_ratio * n))
    if n_fresh:
        noises, ids = initial_noise(n - n_fresh, shape, generator, best_noise, pool, beta, epsilon)
        return (torch.cat([noises, fresh[n - n_fresh:]]),
                torch.cat([ids, torch.full((n_fresh,), -1, dtype=torch.long)]))
    best_noise = best_noise.float().reshape(shape)
    if pool is not None and len(pool) > 0:
        pool = pool.float().reshape(-1, *shape)
    else:
        pool = None

    if pool is None:
        ids = torch.full((n,), -2, dtype=torch.long)  # empty G: every sample from xi*
    elif beta > 0:
        n_best = int(math.floor(beta * n))
        rest = torch.randint(len(pool), (n - n_best,), generator=generator)
        ids = torch.cat([torch.full((n_best,), -2, dtype=torch.long), rest])
    else:  # uniform over G + {xi*}
        ids = torch.randint(len(pool) + 1, (n,), generator=generator)
        ids[ids == len(pool)] = -2
    centres = torch.stack([best_noise if i == -2 else pool[i] for i in ids.tolist()])
    noises = math.sqrt(1.0 - epsilon ** 2) * centres + epsilon * fresh
    return noises, ids


def next_noise_pool(noises: Tensor, good: list[int], new_best: Optional[int]) -> Tensor:
    """G for the next round: the noises actually used for this round's good images, minus the
    new best (hero_spec 4). Earlier rounds' noises are not kept; xi* is stored separately."""
    keep = [i for i in good if i != new_best]
    return noises[keep].clone() if keep else noises[:0].clone()
