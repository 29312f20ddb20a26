"""The feedback contract: a round's answer is (good, bad, best-or-keep), with the paper's rules.

Rules (hero_spec 3.2 / 8.1): every shown image is marked good or bad; at least one good and one
bad; the best image is one of this round's good images, or ``None`` to keep the current best
(only possible once a best exists). The best index is a *batch* index: the official code used the
position in the candidate list instead (hero_spec 10.1), which ``Marks`` makes impossible.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["Marks", "MarksError", "SimulatedEvaluator", "best_from_candidates"]


class MarksError(ValueError):
    """Marks that break the paper's rules; the message says which rule and how to fix it."""


@dataclass(frozen=True)
class Marks:
    good: tuple[int, ...]
    bad: tuple[int, ...]
    best: Optional[int] = None  # batch index of the new best, or None = keep the current best

    def __init__(self, good: Sequence[int], bad: Sequence[int], best: Optional[int] = None):
        object.__setattr__(self, "good", tuple(sorted(int(i) for i in good)))
        object.__setattr__(self, "bad", tuple(sorted(int(i) for i in bad)))
        object.__setattr__(self, "best", None if best is None else int(best))

    @property
    def count(self) -> int:
        """Labels collected: one per marked image (the best pick is not counted, hero_spec 11.9)."""
        return len(self.good) + len(self.bad)

    def validate(self, n: int, has_current_best: bool) -> "Marks":
        if n < 2:
            raise MarksError(f"a round needs at least 2 images to mark (got {n}); raise batch_size")
        g, b = set(self.good), set(self.bad)
        out = sorted(i for i in g | b if not 0 <= i < n)
        if out:
            raise MarksError(f"image indices {out} are out of range: this batch has {n} images "
                             f"(0-based indices 0..{n - 1})")
        if len(g) != len(self.good) or len(b) != len(self.bad):
            raise MarksError("an image is listed twice in the same mark list; list each image once")
        both = sorted(g & b)
        if both:
            raise MarksError(f"images {both} are marked both good and bad; mark each image once")
        missing = sorted(set(range(n)) - g - b)
        if missing:
            raise MarksError(f"images {missing} are not marked; every image must be good or bad")
        if not g:
            raise MarksError("no image is marked good; mark at least one good image "
                             "(the paper's rule: at least one good and one bad)")
        if not b:
            raise MarksError("no image is marked bad; mark at least one bad image "
                             "(the paper's rule: at least one good and one bad)")
        if self.best is None:
            if not has_current_best:
                raise MarksError("no best image chosen; the first round must pick a best image "
                                 "among the good ones")
        elif self.best not in g:
            raise MarksError(f"the best image {self.best} is not marked good; "
                             f"the best must be one of the good images (or keep the current best)")
        return self

    @classmethod
    def from_good(cls, n: int, good: Sequence[int], best: Optional[int]) -> "Marks":
        """Good list + best; everything else is bad (the paper's interface)."""
        g = set(int(i) for i in good)
        if best is not None:
            g.add(int(best))
        return cls(sorted(g), [i for i in range(n) if i not in g], best)

    @classmethod
    def parse(cls, text: str, n: int) -> "Marks":
        """Parse the no-JS text form, 1-based as people count: ``"good: 1 3 4; best: 3"``.
        Unlisted images are bad; ``best: keep`` (or no best) keeps the current best.
        ``bad: ...`` may be given instead of ``good`` (then the rest is good)."""
        fields: dict[str, str] = {}
        for part in re.split(r"[;\n]+", text.strip()):
            if not part.strip():
                continue
            if ":" not in part:
                raise MarksError(f"cannot read {part.strip()!r}; write e.g. 'good: 1 3 4; best: 3'")
            k, v = part.split(":", 1)
            k = k.strip().lower()
            if k not in ("good", "bad", "best"):
                raise MarksError(f"unknown field {k!r}; use good:, bad: and best:")
            fields[k] = v.strip()

        def nums(s: str, what: str) -> list[int]:
            toks = [t for t in re.split(r"[\s,]+", s) if t]
            try:
                vals = [int(t) for t in toks]
            except ValueError:
                raise MarksError(f"{what}: {s!r} must be image numbers 1..{n}") from None
            bad_nums = [v for v in vals if not 1 <= v <= n]
            if bad_nums:
                raise MarksError(f"{what}: numbers {bad_nums} are out of range 1..{n} "
                                 f"(images are numbered from 1)")
            return [v - 1 for v in vals]

        if "good" in fields and "bad" in fields:
            raise MarksError("give either good: or bad:, not both (the rest is the other kind)")
        best = None
        if fields.get("best", "keep").lower() not in ("", "keep", "none"):
            b = nums(fields["best"], "best")
            if len(b) != 1:
                raise MarksError("best: give exactly one image number (or 'keep')")
            best = b[0]
        if "good" in fields:
            return cls.from_good(n, nums(fields["good"], "good"), best)
        if "bad" in fields:
            bad = set(nums(fields["bad"], "bad"))
            return cls([i for i in range(n) if i not in bad], sorted(bad), best)
        raise MarksError("no good: list given; write e.g. 'good: 1 3 4; best: 3'")

    def to_json(self) -> dict:
        return {"good": list(self.good), "bad": list(self.bad), "best": self.best}

    @classmethod
    def from_json(cls, d: dict) -> "Marks":
        if not isinstance(d, dict):
            raise MarksError("marks must be an object {good: [...], bad: [...], best: i|null}")
        for k in ("good", "bad"):
            v = d.get(k)
            if not isinstance(v, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                   for i in v):
                raise MarksError(f"'{k}' must be a list of integer image indices")
        best = d.get("best")
        if best is not None and (not isinstance(best, int) or isinstance(best, bool)):
            raise MarksError("'best' must be an integer image index or null")
        return cls(d["good"], d["bad"], best)


def best_from_candidates(good: Sequence[int], position: int) -> Optional[int]:
    """The paper's rounds >= 1 interface shows the good images then the current best as the last
    tile; map the chosen *position* to a batch index (None = kept the current best). The official
    code used ``position`` as a batch index (hero_spec 10.1)."""
    good = list(good)
    if not 0 <= position <= len(good):
        raise MarksError(f"candidate position {position} out of range 0..{len(good)}")
    return None if position == len(good) else good[position]


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
    labels_used: int = field(default=0)
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
        self.labels_used += marks.count
        return marks, scores
