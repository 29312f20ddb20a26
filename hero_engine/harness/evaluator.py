"""A scripted person for the simulated sessions (the demo, the benchmark, the tests): it marks a
batch by a scoring function, under the marks contract of ``hero_engine.feedback``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

from ..feedback import Marks, MarksError

__all__ = ["SimulatedEvaluator"]


@dataclass
class SimulatedEvaluator:
    """A scripted "human": scores each image and answers like the paper's interface.

    good = score >= threshold; best = the top-scoring good image if it scores at least the current
    best's score, else keep. The paper's rules are then enforced: if no image is good, the top-scoring
    one is marked good; if all are good, the lowest-scoring one is marked bad.

    ``flip_rate`` models an inconsistent person: each image's good/bad mark is flipped with that
    probability (drawn from a generator seeded by ``seed``) before the rules above apply.
    """

    score_fn: Callable[[Tensor, list[str]], Tensor]
    threshold: float
    marks_used: int = field(default=0)
    flip_rate: float = 0.0
    seed: int = 0
    _gen: Optional[torch.Generator] = field(default=None, repr=False)

    def __post_init__(self):
        if not 0.0 <= self.flip_rate <= 0.5:
            raise ValueError(f"flip_rate must be in [0, 0.5] (the chance that a mark is wrong), "
                             f"got {self.flip_rate}")

    def query(self, images: Tensor, prompts: list[str], current_best_score: Optional[float]
              ) -> tuple[Marks, Tensor]:
        scores = self.score_fn(images, prompts).detach().float().cpu().flatten()
        n = len(scores)
        if n < 2:
            raise MarksError("the simulated evaluator needs at least 2 images per round")
        order = torch.argsort(scores, descending=True).tolist()
        is_good = scores >= self.threshold
        if self.flip_rate > 0:
            if self._gen is None:
                self._gen = torch.Generator().manual_seed(self.seed)
            is_good ^= torch.rand(n, generator=self._gen) < self.flip_rate
        good = [i for i in range(n) if is_good[i]]
        if not good:
            good = [order[0]]
        if len(good) == n:
            good.remove(order[-1])
        top = max(good, key=lambda i: float(scores[i]))
        # an equal score replaces the best too: with a strict '>' the first top-score image stays
        # the best for good, and similarity to it rewards that one image's size and place
        best = top if current_best_score is None or float(scores[top]) >= current_best_score else None
        marks = Marks.from_good(n, good, best).validate(n, current_best_score is not None)
        self.marks_used += marks.num_marked
        return marks, scores
