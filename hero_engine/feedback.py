"""The feedback contract: a round's answer is (good, bad, best-or-keep), with the paper's rules.

Rules (hero_spec 3.2 / 8.1): every shown image is marked good or bad; at least one good and one
bad; the best image is one of this round's good images, or ``None`` to keep the current best
(only possible once a best exists). The best index is a *batch* index: the official code used the
position in the candidate list instead (hero_spec 10.1), which ``Marks`` makes impossible.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

__all__ = ["Marks", "MarksError", "best_from_candidates"]


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
    def num_marked(self) -> int:
        """Marks collected: one per marked image (the best pick is not counted, hero_spec 11.9)."""
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
