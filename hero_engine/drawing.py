"""Pictures drawn with Pillow (no matplotlib, so they draw inside any ComfyUI install): the image
grid of the demo's rounds and the toy's measurements, and the session's metrics chart that HERO
Train outputs. The harness's line plots are in ``hero_engine/harness/plots.py``."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

__all__ = ["image_grid", "metrics_plot"]


def image_grid(images: torch.Tensor, ncol: int = 8, marks: Optional[dict] = None,
               scale: int = 1, frames: Optional[Sequence[tuple[int, int, int]]] = None,
               border: int = 3) -> Image.Image:
    """images [B, 3, H, W] in [0, 1] -> a grid of tiles enlarged ``scale`` times, each in a
    ``border``-pixel frame. ``marks`` {"good": [...], "best": i} colours the frames green (good),
    red (bad) and gold (the best); ``frames`` gives each tile's frame colour instead; with
    neither, the frames are white."""
    arr = (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).astype(np.uint8)
    n, h, w, _ = arr.shape
    ncol = max(1, min(ncol, n))
    nrow = math.ceil(n / ncol)
    b = border
    cw, ch = w * scale + 2 * b, h * scale + 2 * b
    out = Image.new("RGB", (ncol * cw, nrow * ch), (255, 255, 255))
    good = set((marks or {}).get("good", []))
    best = (marks or {}).get("best")
    for i in range(n):
        r, c = divmod(i, ncol)
        tile = Image.fromarray(arr[i])
        if scale != 1:
            tile = tile.resize((w * scale, h * scale), Image.NEAREST)
        col = None
        if frames is not None:
            col = tuple(frames[i])
        elif marks is not None:
            col = (255, 190, 0) if i == best else ((40, 170, 60) if i in good else (200, 50, 50))
        if col is not None:
            ImageDraw.Draw(out).rectangle([c * cw, r * ch, c * cw + cw - 1, r * ch + ch - 1],
                                          fill=col)
        out.paste(tile, (c * cw + b, r * ch + b))
    return out


def metrics_plot(history: list[dict], width: int = 768, height: int = 512) -> torch.Tensor:
    """A 2x2 chart of marks used, good rate, triplet loss and reward spread per round ->
    IMAGE [1, H, W, 3]."""
    # "labels_used": the history's key for the marks used (its old name, as stored sessions have it)
    panels = [("labels used", "labels_used"), ("good rate", "good_rate"),
              ("triplet loss (last)", "triplet_loss_last"), ("reward std", "reward_std")]
    img = Image.new("RGB", (width, height), (24, 24, 28))
    d = ImageDraw.Draw(img)
    pw, ph = width // 2, height // 2
    for p, (title, key) in enumerate(panels):
        x0, y0 = (p % 2) * pw, (p // 2) * ph
        d.rectangle([x0 + 4, y0 + 4, x0 + pw - 4, y0 + ph - 4], outline=(80, 80, 90))
        pts = [(h.get("round", i), h.get(key)) for i, h in enumerate(history)]
        pts = [(r, float(v)) for r, v in pts if isinstance(v, (int, float)) and math.isfinite(v)]
        last = f" = {pts[-1][1]:.4g}" if pts else ""
        d.text((x0 + 12, y0 + 10), title + last, fill=(230, 230, 230))
        if not pts:
            d.text((x0 + 12, y0 + ph // 2), "no rounds yet", fill=(150, 150, 150))
            continue
        L, T, R, B = x0 + 40, y0 + 32, x0 + pw - 16, y0 + ph - 24
        vs = [v for _, v in pts]
        lo, hi = min(vs), max(vs)
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5, hi + 0.5
        rs = [r for r, _ in pts]
        r0, r1 = min(rs), max(rs) if max(rs) > min(rs) else min(rs) + 1
        xy = [(L + (r - r0) / (r1 - r0) * (R - L), B - (v - lo) / (hi - lo) * (B - T)) for r, v in pts]
        d.line([(L, B), (R, B)], fill=(90, 90, 100))
        d.line([(L, T), (L, B)], fill=(90, 90, 100))
        d.text((x0 + 6, T - 4), f"{hi:.3g}", fill=(150, 150, 150))
        d.text((x0 + 6, B - 10), f"{lo:.3g}", fill=(150, 150, 150))
        d.text((R - 40, B + 4), f"round {int(r1) if len(pts) > 1 else int(r0)}", fill=(150, 150, 150))
        if len(xy) > 1:
            d.line(xy, fill=(90, 180, 250), width=2)
        for x, y in xy:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(250, 200, 80))
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(arr)[None]
