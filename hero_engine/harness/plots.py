"""The harness's line plots (the demo's success against marks, the benchmark's curves), drawn with
Pillow like the engine's pictures (``hero_engine/drawing.py``: the image grid, the metrics chart)."""
from __future__ import annotations

import math
from typing import Optional, Sequence

from PIL import Image, ImageDraw, ImageFont

__all__ = ["line_plot", "PALETTE"]

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127)]


def _font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _nice(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 100 or float(v).is_integer():
        return f"{v:.0f}"
    return f"{v:.3g}"


def line_plot(series: dict[str, tuple[Sequence[float], Sequence[float]]], title: str = "",
              xlabel: str = "", ylabel: str = "", size=(640, 400),
              ylim: Optional[tuple[float, float]] = None,
              hlines: Optional[dict[str, float]] = None,
              colours: Optional[dict[str, int]] = None) -> Image.Image:
    """series: name -> (xs, ys). Returns an RGB image with axes, ticks, legend. ``colours`` fixes
    a series' palette index (so a name keeps its colour across plots); default: series order."""
    W, H = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    f, fs = _font(13), _font(11)
    L, R, T, B = 58, 16, 30 if title else 12, 44
    pts = [(x, y) for xs, ys in series.values() for x, y in zip(xs, ys)
           if y is not None and math.isfinite(y)]
    xs_all = [p[0] for p in pts] or [0, 1]
    ys_all = [p[1] for p in pts] or [0, 1]
    x0, x1 = min(xs_all), max(xs_all)
    y0, y1 = ylim if ylim else (min(ys_all), max(ys_all))
    if hlines and not ylim:
        y0, y1 = min([y0, *hlines.values()]), max([y1, *hlines.values()])
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = 0.05 * (y1 - y0) if not ylim else 0
    y0, y1 = y0 - pad, y1 + pad

    def px(x, y):
        return (L + (x - x0) / (x1 - x0) * (W - L - R), T + (1 - (y - y0) / (y1 - y0)) * (H - T - B))

    d.rectangle([L, T, W - R, H - B], outline=(80, 80, 80))
    for i in range(5):
        yv = y0 + i * (y1 - y0) / 4
        _, yy = px(x0, yv)
        d.line([L, yy, W - R, yy], fill=(230, 230, 230))
        d.text((L - 6, yy), _nice(yv), fill="black", font=fs, anchor="rm")
        xv = x0 + i * (x1 - x0) / 4
        xx, _ = px(xv, y0)
        d.text((xx, H - B + 6), _nice(xv), fill="black", font=fs, anchor="mt")
    if title:
        d.text((W / 2, 6), title, fill="black", font=f, anchor="mt")
    if xlabel:
        d.text(((L + W - R) / 2, H - 14), xlabel, fill="black", font=fs, anchor="mm")
    if ylabel:
        d.text((4, T - 4), ylabel, fill="black", font=fs, anchor="ls")
    for name, yv in (hlines or {}).items():
        _, yy = px(x0, yv)
        for xx in range(L, W - R, 8):
            d.line([xx, yy, min(xx + 4, W - R), yy], fill=(120, 120, 120))
        d.text((W - R - 4, yy - 2), name, fill=(90, 90, 90), font=fs, anchor="rb")
    ly = T + 6
    for k, (name, (xs, ys)) in enumerate(series.items()):
        col = PALETTE[(colours or {}).get(name, k) % len(PALETTE)]
        p = [px(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
        if len(p) > 1:
            d.line(p, fill=col, width=2)
        for q in p:
            d.ellipse([q[0] - 3, q[1] - 3, q[0] + 3, q[1] + 3], fill=col)
        d.line([L + 8, ly + 6, L + 24, ly + 6], fill=col, width=3)
        d.text((L + 28, ly), name, fill="black", font=fs)
        ly += 15
    return img
