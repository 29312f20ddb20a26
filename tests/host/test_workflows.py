"""The example workflows against a running ComfyUI: every node exists, carries the Registry pack
id, every link joins matching sockets, the widget values fit the nodes' inputs; then they run:
the SD1.5 round (marks from the node's text field), the exported LoRA in a plain KSampler
workflow, and the exported noises through Load Latent -> KSampler (Advanced). The SDXL round is
validated by the server, which refuses only its checkpoint name (no SDXL checkpoint here).

Run: ``COMFYUI_PATH=~/comfy/ComfyUI ~/comfy/venv/bin/python -m pytest tests/host/test_workflows.py``"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from support import comfy_server as cs

REPO = Path(__file__).resolve().parents[2]
WF = REPO / "example_workflows"
NAMES = ["hero_sd15_round", "hero_sdxl_round", "hero_use_exported_lora", "hero_start_from_noise"]
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FILE_INPUTS = {"ckpt_name", "lora_name", "latent"}


def pack_version() -> str:
    return re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)


@pytest.fixture(scope="module", params=cs.hosts(), ids=lambda p: p.name)
def server(request, tmp_path_factory):
    reason = cs.host_missing_reason()
    if reason:
        pytest.skip(reason)
    ckpt = cs.cached_checkpoint()
    srv = cs.ComfyServer(tmp_path_factory.mktemp("wf"), checkpoint=ckpt, cpath=request.param)
    srv.start()
    srv.ckpt = ckpt
    st, srv.object_info = srv.get("/object_info")
    assert st == 200
    yield srv
    srv.stop()


def _inputs(info: dict) -> list[tuple[str, object, dict]]:
    """(name, type, options) of a node's required then optional inputs, in the UI's order."""
    out = []
    order = info.get("input_order") or {}
    for part in ("required", "optional"):
        spec = info["input"].get(part) or {}
        for name in order.get(part) or list(spec):
            t = spec[name]
            out.append((name, t[0], t[1] if len(t) > 1 and isinstance(t[1], dict) else {}))
    return out


def _is_widget(t, opts) -> bool:
    return (isinstance(t, list) or t in WIDGET_TYPES) and not opts.get("forceInput")


def widget_names(info: dict) -> list[str]:
    """The node's widget values in order, as the front end saves them (a seed with
    control_after_generate has an extra value after it, named '<control>')."""
    names = []
    for name, t, opts in _inputs(info):
        if _is_widget(t, opts):
            names.append(name)
            if opts.get("control_after_generate"):
                names.append("<control>")
    return names


def to_api(wf: dict, object_info: dict) -> dict:
    """UI-format workflow -> API prompt (what the front end queues)."""
    links = {ln[0]: ln for ln in wf["links"]}
    prompt = {}
    for n in wf["nodes"]:
        info = object_info[n["type"]]
        ins = {}
        for name, val in zip(widget_names(info), n.get("widgets_values") or []):
            if name != "<control>":
                ins[name] = val
        for i in n.get("inputs") or []:
            if i.get("link") is not None:
                ln = links[i["link"]]
                ins[i["name"]] = [str(ln[1]), ln[2]]
        prompt[str(n["id"])] = {"class_type": n["type"], "inputs": ins}
    return prompt


def load(name: str) -> dict:
    return json.loads((WF / f"{name}.json").read_text())


@pytest.mark.parametrize("name", NAMES)
def test_workflow_fits_the_nodes(server, name):
    oi = server.object_info
    wf = load(name)
    assert (WF / f"{name}.jpg").is_file()  # the template browser's thumbnail
    nodes = {n["id"]: n for n in wf["nodes"]}
    for n in wf["nodes"]:
        assert n["type"] in oi, n["type"]
        props = n["properties"]
        if n["type"].startswith("HERO_"):
            assert props["cnr_id"] == "hero-online-lora" and props["ver"] == pack_version()
        else:
            assert props["cnr_id"] == "comfy-core" and props["ver"]
        info = oi[n["type"]]
        wn = widget_names(info)
        vals = n.get("widgets_values") or []
        assert len(vals) == len(wn), (n["type"], wn, vals)
        specs = {nm: (t, o) for nm, t, o in _inputs(info)}
        for nm, v in zip(wn, vals):
            if nm == "<control>":
                assert v in ("fixed", "increment", "decrement", "randomize"), (n["type"], v)
                continue
            t, o = specs[nm]
            choices = t if isinstance(t, list) else o.get("options") if t == "COMBO" else None
            if choices is not None and nm not in FILE_INPUTS:
                assert v in choices, (n["type"], nm, v, choices)
            if t in ("INT", "FLOAT"):
                assert isinstance(v, (int, float)) and not isinstance(v, bool), (n["type"], nm, v)
                assert o.get("min", -1e300) <= v <= o.get("max", 1e300), (n["type"], nm, v)
            if t == "BOOLEAN":
                assert isinstance(v, bool), (n["type"], nm, v)
    for lid, a, sa, b, sb, t in wf["links"]:
        out_types = oi[nodes[a]["type"]]["output"]
        assert out_types[sa] == t, (nodes[a]["type"], sa, t)
        inp = nodes[b]["inputs"][sb]
        assert inp["link"] == lid and inp["type"] == t
        specs = {nm: tt for nm, tt, _ in _inputs(oi[nodes[b]["type"]])}
        assert specs.get(inp["name"]) == t, (nodes[b]["type"], inp["name"], t)
        assert lid in nodes[a]["outputs"][sa]["links"]


def test_round_workflows_export_after_training():
    """The natural wiring: every HERO export takes HERO Train's session output."""
    for name in ("hero_sd15_round", "hero_sdxl_round"):
        wf = load(name)
        nodes = {n["id"]: n for n in wf["nodes"]}
        exports = [n for n in wf["nodes"] if n["type"].startswith("HERO_Export")]
        assert exports
        for n in exports:
            src = next(ln for ln in wf["links"] if ln[3] == n["id"] and ln[5] == "HERO_SESSION")
            assert nodes[src[1]]["type"] == "HERO_Train" and src[2] == 2, name


