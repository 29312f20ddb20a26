"""Write locales/en/ (nodeDefs.json, settings.json, main.json) from the nodes' own schemas and the
front end's settings, in the layout ComfyUI's front end reads from ``GET /i18n``.

    COMFYUI_PATH=~/comfy/ComfyUI ~/comfy/venv/bin/python scripts/make_locales.py

nodeDefs: {node_id: {display_name, description, inputs: {id: {name, tooltip}}, outputs:
{index: {name, tooltip}}}}; settings: {setting id with '.' -> '_': {name, tooltip?, options?}}.
tests/host/test_workflows.py checks the files match the schemas and web/js/hero_dom.js."""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# the settings web/js/hero_dom.js declares (its names, verbatim; the test compares them)
SETTINGS = {
    "HERO.DefaultMark": {"name": "HERO: default mark of a new image",
                         "tooltip": "The mark every image starts with when the marking panel opens.",
                         "options": {"bad": "bad", "good": "good"}},
    "HERO.AutoOpen": {"name": "HERO: open the marking panel when a batch is ready"},
    "HERO.Sound": {"name": "HERO: play a sound when a batch is ready"},
    "HERO.ThumbSize": {"name": "HERO: thumbnail size in the marking panel (px)"},
}
MAIN = {"settingsCategories": {"HERO": "HERO", "Marking": "Marking"}}


def node_defs() -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    cpath = Path(os.path.expanduser(os.environ.get("COMFYUI_PATH", "~/comfy/ComfyUI")))
    sys.path.insert(0, str(cpath))
    from comfy.cli_args import args
    args.cpu = True
    from support.pack_import import import_pack_module
    nodes = import_pack_module("nodes.nodes")
    feedback = import_pack_module("nodes.feedback")
    out = {}
    for cls in [*nodes.NODES, feedback.HERO_Feedback]:
        s = cls.define_schema()
        d = {"display_name": s.display_name, "description": s.description, "inputs": {},
             "outputs": {}}
        for i in s.inputs:
            e = {"name": getattr(i, "display_name", None) or i.id}
            if i.tooltip:
                e["tooltip"] = i.tooltip
            d["inputs"][i.id] = e
        for k, o in enumerate(s.outputs):
            e = {"name": getattr(o, "display_name", None) or o.id}
            if o.tooltip:
                e["tooltip"] = o.tooltip
            d["outputs"][str(k)] = e
        out[s.node_id] = d
    return dict(sorted(out.items()))


def settings() -> dict:
    declared = js_settings((ROOT / "web" / "js" / "hero_dom.js").read_text())
    names = {k: v["name"] for k, v in SETTINGS.items()}
    if declared != names:
        raise SystemExit(f"web/js/hero_dom.js declares the settings {declared}, this script "
                         f"{names}: update SETTINGS here to match the front end")
    return {k.replace(".", "_"): v for k, v in SETTINGS.items()}


def main() -> list[Path]:
    d = ROOT / "locales" / "en"
    d.mkdir(parents=True, exist_ok=True)
    files = {"nodeDefs.json": node_defs(), "settings.json": settings(), "main.json": MAIN}
    out = []
    for name, obj in files.items():
        (d / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
        out.append(d / name)
    return out


def js_settings(js: str) -> dict:
    """{setting id: name} as web/js/hero_dom.js declares them."""
    consts = dict(re.findall(r'const (S_[A-Z]+) = "([^"]+)"', js))
    return {consts[c]: n for c, n in re.findall(r'\{ id: (S_[A-Z]+), name: "([^"]+)"', js)}


if __name__ == "__main__":
    for p in main():
        print(p)
