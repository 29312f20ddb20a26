"""Write the example workflows (UI format, shown in ComfyUI's template browser) and their
thumbnails.

    python scripts/make_workflows.py      # writes example_workflows/*.json and *.jpg

- hero_sd15_round: one HERO round on SD1.5 (the exports take HERO Train's session output, so
  they run after the training);
- hero_sdxl_round: the same for SDXL (1024x1024), with the preference-dataset and noise exports;
- hero_use_exported_lora: the exported LoRA in a normal KSampler workflow (no HERO nodes);
- hero_start_from_noise: the exported LoRA plus the exported noise latent (Load Latent ->
  KSampler Advanced without added noise), HERO's feedback-guided start without HERO nodes.

Every node carries ``properties.cnr_id`` (the Registry pack id: ``hero-online-lora`` for HERO
nodes, ``comfy-core`` for ComfyUI's) and ``ver``, so the front end can offer to install a missing
pack. The thumbnails are drawn from the graph itself (boxes and links), not screenshots.
tests/host/test_workflows.py checks each workflow against a running ComfyUI and runs them."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "example_workflows"
PACK_ID = "hero-online-lora"
CORE_VER = "0.3.64"  # the oldest ComfyUI the pack supports


def pack_version() -> str:
    for line in (ROOT / "pyproject.toml").read_text().splitlines():
        if line.startswith("version"):
            return line.split("=", 1)[1].strip().strip('"')
    raise SystemExit("no version in pyproject.toml")


# output / input socket types by node type, in slot order (what the links need)
OUTPUTS = {
    "CheckpointLoaderSimple": [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")],
    "CLIPTextEncode": [("CONDITIONING", "CONDITIONING")],
    "HERO_Session": [("session", "HERO_SESSION")],
    "HERO_Generate": [("images", "IMAGE"), ("latent", "LATENT"), ("batch", "HERO_BATCH")],
    "HERO_Feedback": [("feedback", "HERO_FEEDBACK")],
    "HERO_Train": [("model", "MODEL"), ("metrics", "IMAGE"), ("session", "HERO_SESSION")],
    "HERO_ExportLoRA": [("lora_name", "STRING")],
    "HERO_ExportPreferences": [("path", "STRING")],
    "HERO_ExportNoise": [("latent_name", "STRING")],
    "PreviewImage": [],
    "SaveImage": [],
    "LoraLoader": [("MODEL", "MODEL"), ("CLIP", "CLIP")],
    "EmptyLatentImage": [("LATENT", "LATENT")],
    "KSampler": [("LATENT", "LATENT")],
    "KSamplerAdvanced": [("LATENT", "LATENT")],
    "VAEDecode": [("IMAGE", "IMAGE")],
    "LoadLatent": [("LATENT", "LATENT")],
}
INPUTS = {
    "CLIPTextEncode": [("clip", "CLIP")],
    "HERO_Generate": [("model", "MODEL"), ("positive", "CONDITIONING"),
                      ("negative", "CONDITIONING"), ("vae", "VAE"), ("session", "HERO_SESSION")],
    "HERO_Feedback": [("batch", "HERO_BATCH"), ("images", "IMAGE")],
    "HERO_Train": [("model", "MODEL"), ("session", "HERO_SESSION"), ("feedback", "HERO_FEEDBACK")],
    "HERO_ExportLoRA": [("session", "HERO_SESSION"), ("after", "MODEL")],
    "HERO_ExportPreferences": [("session", "HERO_SESSION")],
    "HERO_ExportNoise": [("session", "HERO_SESSION")],
    "PreviewImage": [("images", "IMAGE")],
    "SaveImage": [("images", "IMAGE")],
    "LoraLoader": [("model", "MODEL"), ("clip", "CLIP")],
    "KSampler": [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                 ("latent_image", "LATENT")],
    "KSamplerAdvanced": [("model", "MODEL"), ("positive", "CONDITIONING"),
                         ("negative", "CONDITIONING"), ("latent_image", "LATENT")],
    "VAEDecode": [("samples", "LATENT"), ("vae", "VAE")],
}
TITLES = {"HERO_Session": "HERO Session", "HERO_Generate": "HERO Generate",
          "HERO_Feedback": "HERO Feedback", "HERO_Train": "HERO Train",
          "HERO_ExportLoRA": "HERO Export LoRA", "HERO_ExportPreferences": "HERO Export Preferences",
          "HERO_ExportNoise": "HERO Export Noise Latent", "CheckpointLoaderSimple": "Load Checkpoint",
          "CLIPTextEncode": "CLIP Text Encode", "PreviewImage": "Preview Image",
          "SaveImage": "Save Image", "LoraLoader": "Load LoRA", "EmptyLatentImage": "Empty Latent Image",
          "KSampler": "KSampler", "KSamplerAdvanced": "KSampler (Advanced)",
          "VAEDecode": "VAE Decode", "LoadLatent": "Load Latent"}


class Graph:
    def __init__(self, title: str, note: str):
        self.title, self.note = title, note
        self.nodes: list[dict] = []
        self.links: list[list] = []

    def node(self, type_: str, pos, size, widgets=(), title=None) -> int:
        nid = len(self.nodes) + 1
        hero = type_.startswith("HERO_")
        n = {"id": nid, "type": type_, "pos": list(pos), "size": list(size), "flags": {},
             "order": nid - 1, "mode": 0,
             "inputs": [{"name": a, "type": t, "link": None} for a, t in INPUTS.get(type_, [])],
             "outputs": [{"name": a, "type": t, "links": [], "slot_index": i}
                         for i, (a, t) in enumerate(OUTPUTS.get(type_, []))],
             "properties": {"cnr_id": PACK_ID if hero else "comfy-core",
                            "ver": pack_version() if hero else CORE_VER,
                            "Node name for S&R": type_},
             "widgets_values": list(widgets)}
        if title:
            n["title"] = title
        self.nodes.append(n)
        return nid

    def link(self, src: int, slot: int, dst: int, name: str) -> None:
        lid = len(self.links) + 1
        s, d = self.nodes[src - 1], self.nodes[dst - 1]
        out = s["outputs"][slot]
        inp = next(i for i in d["inputs"] if i["name"] == name)
        assert inp["type"] == out["type"], (s["type"], out, d["type"], inp)
        out["links"].append(lid)
        inp["link"] = lid
        self.links.append([lid, src, slot, dst, d["inputs"].index(inp), out["type"]])

    def to_json(self, group: str) -> dict:
        xs = [n["pos"][0] + n["size"][0] for n in self.nodes]
        ys = [n["pos"][1] + n["size"][1] for n in self.nodes]
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links),
                "nodes": self.nodes, "links": self.links,
                "groups": [{"title": group, "bounding": [20, -20, max(xs) + 40, max(ys) + 60],
                            "color": "#3f789e", "font_size": 20, "flags": {}}],
                "config": {}, "extra": {"ds": {"scale": 0.6, "offset": [40, 80]}}, "version": 0.4}


def _session_widgets(batch: int) -> list:
    # session_id, method, batch_size, steps, cfg, lora_rank, lora_alpha, learning_rate,
    # timesteps_per_sample, beta, epsilon, budget, encoder_epochs, seed, repair, update_steps,
    # micro_batch, gradient_checkpointing, chains_on, mixed_precision, release_models
    return ["my_hero_session", "hero", batch, 20, 5.0, 4, 4.0, 0.001, 5, 0.5, 0.1, 512, 500, 0,
            False, 100, 0, False, "cpu", "auto", True]


def round_graph(family: str) -> Graph:
    sdxl = family == "sdxl"
    g = Graph(f"HERO: online human-feedback LoRA ({'SDXL' if sdxl else 'SD1.5'})",
              "mark good / bad / best -> PPO on the LoRA")
    ck = g.node("CheckpointLoaderSimple", (40, 120), (320, 100),
                ["sd_xl_base_1.0.safetensors" if sdxl else "v1-5-pruned-emaonly.safetensors"])
    pos = g.node("CLIPTextEncode", (400, 40), (400, 160),
                 ["a watercolor painting of a lighthouse at sunset"], title="positive")
    neg = g.node("CLIPTextEncode", (400, 240), (400, 160), ["blurry, low quality"],
                 title="negative")
    ses = g.node("HERO_Session", (40, 300), (320, 560), _session_widgets(4 if sdxl else 8))
    size = 1024 if sdxl else 512
    gen = g.node("HERO_Generate", (840, 120), (320, 330), [0, 0, 0.0, size, size, 0])
    fb = g.node("HERO_Feedback", (1200, 120), (420, 520), [3600, ""])
    tr = g.node("HERO_Train", (1660, 120), (300, 140), [])
    pv = g.node("PreviewImage", (1660, 320), (360, 300), [], title="metrics")
    ex = g.node("HERO_ExportLoRA", (2000, 120), (320, 150), ["hero_xl" if sdxl else "hero",
                                                             "fp16", ""])
    for a, s, b, n in ((ck, 1, pos, "clip"), (ck, 1, neg, "clip"), (ck, 0, gen, "model"),
                       (pos, 0, gen, "positive"), (neg, 0, gen, "negative"), (ck, 2, gen, "vae"),
                       (ses, 0, gen, "session"), (gen, 2, fb, "batch"), (gen, 0, fb, "images"),
                       (ck, 0, tr, "model"), (ses, 0, tr, "session"), (fb, 0, tr, "feedback"),
                       (tr, 1, pv, "images"), (tr, 2, ex, "session")):
        g.link(a, s, b, n)
    if sdxl:
        pr = g.node("HERO_ExportPreferences", (2000, 320), (320, 80), [])
        nz = g.node("HERO_ExportNoise", (2000, 450), (320, 100), [16])
        g.link(tr, 2, pr, "session")
        g.link(tr, 2, nz, "session")
    return g


def use_lora_graph(noise: bool) -> Graph:
    g = Graph("HERO: start from the exported noises" if noise else "HERO: use the exported LoRA",
              "no HERO nodes needed" if not noise else "Load Latent -> KSampler (Advanced), "
              "add_noise disable")
    ck = g.node("CheckpointLoaderSimple", (40, 120), (320, 100), ["v1-5-pruned-emaonly.safetensors"])
    lo = g.node("LoraLoader", (400, 120), (320, 130), ["hero/hero_r0008.safetensors", 1.0, 1.0])
    pos = g.node("CLIPTextEncode", (760, 40), (400, 160),
                 ["a watercolor painting of a lighthouse at sunset"], title="positive")
    neg = g.node("CLIPTextEncode", (760, 240), (400, 160), ["blurry, low quality"],
                 title="negative")
    if noise:
        lat = g.node("LoadLatent", (760, 440), (320, 80), ["hero_my_hero_session_r0008.latent"])
        ks = g.node("KSamplerAdvanced", (1200, 120), (320, 330),
                    ["disable", 0, "fixed", 20, 5.0, "ddim", "normal", 0, 20, "disable"])
    else:
        lat = g.node("EmptyLatentImage", (760, 440), (320, 110), [512, 512, 4])
        ks = g.node("KSampler", (1200, 120), (320, 270),
                    [0, "randomize", 20, 5.0, "euler", "normal", 1.0])
    vd = g.node("VAEDecode", (1560, 120), (220, 50), [])
    sv = g.node("SaveImage", (1820, 120), (360, 300), ["hero_lora"])
    for a, s, b, n in ((ck, 0, lo, "model"), (ck, 1, lo, "clip"), (lo, 1, pos, "clip"),
                       (lo, 1, neg, "clip"), (lo, 0, ks, "model"), (pos, 0, ks, "positive"),
                       (neg, 0, ks, "negative"), (lat, 0, ks, "latent_image"),
                       (ks, 0, vd, "samples"), (ck, 2, vd, "vae"), (vd, 0, sv, "images")):
        g.link(a, s, b, n)
    return g


# ---- thumbnails ---------------------------------------------------------------------------------

def _font(size: int):
    for name in ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default()


def thumbnail(g: Graph, w: int = 512, h: int = 288) -> Image.Image:
    """The graph drawn small: one rounded box per node (HERO nodes outlined blue), its title,
    and the links as lines between the boxes' sides."""
    im = Image.new("RGB", (w, h), (30, 31, 36))
    d = ImageDraw.Draw(im)
    d.text((12, 8), g.title, font=_font(13), fill=(235, 235, 240))
    x0 = min(n["pos"][0] for n in g.nodes)
    y0 = min(n["pos"][1] for n in g.nodes)
    x1 = max(n["pos"][0] + n["size"][0] for n in g.nodes)
    y1 = max(n["pos"][1] + n["size"][1] for n in g.nodes)
    s = min((w - 24) / (x1 - x0), (h - 72) / (y1 - y0))
    ox = (w - (x1 - x0) * s) / 2
    oy = 34 + (h - 72 - (y1 - y0) * s) / 2

    def box(n):
        x, y = ox + (n["pos"][0] - x0) * s, oy + (n["pos"][1] - y0) * s
        return [x, y, x + n["size"][0] * s, y + max(n["size"][1] * s, 16)]

    boxes = {n["id"]: box(n) for n in g.nodes}
    for _, a, _, b, _, t in g.links:
        ba, bb = boxes[a], boxes[b]
        col = (250, 190, 70) if t.startswith("HERO") else (120, 160, 220)
        d.line([(ba[2], (ba[1] + ba[3]) / 2), (bb[0], (bb[1] + bb[3]) / 2)], fill=col, width=2)
    for n in g.nodes:
        b = boxes[n["id"]]
        hero = n["type"].startswith("HERO_")
        d.rounded_rectangle(b, radius=5, fill=(52, 54, 64),
                            outline=(110, 170, 250) if hero else (120, 120, 130), width=2)
        label = n.get("title") or TITLES.get(n["type"], n["type"])
        f = _font(9)
        while len(label) > 3 and d.textlength(label, font=f) > b[2] - b[0] - 6:
            label = label[:-2].rstrip() + "…" if not label.endswith("…") else \
                label[:-2].rstrip() + "…"
        d.text((b[0] + 4, b[1] + 3), label, font=f, fill=(230, 230, 235))
    d.text((12, h - 20), g.note, font=_font(11), fill=(180, 180, 190))
    return im


WORKFLOWS = {
    "hero_sd15_round": (lambda: round_graph("sd15"),
                        "One queued prompt = one HERO round: generate -> mark -> train -> export. "
                        "Queue again for the next round."),
    "hero_sdxl_round": (lambda: round_graph("sdxl"),
                        "SDXL: one queued prompt = one HERO round (1024x1024, batch 4). The "
                        "exports take HERO Train's session, so they follow the training."),
    "hero_use_exported_lora": (lambda: use_lora_graph(False),
                               "The exported LoRA (models/loras/hero/) in a normal workflow: pick "
                               "your file in Load LoRA, use the prompt it was trained on."),
    "hero_start_from_noise": (lambda: use_lora_graph(True),
                              "HERO's feedback-guided start without HERO nodes: the noises from "
                              "HERO Export Noise Latent, sampled with no added noise."),
}


def main(out: Path = OUT) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, (make, group) in WORKFLOWS.items():
        g = make()
        (out / f"{name}.json").write_text(json.dumps(g.to_json(group), indent=1) + "\n")
        thumbnail(g).save(out / f"{name}.jpg", quality=90)
        paths += [out / f"{name}.json", out / f"{name}.jpg"]
    return paths


if __name__ == "__main__":
    for p in main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT):
        print(p)
