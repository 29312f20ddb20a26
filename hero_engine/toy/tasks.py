"""The four toy HERO tasks and their simulated evaluators (pixels only, numpy/torch, no scipy).

Each task prompt is under-specified: the base model draws varied images for it, and only some of them
satisfy the task's hidden intent (the evaluator). Higher score = better; good iff score >= threshold.

- ``count``   "circles"                          -> exactly three round blobs
- ``colour``  "a square"                         -> the drawn shape is yellow (personalisation)
- ``spatial`` "a red circle and a blue square"   -> the red thing is above the blue thing
- ``removal`` "a scene with a green triangle"    -> no red cross (the unwanted element; NSFW analogue)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .data import BACKGROUND, COLOUR_NAMES, COLOURS, PERSONAL_COLOUR, TASK_PROMPTS

MIN_AREA = 4  # components smaller than this (pixels) are noise
MAX_FG_FRACTION = 0.4  # the training images never cover more; busier images are noise and fail every task


def colour_index(images: Tensor) -> Tensor:
    """[B, H, W] long: the nearest of the palette colours and the grey background (RGB distance)
    per pixel; -1 = background."""
    pal = [COLOURS[c] for c in COLOUR_NAMES] + [(BACKGROUND,) * 3]
    pal = torch.tensor(pal, dtype=images.dtype, device=images.device)
    d = ((images.unsqueeze(1) - pal.view(1, -1, 3, 1, 1)) ** 2).sum(2)  # [B, K+1, H, W]
    idx = d.argmin(1)
    return torch.where(idx == len(COLOUR_NAMES), torch.full_like(idx, -1), idx)


def foreground(images: Tensor) -> Tensor:
    """[B, H, W] bool: pixels nearer to a palette colour than to the grey background."""
    return colour_index(images) >= 0


def colour_mask(images: Tensor, colour: str) -> Tensor:
    """[B, H, W] bool: foreground pixels of the named palette colour."""
    return colour_index(images) == COLOUR_NAMES.index(colour)


def label_components(mask: Tensor) -> Tensor:
    """4-connected component labels [B, H, W] (0 = background) by max-label propagation."""
    b, h, w = mask.shape
    m = mask.float()
    lab = torch.arange(1, h * w + 1, dtype=torch.float32, device=mask.device).view(1, h, w) * m
    for _ in range(h * w):
        p = F.pad(lab, (1, 1, 1, 1))
        nb = torch.stack([lab, p[:, :-2, 1:-1], p[:, 2:, 1:-1], p[:, 1:-1, :-2], p[:, 1:-1, 2:]]).amax(0) * m
        if torch.equal(nb, lab):
            break
        lab = nb
    return lab.long()


def component_areas(labels: Tensor) -> Tensor:
    """[B, H*W+1] pixel count of each label per image (column 0 = background, zeroed)."""
    b, h, w = labels.shape
    n = h * w + 1
    flat = (labels.view(b, -1) + torch.arange(b, device=labels.device).view(b, 1) * n).view(-1)
    areas = torch.bincount(flat, minlength=b * n).view(b, n)
    areas[:, 0] = 0
    return areas


def components(mask: Tensor, min_area: int = MIN_AREA) -> list[list[dict]]:
    """Per image, the components of ``mask`` with at least ``min_area`` pixels:
    dicts with area, centroid (cy, cx), bbox height/width, fill (= area / bbox area) and moment
    (2 pi * mean squared radius / area: 1 for a disc, 1.05 for a square, more for a triangle or a cross)."""
    labels = label_components(mask)
    areas = component_areas(labels)
    out = []
    for i in range(mask.shape[0]):
        comps = []
        for lab in torch.nonzero(areas[i] >= min_area).flatten().tolist():
            ys, xs = torch.nonzero(labels[i] == lab, as_tuple=True)
            hh = int(ys.max() - ys.min()) + 1
            ww = int(xs.max() - xs.min()) + 1
            yf, xf = ys.float(), xs.float()
            r2 = ((yf - yf.mean()) ** 2 + (xf - xf.mean()) ** 2).mean().item() + 1 / 6
            comps.append(dict(area=len(ys), cy=yf.mean().item() + 0.5, cx=xf.mean().item() + 0.5,
                              h=hh, w=ww, fill=len(ys) / (hh * ww), moment=2 * math.pi * r2 / len(ys)))
        out.append(comps)
    return out


ROUND_MAX_MOMENT = 1.085  # clean discs <= 1.055, squares fill their bbox, crosses >= 1.09
ROUND_MAX_FILL = 0.98


def is_round(c: dict) -> bool:
    """A blob is a circle if it is as compact as a disc (low moment) and does not fill its bbox (not a square)."""
    return c["moment"] <= ROUND_MAX_MOMENT and c["fill"] <= ROUND_MAX_FILL


def score_count(images: Tensor, prompts=None, target: int = 3) -> Tensor:
    """-(|#blobs - target|) - 0.5 * #non-round blobs; 0 iff exactly ``target`` round blobs."""
    out = []
    for comps in components(foreground(images)):
        out.append(-abs(len(comps) - target) - 0.5 * sum(not is_round(c) for c in comps))
    return torch.tensor(out, dtype=torch.float32)


def score_colour(images: Tensor, prompts=None, colour: str = PERSONAL_COLOUR) -> Tensor:
    """Fraction of foreground pixels that are ``colour`` (0 for an empty image)."""
    fg = foreground(images).flatten(1).sum(1).float()
    hit = colour_mask(images, colour).flatten(1).sum(1).float()
    return (hit / fg.clamp_min(1)).float().cpu()


def _largest(comps: list[dict]) -> dict | None:
    return max(comps, key=lambda c: c["area"]) if comps else None


def score_spatial(images: Tensor, prompts=None, upper: str = "red", lower: str = "blue") -> Tensor:
    """How far the ``upper``-coloured blob sits above the ``lower``-coloured one, in image heights:
    min(dy - 3 px, dy - |dx|) / 32 with dy = y_lower - y_upper; -1 if either is missing."""
    ups = components(colour_mask(images, upper))
    los = components(colour_mask(images, lower))
    out = []
    for cu, cl in zip(ups, los):
        a, b = _largest(cu), _largest(cl)
        if a is None or b is None:
            out.append(-1.0)
            continue
        dy, dx = b["cy"] - a["cy"], b["cx"] - a["cx"]
        out.append(min(dy - 3.0, dy - abs(dx)) / 32.0)
    return torch.tensor(out, dtype=torch.float32)


def score_removal(images: Tensor, prompts=None, colour: str = "red") -> Tensor:
    """-(area of the largest ``colour`` blob) / 10 px; 0 when the unwanted element is absent."""
    labels = label_components(colour_mask(images, colour))
    return -(component_areas(labels).amax(1).float() / 10.0).cpu()


@dataclass
class ToyTask:
    """A HERO task on the toy model: an under-specified prompt and a pixel evaluator of its intent."""

    name: str
    prompt: str
    description: str
    threshold: float
    score_fn: Callable[[Tensor, list], Tensor] = field(repr=False)
    fail_score: float = -1.0  # the score of a noise image (busier than MAX_FG_FRACTION)
    guidance_scale: float | None = None  # per-task guidance scale (None = the model's default)

    def score(self, images: Tensor, prompts: list[str] | None = None) -> Tensor:
        """[B] float scores (higher = better) for images [B, 3, H, W] in [0, 1]."""
        images = images.detach().float().cpu().clamp(0, 1)
        noisy = foreground(images).flatten(1).float().mean(1) > MAX_FG_FRACTION
        s = torch.full((images.shape[0],), self.fail_score, dtype=torch.float32)
        if (~noisy).any():
            keep = torch.nonzero(~noisy).flatten()
            sub = [prompts[i] for i in keep.tolist()] if prompts is not None and len(prompts) == len(s) else prompts
            s[keep] = self.score_fn(images[keep], sub).float()
        return s

    def success(self, images: Tensor, prompts: list[str] | None = None) -> Tensor:
        """[B] bool: the image satisfies the task intent (score >= threshold)."""
        return self.score(images, prompts) >= self.threshold


TASKS: dict[str, ToyTask] = {
    "count": ToyTask("count", TASK_PROMPTS["count"],
                     "counting: exactly three circles (the prompt does not say how many)", -0.25, score_count,
                     fail_score=-3.0),
    "colour": ToyTask("colour", TASK_PROMPTS["colour"],
                      "personalisation: the square is yellow (the prompt does not say which colour)", 0.5,
                      partial(score_colour, colour=PERSONAL_COLOUR), fail_score=0.0),
    "spatial": ToyTask("spatial", TASK_PROMPTS["spatial"],
                       "spatial reasoning: the red circle is above the blue square", 0.0, score_spatial,
                       fail_score=-1.0),
    "removal": ToyTask("removal", TASK_PROMPTS["removal"],
                       "removal (NSFW analogue): no red cross in the scene (area <= 5 px)", -0.5, score_removal,
                       fail_score=-10.0),
}