def test_examples_run(server):
    srv, oi = server, server.object_info
    # 1. the SD1.5 round, as shipped, with CPU-sized widgets and marks from the text field
    p = to_api(load("hero_sd15_round"), oi)
    for n in p.values():
        ins = n["inputs"]
        if n["class_type"] == "CheckpointLoaderSimple":
            ins["ckpt_name"] = srv.ckpt.name
        if n["class_type"] == "HERO_Session":
            ins.update(batch_size=4, steps=2, encoder_epochs=2, timesteps_per_sample=1,
                       update_steps=4)
        if n["class_type"] == "HERO_Generate":
            ins.update(width=64, height=64)
        if n["class_type"] == "HERO_Feedback":
            ins.update(marks="good: 1 2; best: 1", timeout=600)
    h = srv.wait_history(srv.queue(p), 600)
    assert h["status"]["status_str"] == "success", json.dumps(h["status"])[-2000:] + srv.log_tail(60)
    lora = "hero/hero_r0001.safetensors"
    assert (srv.base / "models" / "loras" / lora).is_file()
    # 2. the exported LoRA in a normal KSampler workflow
    p = to_api(load("hero_use_exported_lora"), oi)
    for n in p.values():
        ins = n["inputs"]
        if n["class_type"] == "CheckpointLoaderSimple":
            ins["ckpt_name"] = srv.ckpt.name
        if n["class_type"] == "LoraLoader":
            assert ins["lora_name"].startswith("hero/")
            ins["lora_name"] = lora
        if n["class_type"] == "EmptyLatentImage":
            ins.update(width=64, height=64, batch_size=1)
        if n["class_type"] == "KSampler":
            ins.update(steps=2)
    log0 = len(srv.log_path.read_text(errors="replace"))
    h = srv.wait_history(srv.queue(p), 300)
    assert h["status"]["status_str"] == "success", srv.log_tail(60)
    assert "lora key not loaded" not in srv.log_path.read_text(errors="replace")[log0:]
    saved = [i for o in h["outputs"].values() for i in o.get("images", [])]
    assert saved and saved[0]["type"] == "output"
    # 3. the exported noises: the panel's route writes the latent; Load Latent lists it
    st, body = srv.post("/hero/export", {"session": "my_hero_session", "kind": "noise"})
    assert st == 200, body
    p = to_api(load("hero_start_from_noise"), oi)
    for n in p.values():
        ins = n["inputs"]
        if n["class_type"] == "CheckpointLoaderSimple":
            ins["ckpt_name"] = srv.ckpt.name
        if n["class_type"] == "LoraLoader":
            ins["lora_name"] = lora
        if n["class_type"] == "LoadLatent":
            assert ins["latent"].startswith("hero_my_hero_session_r")
            ins["latent"] = body["filename"]
        if n["class_type"] == "KSamplerAdvanced":
            assert ins["add_noise"] == "disable" and ins["start_at_step"] == 0
            ins.update(steps=2, end_at_step=2)
    h = srv.wait_history(srv.queue(p), 300)
    assert h["status"]["status_str"] == "success", srv.log_tail(60)
    saved = [i for o in h["outputs"].values() for i in o.get("images", [])]
    assert len(saved) == body["noises"]  # one image per exported noise


