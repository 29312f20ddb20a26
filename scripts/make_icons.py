"""Draw the pack's Registry icon (400x400) and banner (1260x540, 21:9) with PIL.

    python scripts/make_icons.py        # writes docs/img/icon.png and docs/img/banner.png

The drawing: a 3x3 grid of tiles as in the marking panel, good ones ringed green, bad ones red,
the best one gold with a star; on the banner the pack's name and what it does.
Deterministic: the same files every run (tests/engine/test_registry.py checks them)."""
from __future__ import annotations

import math
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
BG = (24, 26, 33)
GOOD, BAD, BEST = (76, 190, 110), (225, 80, 80), (245, 195, 60)
MARKS = ["good", "bad", "good", "bad", "best", "good", "good", "bad", "good"]


def _tile_colour(i: int) -> tuple:
    # a soft gradient per tile, like generated images seen small
    h = (i * 0.13 + 0.55) % 1.0
    r = int(120 + 100 * math.sin(2 * math.pi * h))
    g = int(120 + 100 * math.sin(2 * math.pi * (h + 1 / 3)))
    b = int(120 + 100 * math.sin(2 * math.pi * (h + 2 / 3)))
    return (r, g, b)


def _star(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float, fill) -> None:
    pts = []
    for k in range(10):
        a = -math.pi / 2 + k * math.pi / 5
        rr = r if k % 2 == 0 else r * 0.45
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    d.polygon(pts, fill=fill)


def draw_grid(d: ImageDraw.ImageDraw, x0: int, y0: int, size: int) -> None:
    gap = size // 24
    cell = (size - 2 * gap) // 3
    for i, mark in enumerate(MARKS):
        x = x0 + (i % 3) * (cell + gap)
        y = y0 + (i // 3) * (cell + gap)
        ring = {"good": GOOD, "bad": BAD, "best": BEST}[mark]
        w = max(4, cell // 12)
        d.rounded_rectangle([x, y, x + cell, y + cell], radius=cell // 7, fill=ring)
        d.rounded_rectangle([x + w, y + w, x + cell - w, y + cell - w], radius=cell // 9,
                            fill=_tile_colour(i))
        if mark == "best":
            _star(d, x + cell / 2, y + cell / 2, cell * 0.3, BEST)
            _star(d, x + cell / 2, y + cell / 2, cell * 0.18, (255, 245, 200))


def _font(size: int):
    for name in ("DejaVuSans-Bold.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default()


def icon(size: int = 400) -> Image.Image:
    im = Image.new("RGB", (size, size), BG)
    draw_grid(ImageDraw.Draw(im), size // 10, size // 10, size - 2 * (size // 10))
    return im


def banner(w: int = 1260, h: int = 540) -> Image.Image:
    im = Image.new("RGB", (w, h), BG)
    d = ImageDraw.Draw(im)
    draw_grid(d, 60, 60, h - 120)
    tx = h - 60 + 60
    d.text((tx, 120), "HERO", font=_font(120), fill=(240, 240, 245))
    d.text((tx, 270), "online LoRA fine-tuning", font=_font(36), fill=(200, 205, 215))
    d.text((tx, 320), "from your good / bad / best marks", font=_font(36), fill=(200, 205, 215))
    d.text((tx, 420), "ComfyUI node pack", font=_font(32), fill=BEST)
    return im


def main(out_dir: Path = ROOT / "docs" / "img") -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "icon.png", out_dir / "banner.png"]
    icon().save(paths[0], optimize=True)
    banner().save(paths[1], optimize=True)
    return paths


if __name__ == "__main__":
    for p in main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "img"):
        print(p)
