"""The four toy HERO tasks and their simulated evaluators (pixels only, numpy/torch, no scipy).

Each task prompt is under-specified: the base model draws varied images for it, and only some of them
satisfy the task's hidden intent (the evaluator). Higher score = better; good iff score >= threshold.

- ``count``   "circles"                          -> exactly three round blobs
- ``colour``  "a square"                         -> the drawn shape is blue (personalisation)
- ``spatial`` "a red circle and a blue square"   -> the red thing is above the blue thing
- ``removal`` "a scene with a green triangle"    -> no red cross (the unwanted element; NSFW analogue)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .data import COLOUR_NAMES, COLOURS, TASK_PROMPTS

FG_THRESHOLD = 0.35  # a pixel is foreground if its brightest channel is at least this
MIN_AREA = 4  # components smaller than this (pixels) are noise


def foreground(images: Tensor) -> Tensor:
    """[B, H, W] bool: pixels brighter than the black background."""
    return images.amax(1) >= FG_THRESHOLD


def colour_index(images: Tensor) -> Tensor:
    """[B, H, W] long: nearest palette colour (after normalising brightness) per pixel; -1 = background."""
    pal = torch.tensor([COLOURS[c] for c in COLOUR_NAMES], dtype=images.dtype, device=images.device)
    pal = pal / pal.amax(1, keepdim=True)
    px = images / images.amax(1, keepdim=True).clamp_min(1e-6)  # [B, 3, H, W]
    d = ((px.unsqueeze(1) - pal.view(1, -1, 3, 1, 1)) ** 2).sum(2)  # [B, K, H, W]
    idx = d.argmin(1)
    return torch.where(foreground(images), idx, torch.full_like(idx, -1))


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


ROUND_MAX_MOMENT = 1.045
ROUND_MAX_FILL = 0.95


def is_round(c: dict) -> bool:
    """A blob is a circle if it is as compact as a disc (low moment) and does not fill its bbox (not a square)."""
    return c["moment"] <= ROUND_MAX_MOMENT and c["fill"] <= ROUND_MAX_FILL


def score_count(images: Tensor, prompts=None, target: int = 3) -> Tensor:
    """-(|#blobs - target|) - 0.5 * #non-round blobs; 0 iff exactly ``target`` round blobs."""
    out = []
    for comps in components(foreground(images)):
        out.append(-abs(len(comps) - target) - 0.5 * sum(not is_round(c) for c in comps))
    return torch.tensor(out, dtype=torch.float32)


def score_colour(images: Tensor, prompts=None, colour: str = "blue") -> Tensor:
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
    cfg: float | None = None  # per-task guidance scale (None = the model's default)

    def score(self, images: Tensor, prompts: list[str] | None = None) -> Tensor:
        """[B] float scores (higher = better) for images [B, 3, H, W] in [0, 1]."""
        images = images.detach().float().cpu().clamp(0, 1)
        return self.score_fn(images, prompts)

    def success(self, images: Tensor, prompts: list[str] | None = None) -> Tensor:
        """[B] bool: the image satisfies the task intent (score >= threshold)."""
        return self.score(images, prompts) >= self.threshold


TASKS: dict[str, ToyTask] = {
    "count": ToyTask("count", TASK_PROMPTS["count"],
                     "counting: exactly three circles (the prompt does not say how many)", -0.25, score_count),
    "colour": ToyTask("colour", TASK_PROMPTS["colour"],
                      "personalisation: the square is blue (the prompt does not say which colour)", 0.5,
                      score_colour),
    "spatial": ToyTask("spatial", TASK_PROMPTS["spatial"],
                       "spatial reasoning: the red circle is above the blue square", 0.0, score_spatial),
    "removal": ToyTask("removal", TASK_PROMPTS["removal"],
                       "removal (NSFW analogue): no red cross in the scene (area <= 5 px)", -0.5, score_removal),
}
