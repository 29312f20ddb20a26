"""What the tools people use read around an exported LoRA, and the session's data for other tools.

No ComfyUI imports: the ComfyUI nodes (``nodes/host.py``) and the toy demo call these.

- ``lora.safetensors_hashes`` (written by the kohya export itself): ``sshs_model_hash`` / ``sshs_legacy_hash`` exactly as kohya
  sd-scripts' ``precalculate_safetensors_hashes`` computes them (``library/train_util.py``:
  serialise the tensors with only the ``ss_*`` metadata; the model hash is the SHA-256 of
  everything after the header, the legacy hash the first 8 hex digits of the SHA-256 of the
  64 KiB at offset 1 MiB). A1111 writes the model hash into image infotext; sites read it.
- :func:`thumbnail_data_url`: ``modelspec.thumbnail`` (a small JPEG as a ``data:`` URL).
- :func:`tag_frequency`: ``ss_tag_frequency`` from the session's prompts (A1111's LoRA card shows
  it as the training tags).
- :func:`a1111_user_metadata`: the ``<name>.json`` sidecar A1111/Forge's extra-networks card reads.
- :func:`session_card`: everything above for a session (metadata + sidecar), given its folder.
- :func:`preference_pairs` / :func:`export_preferences`: the marks as good-vs-bad pairs (JSONL).
- :func:`guided_noises` / :func:`export_noise_latent`: the best and good initial noises as a
  ``.latent`` file ComfyUI's LoadLatent reads.
"""
from __future__ import annotations

import base64
import io
import json
import math
import os
import time
from collections import Counter
from pathlib import Path
from typing import Iterable, Optional

import torch

from .fileio import PUBLIC_MODE, atomic_write_bytes

__all__ = ["thumbnail_data_url", "split_tags", "tag_frequency",
           "a1111_user_metadata", "session_card", "session_prompts", "preference_pairs",
           "export_preferences", "guided_noises", "export_noise_latent", "NOISE_SIGMA_MAX",
           "LATENT_SCALE"]


# ---- hashes -------------------------------------------------------------------------------------

# ---- thumbnail, tags, sidecar -------------------------------------------------------------------

def thumbnail_data_url(image_path: str | os.PathLike, size: int = 256, quality: int = 85) -> str:
    """A JPEG thumbnail (longest side ``size`` px) of the image as ``data:image/jpeg;base64,...``,
    the form ModelSpec recommends for ``modelspec.thumbnail``."""
    from PIL import Image
    with Image.open(image_path) as im:
        im = im.convert("RGB")
        im.thumbnail((size, size))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def split_tags(prompt: str) -> list[str]:
    """A prompt as A1111/kohya captions count tags: comma-separated, stripped, empty ones dropped."""
    return [t.strip() for t in str(prompt).split(",") if t.strip()]


def tag_frequency(prompts: Iterable[tuple[str, int]], dataset: str = "hero") -> dict:
    """``ss_tag_frequency`` ({dataset: {tag: count}}, kohya's layout) from (prompt, images marked
    with it) pairs: every tag of a prompt counts once per marked image."""
    c: Counter = Counter()
    for prompt, n in prompts:
        for t in split_tags(prompt):
            c[t] += int(n)
    return {dataset: dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))}


_SD_VERSION = {"sd15": "SD1", "sdxl": "SDXL"}


def a1111_user_metadata(description: str, family: str, notes: str = "",
                        preferred_weight: float = 1.0, activation_text: str = "",
                        negative_text: str = "") -> dict:
    """The ``<lora name>.json`` next to the file that A1111/Forge's extra-networks card edits and
    reads (``ui_extra_networks_user_metadata`` + the Lora page): description, "sd version"
    (SD1 / SD2 / SDXL / Unknown), activation text, preferred weight, negative text, notes."""
    return {"description": description, "sd version": _SD_VERSION.get(family, "Unknown"),
            "activation text": activation_text, "preferred weight": float(preferred_weight),
            "negative text": negative_text, "notes": notes}


def _read_json(p: Path) -> Optional[dict]:
    try:
        return json.loads(Path(p).read_text())
    except (OSError, ValueError):
        return None


def session_prompts(session) -> list[dict]:
    """Per completed (marked) round: {round, prompt, negative, marks, seed, width, height}."""
    out = []
    for round_idx in range(session.round + 1):
        d = session.round_dir(round_idx)
        meta = _read_json(d / "meta.json")
        marks = session.marks_for(round_idx) if (d / "marks.json").exists() else None
        if meta is None or marks is None:
            continue
        prompts = meta.get("prompts") or []
        prompt = meta.get("prompt_text") or (prompts[0] if prompts else "")
        out.append({"round": round_idx, "prompt": prompt, "negative": meta.get("negative_text", ""),
                    "marks": marks.num_marked, "seed": meta.get("seed"), "width": meta.get("width"),
                    "height": meta.get("height"), "time": meta.get("time")})
    return out


