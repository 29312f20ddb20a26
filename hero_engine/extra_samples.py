"""The representation scores samples the person never sees (not in the paper; our ``hero``).

Marks are scarce, samples are cheap. After the person marks the round, the policy that made the
batch draws ``M`` more chains from fresh noise xi ~ N(0, I). Nobody marks them: each gets a soft
label from its nearest marked neighbours in the learned representation,

    p_j = (1 / k) sum_{i in kNN_k(z_j)} y_i,        z = g(E(f)) / |g(E(f))|   (cosine neighbours)

over every image marked so far, and the reward r_j = p_j + c * rank_j / n_class of
``reward.mark_anchored_reward``. The PPO update then runs over the marked chains and these
together, so a lesson learned from the marks generalises to noise the marks never covered, which
is also where an exported LoRA is used.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .representation import RepresentationTrainer
from .reward import mark_anchored_reward
from .sampling import DDIMSchedule, Denoiser, Trajectory, sample_with_logprob

__all__ = ["neighbour_labels", "sample_extra", "score_extra"]


def neighbour_labels(z: Tensor, z_marked: Tensor, y_marked: Tensor, k: int) -> Tensor:
    """p_j: the mean mark of the k marked images nearest to z_j (cosine) -> [M] in [0, 1]."""
    if len(z_marked) == 0:
        raise ValueError("no marked image to compare with")
    sim = F.normalize(z.float(), dim=-1) @ F.normalize(z_marked.float(), dim=-1).T
    k = min(k, len(z_marked))
    idx = sim.topk(k, dim=1).indices
    return y_marked.float()[idx].mean(1)


@torch.no_grad()
def sample_extra(denoiser: Denoiser, n: int, shape: tuple[int, ...], schedule: DDIMSchedule,
                 eta: float, generator: torch.Generator, device, micro_batch: int = 64,
                 index_cycle: int = 1, callback: Optional[Callable[[int, int], None]] = None
                 ) -> Trajectory:
    """``n`` chains from fresh N(0, I) noise with log-probs, held in fp16 exactly as the marked
    batch is stored (so the PPO ratio starts at 1 for both). Sample j is conditioned like batch
    sample ``j % index_cycle``."""
    x = torch.randn((n, *shape), generator=generator, dtype=torch.float32)
    trajs = []
    for s in range(0, n, micro_batch):
        idx = torch.arange(s, min(s + micro_batch, n))
        cb = None if callback is None else (lambda i, T, s=s: callback(s * T // micro_batch + i,
                                                                       n * T // micro_batch))
        trajs.append(sample_with_logprob(denoiser, x[idx].to(device), schedule, eta,
                                         generator=generator, callback=cb,
                                         index=(idx % max(1, index_cycle)).to(device),
                                         store_dtype=torch.float16))
    return Trajectory(torch.cat([t.latents for t in trajs]), torch.cat([t.log_probs for t in trajs]),
                      schedule, eta)


def score_extra(encoder: RepresentationTrainer, features: Tensor, marked_features: Tensor,
                marked_labels: Tensor, best_feature: Tensor, k: int, credit: float,
                which: str = "head") -> tuple[Tensor, Tensor]:
    """(rewards [M], soft labels p [M]) of unmarked samples' feature latents [M, C, H, W]."""
    z = encoder.features(features, "head")
    z_marked = encoder.features(marked_features, "head")
    p = neighbour_labels(z, z_marked, marked_labels, k).cpu()
    h = encoder.features(features, which)
    h_best = encoder.features(best_feature[None], which)[0]
    s = F.cosine_similarity(h.float(), h_best.float()[None], dim=-1).cpu()
    return mark_anchored_reward(p, s, credit), p
