"""Procedural toy images: coloured shapes on a mid-grey canvas, 32x32 RGB in [0, 1], with an English prompt each.

Shapes are drawn analytically from signed distance functions (1-pixel anti-aliasing), numpy only.
Every draw takes a ``numpy.random.Generator``, so a seed reproduces the data exactly.

Scene families (see ``sample_scene``):
- ``single``: one shape ("a blue square", "a square", "a blue shape").
- ``count``: 1-5 equal shapes of one colour ("three red circles", "circles", "red circles").
- ``pair``: two shapes in a relation ("a red circle above a blue square", "a red circle and a blue square").
- ``scene``: a main shape that often comes with an unwanted red cross ("a scene with a green triangle").
- ``task``: the four HERO task prompts, drawn from their designed (under-specified) distributions.
"""
from __future__ import annotations

import numpy as np

H = W = 32
BACKGROUND = 0.5  # mid-grey canvas: the latent (2 * image - 1) has mean ~0, like the initial noise
COLOURS = {
    "red": (0.95, 0.15, 0.15),
    "green": (0.15, 0.85, 0.20),
    "blue": (0.15, 0.30, 1.00),
    "yellow": (0.95, 0.90, 0.15),
}
COLOUR_NAMES = list(COLOURS)
SHAPES = ["circle", "square", "triangle", "cross"]
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
NUMBERS = ["one", "two", "three", "four", "five"]
RELATIONS = {"above": (-1, 0), "below": (1, 0), "left of": (0, -1), "right of": (0, 1)}  # (dy, dx) of first

# The four HERO task prompts (see tasks.py for the evaluators).
TASK_PROMPTS = {
    "count": "circles",
    "colour": "a square",
    "spatial": "a red circle and a blue square",
    "removal": "a scene with a green triangle",
}
PERSONAL_COLOUR = "yellow"  # the colour task's hidden intent (the base model over-draws blue squares)
CROSS_PROB = 0.75  # how often a "scene with ..." contains the unwanted red cross

_YY, _XX = np.mgrid[0:H, 0:W].astype(np.float32) + 0.5


def shape_sdf(shape: str, cy: float, cx: float, r: float) -> np.ndarray:
    """Signed distance (pixels, negative inside) of a shape of half-extent ``r`` centred at (cy, cx)."""
    dy, dx = _YY - cy, _XX - cx
    if shape == "circle":
        return np.sqrt(dy * dy + dx * dx) - r
    if shape == "square":
        h = 0.85 * r
        return np.maximum(np.abs(dy), np.abs(dx)) - h
    if shape == "triangle":
        # upward triangle: apex (cy - r), base at cy + 0.8 r, half-width r at the base
        top, base, hw = -r, 0.8 * r, 1.05 * r
        hgt = base - top
        n = np.hypot(hgt, hw)
        left = (-hgt * dx - hw * (dy - top) + 0.0) / n  # distance to the left edge (outside > 0)
        right = (hgt * dx - hw * (dy - top)) / n
        return np.maximum.reduce([dy - base, left, right])
    if shape == "cross":
        w = 0.36 * r
        a = np.maximum(np.abs(dy) - r, np.abs(dx) - w)
        b = np.maximum(np.abs(dy) - w, np.abs(dx) - r)
        return np.minimum(a, b)
    raise ValueError(f"unknown shape {shape!r}")


def draw(items: list[tuple[str, str, float, float, float]]) -> np.ndarray:
    """Render ``[(shape, colour, cy, cx, r), ...]`` onto the grey canvas; float32 [3, H, W] in [0, 1]."""
    img = np.full((3, H, W), BACKGROUND, np.float32)
    for shape, colour, cy, cx, r in items:
        a = np.clip(0.5 - shape_sdf(shape, float(cy), float(cx), float(r)), 0.0, 1.0).astype(np.float32)[None]
        img = img * (1 - a) + a * np.asarray(COLOURS[colour], np.float32)[:, None, None]
    return img.astype(np.float32)


def _place(rng: np.random.Generator, radii: list[float], gap: float = 3.0, tries: int = 200):
    """Random non-overlapping centres for shapes of the given radii (None if it fails)."""
    for _ in range(tries):
        out = []
        for r in radii:
            for _ in range(50):
                cy, cx = rng.uniform(r + 1, H - r - 1), rng.uniform(r + 1, W - r - 1)
                if all(np.hypot(cy - y, cx - x) >= r + q + gap for y, x, q in out):
                    out.append((cy, cx, r))
                    break
            else:
                break
        if len(out) == len(radii):
            return out
    return None


def _count_prompt(n: int, colour: str | None, shape: str) -> str:
    noun = shape if n == 1 else PLURAL[shape]
    words = ([NUMBERS[n - 1]] if n else []) + ([colour] if colour else []) + [noun]
    return " ".join(words)


def scene_single(rng, colour=None, shape=None):
    colour = colour or rng.choice(COLOUR_NAMES)
    shape = shape or rng.choice(SHAPES)
    r = rng.uniform(4.0, 6.5)
    (cy, cx, r), = _place(rng, [r])
    return [(shape, colour, cy, cx, r)], colour, shape


def scene_count(rng, n=None, colour=None, shape=None):
    n = int(n or rng.integers(1, 6))
    colour = colour or rng.choice(COLOUR_NAMES)
    shape = shape or rng.choice(SHAPES)
    while True:
        radii = [rng.uniform(3.0, 4.2)] * n
        pos = _place(rng, radii)
        if pos is not None:
            return [(shape, colour, cy, cx, r) for cy, cx, r in pos], n, colour, shape