def _created(session) -> Optional[float]:
    for name in ("session.json", "session.init.json"):
        m = _read_json(Path(session.path) / name)
        if m and isinstance(m.get("created"), (int, float)):
            return float(m["created"])
    return None


def _finished(session) -> Optional[float]:
    round_idx = session.round - 1
    if round_idx < 0:
        return None
    p = session.round_dir(round_idx) / "metrics.json"
    try:
        return p.stat().st_mtime
    except OSError:
        return None


def session_card(session, family: str, base_model: str = "", author: str = "",
                 preferred_weight: float = 1.0) -> tuple[dict, dict]:
    """(safetensors metadata, A1111 sidecar) describing a session's LoRA for the tools people use:
    modelspec description/author/tags/thumbnail, ss_sd_model_name, training start/end, marks
    used, resolution, seed and the prompts as training tags."""
    rounds = session_prompts(session)
    prompts = [r["prompt"] for r in rounds if r["prompt"]]
    distinct = list(dict.fromkeys(prompts))
    config = session.config
    sizes = Counter((r["width"], r["height"]) for r in rounds if r["width"] and r["height"])
    res = sizes.most_common(1)[0][0] if sizes else None
    trained = session.round
    desc = (f"HERO online LoRA from {session.marks_used} human marks over {trained} round"
            f"{'s' if trained != 1 else ''} (session {session.session_id}, method {config.method}, "
            f"rank {config.lora_rank}, alpha {config.lora_alpha:g}).")
    if distinct:
        desc += " Trained on the prompt" + ("s: " if len(distinct) > 1 else ": ") + \
            " | ".join(distinct[:8])
    md = {
        "modelspec.description": desc,
        "modelspec.author": author or "ComfyUI-HERO user",
        "modelspec.tags": ", ".join(["hero", "online-rlhf", "human-feedback", "lora", family]),
        "ss_sd_model_name": base_model or "",
        "ss_num_train_images": str(session.marks_used),
        "ss_seed": str(config.seed),
        "ss_tag_frequency": json.dumps(tag_frequency(((r["prompt"], r["marks"]) for r in rounds),
                                                     dataset=f"hero_{session.session_id}")),
        "ss_dataset_dirs": json.dumps({f"hero_{session.session_id}": {
            "n_repeats": 1, "img_count": session.marks_used}}),
        "ss_num_epochs": str(trained),
    }
    started, finished = _created(session), _finished(session)
    if started is not None:
        md["ss_training_started_at"] = repr(started)
    if finished is not None:
        md["ss_training_finished_at"] = repr(finished)
    if res:
        md["ss_resolution"] = f"({res[0]}, {res[1]})"
        md["modelspec.resolution"] = f"{res[0]}x{res[1]}"
    bp = session.best_image_path()
    if bp is not None and Path(bp).is_file():
        md["modelspec.thumbnail"] = thumbnail_data_url(bp)
    notes = (f"Made with ComfyUI-HERO (HERO, arXiv 2410.05116): {session.marks_used} marks, "
             f"{trained} rounds, base model {base_model or 'unknown'}. No trigger word: use it "
             f"with the prompt it was trained on.")
    negs = [r["negative"] for r in rounds if r["negative"]]
    sidecar = a1111_user_metadata(desc, family, notes, preferred_weight,
                                  activation_text=distinct[-1] if distinct else "",
                                  negative_text=negs[-1] if negs else "")
    return md, sidecar


# ---- preference dataset -------------------------------------------------------------------------

def preference_pairs(session, relative_to: Optional[str | os.PathLike] = None) -> list[dict]:
    """Every (good, bad) pair of every marked round, in round order, as records offline DPO tools
    read: Pick-a-Pic-like ``caption``, ``image_0``/``image_1``, ``label_0``/``label_1`` (image_0 is
    the preferred one) and TRL-like ``prompt``/``chosen``/``rejected``; plus round, seed,
    indices, whether the chosen image was the round's best pick, and the negative prompt.
    Image paths are relative to ``relative_to`` when given (the dataset file's folder)."""
    base = None if relative_to is None else Path(relative_to).resolve()
    config = session.config
    rows = []

    def path(round_idx, i):
        p = Path(session.image_path(round_idx, i)).resolve()
        return os.path.relpath(p, base) if base is not None else str(p)

    for r in session_prompts(session):
        round_idx = r["round"]
        m = session.marks_for(round_idx)
        for g in m.good:
            for b in m.bad:
                rows.append({"prompt": r["prompt"], "caption": r["prompt"],
                             "negative_prompt": r["negative"],
                             "chosen": path(round_idx, g), "rejected": path(round_idx, b),
                             "image_0": path(round_idx, g), "image_1": path(round_idx, b),
                             "label_0": 1.0, "label_1": 0.0,
                             "round": round_idx, "chosen_index": g, "rejected_index": b,
                             "chosen_is_best": m.best == g,
                             "seed": config.seed, "sampler_seed": r["seed"],
                             "width": r["width"], "height": r["height"],
                             "session": session.session_id})
    return rows