def test_sdxl_round_is_refused_only_for_its_checkpoint(server):
    p = to_api(load("hero_sdxl_round"), server.object_info)
    st, body = server.post("/prompt", {"prompt": p, "client_id": "wf-test"})
    assert st == 400, body
    errs = [e for ne in body.get("node_errors", {}).values() for e in ne["errors"]]
    assert errs and all(e["type"] == "value_not_in_list" and
                        e["extra_info"]["input_name"] == "ckpt_name" for e in errs), errs
    ck = [k for k, n in p.items() if n["class_type"] == "CheckpointLoaderSimple"]
    assert set(body["node_errors"]) == set(ck)


# ---- node help pages and locales ----------------------------------------------------------------

def _all_node_ids(object_info: dict) -> list[str]:
    return sorted(k for k in object_info if k.startswith("HERO_"))


def test_every_node_has_a_help_page(server):
    """ComfyUI's front end shows WEB_DIRECTORY/docs/<node id>.md in the node's help panel."""
    ids = _all_node_ids(server.object_info)
    assert len(ids) == 8
    for nid in ids:
        p = REPO / "web" / "docs" / f"{nid}.md"
        assert p.is_file(), nid
        text = p.read_text()
        title = server.object_info[nid]["display_name"]
        assert text.startswith(f"# {title}"), (nid, text[:60])
        # every input the node has is explained on its page
        info = server.object_info[nid]
        for part in ("required", "optional"):
            for name in (info["input"].get(part) or {}):
                assert f"**{name}**" in text, (nid, name)
        st, body = server.get(f"/extensions/{cs.PACK_DIR_NAME}/docs/{nid}.md")
        assert st == 200, (nid, st)


def test_locales_match_the_nodes_and_settings(server):
    import sys
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import make_locales
    finally:
        sys.path.pop(0)
    en = REPO / "locales" / "en"
    defs = json.loads((en / "nodeDefs.json").read_text())
    assert set(defs) == set(_all_node_ids(server.object_info))
    for nid, d in defs.items():
        info = server.object_info[nid]
        assert d["display_name"] == info["display_name"]
        assert d["description"] == info["description"]
        names = [n for part in ("required", "optional") for n in (info["input"].get(part) or {})]
        assert set(d["inputs"]) == set(names), nid
        for n in names:
            spec = (info["input"].get("required") or {}).get(n) or info["input"]["optional"][n]
            tip = spec[1].get("tooltip") if len(spec) > 1 and isinstance(spec[1], dict) else None
            assert d["inputs"][n].get("tooltip") == tip, (nid, n)
        assert len(d["outputs"]) == len(info["output"]), nid
        for i, (t, shown) in enumerate(zip(info["output"], info["output_name"])):
            if shown != t:  # 0.3.64 labels an output without display_name by its type
                assert d["outputs"][str(i)]["name"] == shown, (nid, i)
            tips = info.get("output_tooltips") or []
            if i < len(tips) and tips[i]:
                assert d["outputs"][str(i)]["tooltip"] == tips[i], (nid, i)
    sett = json.loads((en / "settings.json").read_text())
    js = make_locales.js_settings((REPO / "web" / "js" / "hero_dom.js").read_text())
    assert len(js) == 4
    assert {k.replace(".", "_"): v for k, v in js.items()} == {k: v["name"] for k, v in sett.items()}
    # the server merges and serves them
    st, i18n = server.get("/i18n")
    assert st == 200
    assert i18n["en"]["nodeDefs"]["HERO_Train"]["outputs"]["2"]["name"] == "session"
    assert i18n["en"]["settings"]["HERO_Sound"]["name"] == js["HERO.Sound"]
    assert i18n["en"]["settingsCategories"]["HERO"] == "HERO"