def scene_pair(rng, c1, s1, rel, c2, s2):
    dy, dx = RELATIONS[rel]
    r1, r2 = rng.uniform(3.5, 5.0), rng.uniform(3.5, 5.0)
    dist = rng.uniform(r1 + r2 + 3, r1 + r2 + 8)
    jit = rng.uniform(-3, 3)
    oy, ox = dy * dist + (jit if dy == 0 else 0), dx * dist + (jit if dx == 0 else 0)  # first - second
    lo = [max(r1 + 1 - oy / 2, r2 + 1 + oy / 2), max(r1 + 1 - ox / 2, r2 + 1 + ox / 2)]
    hi = [min(H - r1 - 1 - oy / 2, H - r2 - 1 + oy / 2), min(W - r1 - 1 - ox / 2, W - r2 - 1 + ox / 2)]
    my, mx = rng.uniform(lo[0], max(lo[0], hi[0])), rng.uniform(lo[1], max(lo[1], hi[1]))
    return [(s1, c1, my + oy / 2, mx + ox / 2, r1), (s2, c2, my - oy / 2, mx - ox / 2, r2)]


def scene_with_cross(rng, colour, shape, cross: bool):
    r = rng.uniform(4.0, 6.0)
    if not cross:
        (cy, cx, r), = _place(rng, [r])
        return [(shape, colour, cy, cx, r)]
    rc = rng.uniform(3.0, 4.0)
    (cy, cx, r), (qy, qx, rc) = _place(rng, [r, rc])
    return [(shape, colour, cy, cx, r), ("cross", "red", qy, qx, rc)]


def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


def sample_task_scene(rng, task: str):
    """One image of a task prompt's designed distribution; returns (items, prompt)."""
    if task == "count":
        items, *_ = scene_count(rng, shape="circle")
    elif task == "colour":
        items, *_ = scene_single(rng, shape="square")
    elif task == "spatial":
        items = scene_pair(rng, "red", "circle", _pick(rng, list(RELATIONS)), "blue", "square")
    elif task == "removal":
        items = scene_with_cross(rng, "green", "triangle", rng.random() < CROSS_PROB)
    else:
        raise KeyError(task)
    return items, TASK_PROMPTS[task]


FAMILY_PROBS = {"single": 0.2, "count": 0.25, "pair": 0.22, "scene": 0.13, "task": 0.2}


def sample_scene(rng: np.random.Generator):
    """Draw one (items, prompt) pair from the full training distribution."""
    fam = rng.choice(list(FAMILY_PROBS), p=list(FAMILY_PROBS.values()))
    u = rng.random()
    if fam == "single":
        items, c, s = scene_single(rng)
        prompt = f"a {c} {s}" if u < 0.6 else (f"a {s}" if u < 0.85 else f"a {c} shape")
    elif fam == "count":
        items, n, c, s = scene_count(rng)
        if u < 0.5:
            prompt = _count_prompt(n, c, s)
        elif u < 0.7:
            prompt = _count_prompt(n, None, s)
        elif u < 0.85:
            prompt = f"{c} {PLURAL[s]}"
        else:
            prompt = PLURAL[s]
    elif fam == "pair":
        c1, c2 = rng.choice(COLOUR_NAMES, 2, replace=False)
        s1, s2 = rng.choice(SHAPES, 2, replace=False)
        rel = _pick(rng, list(RELATIONS))
        items = scene_pair(rng, c1, s1, rel, c2, s2)
        if u < 0.6:
            prompt = f"a {c1} {s1} {rel} a {c2} {s2}"
        elif u < 0.85:
            prompt = f"a {c1} {s1} and a {c2} {s2}"
        else:
            prompt = f"a {s1} {rel} a {s2}"
    elif fam == "scene":
        c = _pick(rng, [k for k in COLOUR_NAMES if k != "red"])
        s = _pick(rng, [k for k in SHAPES if k != "cross"])
        if u < 0.6:
            cross = rng.random() < CROSS_PROB
            prompt = f"a scene with a {c} {s}"
        elif u < 0.8:
            cross, prompt = True, f"a scene with a {c} {s} and a red cross"
        else:
            cross, prompt = False, f"a scene with only a {c} {s}"
        items = scene_with_cross(rng, c, s, cross)
    else:
        items, prompt = sample_task_scene(rng, _pick(rng, list(TASK_PROMPTS)))
    return items, prompt


def sample_batch(rng: np.random.Generator, n: int, task: str | None = None):
    """``n`` images (float32 [n, 3, H, W] in [0, 1]) and their prompts; ``task`` restricts to a task prompt."""
    imgs, prompts = [], []
    for _ in range(n):
        items, p = sample_task_scene(rng, task) if task else sample_scene(rng)
        imgs.append(draw(items))
        prompts.append(p)
    return np.stack(imgs), prompts


def vocabulary() -> list[str]:
    """Every word the grammar can produce (the text encoder's fixed vocabulary)."""
    words = {"a", "and", "scene", "with", "only", "shape", "of"}
    words |= set(COLOUR_NAMES) | set(SHAPES) | set(PLURAL.values()) | set(NUMBERS)
    words |= {w for rel in RELATIONS for w in rel.split()}
    return sorted(words)