def export_preferences(session, path: str | os.PathLike) -> dict:
    """Write :func:`preference_pairs` as JSONL (one pair a line, paths relative to the file's
    folder), atomically with normal permissions -> {path, pairs, rounds}."""
    path = Path(path)
    rows = preference_pairs(session, relative_to=path.parent)
    data = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
    atomic_write_bytes(path, data.encode("utf-8"), mode=PUBLIC_MODE)
    return {"path": str(path), "pairs": len(rows), "rounds": len({r["round"] for r in rows})}


# ---- guided initial noises ----------------------------------------------------------------------



def _sigma_max() -> float:
    """sigma at t = 999 of SD1.5's and SDXL's schedule (scaled_linear 0.00085 -> 0.012, 1000
    steps), which ComfyUI's ModelSamplingDiscrete uses for both: 14.6146."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1.0 - betas, 0)[-1]
    return float(((1 - ac) / ac) ** 0.5)


NOISE_SIGMA_MAX = _sigma_max()
LATENT_SCALE = {"sd15": 0.18215, "sdxl": 0.13025}


def guided_noises(session) -> tuple[torch.Tensor, list[dict]]:
    """The session's best initial noise first, then every good image's initial noise (newest
    round first, the best not repeated) -> (noises [N, C, H, W] of N(0, I) x_T, one
    {round, index, best} per row). Empty when nothing is marked good yet."""
    from .session import torch_load
    rows, info, seen = [], [], set()
    b = session.best
    order = [(b.round, b.index, True)] if b is not None else []
    for round_idx in range(session.round, -1, -1):
        marked = (session.round_dir(round_idx) / "marks.json").exists()
        m = session.marks_for(round_idx) if marked else None
        if m is not None:
            order += [(round_idx, i, False) for i in m.good]
    cache: dict = {}
    for round_idx, i, best in order:
        if (round_idx, i) in seen:
            continue
        p = session.round_dir(round_idx) / "generated.pt"
        if round_idx not in cache:
            cache[round_idx] = torch_load(p)["noises"] if p.is_file() else None
        n = cache[round_idx]
        if n is None or i >= len(n):
            continue
        seen.add((round_idx, i))
        rows.append(n[i].float())
        info.append({"round": round_idx, "index": i, "best": best})
    if not rows:
        return torch.zeros(0), []
    shapes = {tuple(r.shape) for r in rows}
    if len(shapes) > 1:  # rounds of different sizes: keep the best's size
        keep = tuple(rows[0].shape)
        pairs = [(r, d) for r, d in zip(rows, info) if tuple(r.shape) == keep]
        rows, info = [p[0] for p in pairs], [p[1] for p in pairs]
    return torch.stack(rows), info


def export_noise_latent(session, path: str | os.PathLike, family: str, limit: int = 64) -> dict:
    """Write the best and good initial noises (:func:`guided_noises`, at most ``limit``) as a
    ComfyUI ``.latent`` file (safetensors ``latent_tensor`` + ``latent_format_version_0``, what
    SaveLatent writes and LoadLatent reads).

    The tensor is the noise scaled to ComfyUI's first sampling step at sigma_max (x_T * sqrt(1 +
    sigma_max^2)) and divided by the family's latent scale factor, so that LoadLatent ->
    KSamplerAdvanced (add_noise disable, a scheduler starting at sigma_max such as normal or
    karras, start_at_step 0, return_with_leftover_noise disable) starts exactly from these
    noises: the feedback-guided start without HERO nodes."""
    from safetensors.torch import save as st_save
    if family not in LATENT_SCALE:
        raise ValueError(f"no latent scale for family {family!r} (use one of "
                         f"{', '.join(LATENT_SCALE)})")
    noises, info = guided_noises(session)
    if len(info) == 0:
        raise ValueError(f"session '{session.session_id}' has no good or best image yet: mark a "
                         f"round first")
    noises, info = noises[:limit], info[:limit]
    scaled = (noises * math.sqrt(1.0 + NOISE_SIGMA_MAX ** 2) / LATENT_SCALE[family]).contiguous()
    md = {"hero_session_id": session.session_id, "hero_rows": json.dumps(info),
          "hero_family": family, "hero_sigma_max": repr(NOISE_SIGMA_MAX),
          "hero_usage": ("LoadLatent -> KSamplerAdvanced: add_noise disable, scheduler normal "
                         "or karras, start_at_step 0, end_at_step = steps"),
          "hero_time": repr(time.time())}
    blob = st_save({"latent_tensor": scaled, "latent_format_version_0": torch.tensor([])}, md)
    atomic_write_bytes(path, blob, mode=PUBLIC_MODE)
    return {"path": str(path), "noises": len(info), "best": bool(info and info[0]["best"]),
            "shape": list(scaled.shape)}
