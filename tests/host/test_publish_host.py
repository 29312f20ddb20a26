"""Exports that cannot break a round, LoRA files that tools describe, and the session's data for
other tools, in-process (tiny SD1.5/SDXL models) and on a real headless server.

Run: ``COMFYUI_PATH=~/comfy/ComfyUI ~/comfy/venv/bin/python -m pytest tests/host/test_publish_host.py``"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import struct
from pathlib import Path

import pytest
import torch

from support import comfy_server as cs
from test_adapter import gen, mark_and_train, new_session
from tiny_models import make_model


def _hashes(path: Path):
    """kohya's algorithm, re-done here from its description (not hero_engine's code)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    md = json.loads(raw[8:8 + n])["__metadata__"]
    from safetensors.torch import load_file, save
    ss = {k: v for k, v in md.items() if k.startswith("ss_")}
    b = io.BytesIO(save(load_file(str(path)), ss))
    b.seek(0x100000)
    return md, hashlib.sha256(raw[8 + n:]).hexdigest(), hashlib.sha256(b.read(0x10000)).hexdigest()[:8]


def test_export_before_training_is_a_note_not_an_error(pack, dirs):
    s = new_session(pack, dirs["output"], "early")
    with pytest.raises(pack.host.NothingToExport, match="no trained LoRA yet"):
        pack.host.export_lora(s, "x")
    out = pack.nodes.HERO_ExportLoRA.execute(s, "x", "fp16")
    assert out.result == ("",)
    assert "nothing exported" in out.ui.as_dict()["text"][0]
    for node in (pack.nodes.HERO_ExportPreferences, pack.nodes.HERO_ExportNoise):
        o = node.execute(s) if node is pack.nodes.HERO_ExportPreferences else node.execute(s, 4)
        assert o.result == ("",)
    assert not list(dirs["loras"].rglob("*.safetensors"))


def test_train_outputs_the_session_for_the_exports(pack):
    sch = pack.nodes.HERO_Train.define_schema()
    outs = [o.id for o in sch.outputs]
    if hasattr(sch, "validate"):
        sch.validate()  # 0.3.64 refuses an output id equal to an input id
    assert outs[:2] == ["lora_model", "metrics"] and outs[2] == "session_out"  # old links keep slots
    assert sch.outputs[2].display_name == "session"
    prompt = {"4": {"class_type": "HERO_Session", "inputs": {}},
              "7": {"class_type": "HERO_Train", "inputs": {"session": ["4", 0]}},
              "8": {"class_type": "HERO_ExportLoRA", "inputs": {"session": ["4", 0]}},
              "9": {"class_type": "HERO_ExportLoRA", "inputs": {"session": ["7", 2]}},
              "10": {"class_type": "HERO_ExportLoRA", "inputs": {"session": ["4", 0],
                                                                 "after": ["7", 0]}}}
    assert pack.nodes.runs_before_train(prompt, "8") is True
    assert pack.nodes.runs_before_train(prompt, "9") is False
    assert pack.nodes.runs_before_train(prompt, "10") is False
    del prompt["7"]
    assert pack.nodes.runs_before_train(prompt, "8") is False


def test_trace_workflow_reads_prompt_and_checkpoint(pack):
    g = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15/base.safetensors"}},
         "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1]}},
         "p": {"class_type": "PrimitiveString", "inputs": {"value": "a cat, watercolor"}},
         "3": {"class_type": "CLIPTextEncode", "inputs": {"text": ["p", 0], "clip": ["2", 1]}},
         "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["2", 1]}},
         "c": {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["4", 0]}},
         "5": {"class_type": "HERO_Generate", "inputs": {"model": ["2", 0], "positive": ["3", 0],
                                                         "negative": ["c", 0]}}}
    assert pack.nodes.trace_workflow(g, "5") == {"prompt": "a cat, watercolor",
                                                 "negative": "blurry",
                                                 "checkpoint": "sd15/base.safetensors"}
    assert pack.nodes.trace_workflow(None, None) == {}
    assert pack.nodes.trace_workflow({"5": {"inputs": {"model": ["9", 0]}}}, "5") == {}


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_exported_lora_card_hashes_sidecar_permissions(pack, dirs, kind):
    mp = make_model(kind)
    s = new_session(pack, dirs["output"], "card")
    wf = {"prompt": "a lighthouse, watercolor", "negative": "blurry",
          "checkpoint": "base_model.safetensors"}
    old = os.umask(0o022)
    try:
        b = gen(pack, mp, kind, s, workflow=wf)
        assert s.round_meta(0)["prompt_text"] == "a lighthouse, watercolor"
        mark_and_train(pack, mp, s, b)
        res = pack.host.export_lora(s, "card", author="tester")
    finally:
        os.umask(old)
    p = Path(res["path"])
    assert (p.stat().st_mode & 0o777) == 0o644
    md, model_hash, legacy = _hashes(p)
    assert md["sshs_model_hash"] == model_hash and md["sshs_legacy_hash"] == legacy
    assert md["modelspec.hash_sha256"] == "0x" + model_hash
    assert md["ss_sd_model_name"] == "base_model.safetensors"
    assert md["ss_num_train_images"] == "4" and md["ss_seed"] == "3"
    assert md["ss_resolution"] == "(64, 64)" and md["modelspec.resolution"] == "64x64"
    assert json.loads(md["ss_tag_frequency"]) == {"hero_card": {"a lighthouse": 4, "watercolor": 4}}
    assert float(md["ss_training_started_at"]) <= float(md["ss_training_finished_at"])
    assert md["modelspec.author"] == "tester" and "lighthouse" in md["modelspec.description"]
    assert md["modelspec.thumbnail"].startswith("data:image/jpeg;base64,")
    assert "hero" in md["modelspec.tags"]
    side = p.with_suffix(".json")
    assert (side.stat().st_mode & 0o777) == 0o644
    card = json.loads(side.read_text())
    assert card["sd version"] == ("SDXL" if kind == "sdxl" else "SD1")
    assert card["preferred weight"] == 1.0 and card["description"] == md["modelspec.description"]
    assert card["activation text"] == "a lighthouse, watercolor" and card["negative text"] == "blurry"
    assert "notes" in card


def test_preferences_and_noise_latent_through_loadlatent(pack, dirs, monkeypatch, tmp_path):
    import folder_paths
    import nodes as comfy_nodes
    from safetensors.torch import load_file
    inp = tmp_path / "input"
    inp.mkdir()
    monkeypatch.setattr(folder_paths, "get_input_directory", lambda *a, **k: str(inp))
    mp = make_model("sd15")
    s = new_session(pack, dirs["output"], "data")
    with pytest.raises(pack.host.NothingToExport):
        pack.host.export_noise(s)
    b = gen(pack, mp, "sd15", s, workflow={"prompt": "a red apple"})
    mark_and_train(pack, mp, s, b)  # good 0, 2; bad 1, 3; best 0
    pr = pack.host.export_preferences(s)
    rows = [json.loads(x) for x in Path(pr["path"]).read_text().splitlines()]
    assert pr["pairs"] == 4 and {(r["chosen_index"], r["rejected_index"]) for r in rows} == {
        (0, 1), (0, 3), (2, 1), (2, 3)}
    assert all(r["prompt"] == "a red apple" for r in rows)
    assert pr["filename"] == "data/exports/preferences_r0001.jsonl"  # under output/
    assert all((Path(pr["path"]).parent / r["chosen"]).is_file() for r in rows)

    res = pack.host.export_noise(s, 8)
    assert res["filename"] == "hero_data_r0001.latent" and res["noises"] == 2  # best + other good
    assert res["filename"] in comfy_nodes.LoadLatent.INPUT_TYPES()["required"]["latent"][0]
    lat = comfy_nodes.LoadLatent().load(res["filename"])[0]["samples"]
    # what ComfyUI's sampler starts from: process_latent_in, then (add_noise disable) the latent
    # itself at sigma_max; in VP space that is x / sqrt(1 + sigma_max^2) = HERO's x_T
    ms = mp.get_model_object("model_sampling")
    x_k = mp.model.process_latent_in(lat)
    x_t = x_k / math.sqrt(1 + float(ms.sigma_max) ** 2)
    noises = torch.load(s.round_dir(0) / "generated.pt", weights_only=False)["noises"]
    assert torch.allclose(x_t[0], noises[0].float(), atol=1e-4)  # the best first
    assert torch.allclose(x_t[1], noises[2].float(), atol=1e-4)
    # KSamplerAdvanced without added noise starts from it: the UNet's first input is HERO's x_T
    pos, neg = __import__("tiny_models").make_conds("sd15")
    seen = []

    def spy(apply_model, args):
        seen.append((args["input"].detach().clone(), args["timestep"].detach().clone()))
        return apply_model(args["input"], args["timestep"], **args["c"])

    m2 = mp.clone()
    m2.set_model_unet_function_wrapper(spy)
    with torch.inference_mode():
        out = comfy_nodes.KSamplerAdvanced().sample(m2, "disable", 0, 2, 5.0, "euler", "normal",
                                                    pos, neg, {"samples": lat}, 0, 2, "disable")
    assert out[0]["samples"].shape == lat.shape and torch.isfinite(out[0]["samples"]).all()
    x_first, sigma_first = seen[0]
    assert abs(float(sigma_first.flatten()[0]) - float(ms.sigma_max)) < 1e-3
    vp = x_first / math.sqrt(1 + float(ms.sigma_max) ** 2)
    n = lat.shape[0]
    assert torch.allclose(vp[:n][0], noises[0].float(), atol=1e-4)  # the best image's x_T
    assert torch.allclose(vp[:n][1], noises[2].float(), atol=1e-4)
    t = load_file(str(inp / res["filename"]))
    assert "latent_format_version_0" in t  # LoadLatent must not rescale it


# ---- a real server: the natural wiring in round 0 ---------------------------------------------

SID = "order_session"


def order_graph(ckpt: str) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red apple, studio", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "HERO_Session", "inputs": {
            "session_id": SID, "method": "hero", "batch_size": 4, "steps": 2, "cfg": 5.0,
            "lora_rank": 4, "lora_alpha": 4.0, "learning_rate": 0.01, "timesteps_per_sample": 1,
            "beta": 0.5, "epsilon": 0.1, "budget": 64, "encoder_epochs": 5, "seed": 1}},
        "5": {"class_type": "HERO_Generate", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "vae": ["1", 2],
            "session": ["4", 0], "batch_size": 0, "steps": 0, "cfg": 0.0, "width": 64, "height": 64,
            "seed": 0}},
        "6": {"class_type": "HERO_Feedback", "inputs": {"batch": ["5", 2], "images": ["5", 0],
                                                         "marks": "good: 1 2; best: 1", "timeout": 600}},
        "7": {"class_type": "HERO_Train", "inputs": {"model": ["1", 0], "session": ["4", 0],
                                                      "feedback": ["6", 0]}},
        # the old wiring: session straight from HERO Session, 'after' not connected
        "8": {"class_type": "HERO_ExportLoRA", "inputs": {"session": ["4", 0],
                                                           "filename_prefix": "early"}},
        # the natural wiring: HERO Train's session output
        "9": {"class_type": "HERO_ExportLoRA", "inputs": {"session": ["7", 2],
                                                           "filename_prefix": "after"}},
        "10": {"class_type": "HERO_ExportPreferences", "inputs": {"session": ["7", 2]}},
        "11": {"class_type": "HERO_ExportNoise", "inputs": {"session": ["7", 2], "max_noises": 4}},
    }


def latent_graph(ckpt: str, latent: str) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red apple", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "LoadLatent", "inputs": {"latent": latent}},
        "5": {"class_type": "KSamplerAdvanced", "inputs": {
            "model": ["1", 0], "add_noise": "disable", "noise_seed": 0, "steps": 2, "cfg": 5.0,
            "sampler_name": "euler", "scheduler": "normal", "positive": ["2", 0],
            "negative": ["3", 0], "latent_image": ["4", 0], "start_at_step": 0, "end_at_step": 2,
            "return_with_leftover_noise": "disable"}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    }


def _texts(hist_outputs: dict, node: str) -> str:
    return json.dumps(hist_outputs.get(node, {}))


def test_round0_export_wiring_on_a_server(tmp_path):
    reason = cs.host_missing_reason()
    if reason:
        pytest.skip(reason)
    ckpt = cs.cached_checkpoint()
    srv = cs.ComfyServer(tmp_path / "base", checkpoint=ckpt)
    srv.start()
    try:
        h = srv.wait_history(srv.queue(order_graph(ckpt.name)), 600)
        st = h.get("status", {})
        assert st.get("status_str") == "success", json.dumps(st)[-3000:] + srv.log_tail(80)
        outs = h["outputs"]
        assert "nothing exported" in _texts(outs, "8") and "no trained LoRA yet" in _texts(outs, "8")
        loras = srv.base / "models" / "loras" / "hero"
        f = loras / "after_r0001.safetensors"
        assert f.is_file() and not list(loras.glob("early_*")), sorted(loras.glob("*"))
        assert (loras / "after_r0001.json").is_file()
        md, model_hash, legacy = _hashes(f)
        assert md["sshs_model_hash"] == model_hash and md["sshs_legacy_hash"] == legacy
        assert md["ss_sd_model_name"] == ckpt.name  # read from the queued graph
        assert json.loads(md["ss_tag_frequency"])[f"hero_{SID}"] == {"a red apple": 4, "studio": 4}
        assert "pairs" in _texts(outs, "10") and "noises" in _texts(outs, "11")
        ds = srv.base / "output" / "hero" / SID / "exports" / "preferences_r0001.jsonl"
        assert len(ds.read_text().splitlines()) == 4  # 2 good x 2 bad
        lat = srv.base / "input" / f"hero_{SID}_r0001.latent"
        assert lat.is_file()
        # round 1, same graph: now the old wiring exports too, with a note on the order
        h = srv.wait_history(srv.queue(order_graph(ckpt.name)), 600)
        assert h["status"]["status_str"] == "success", srv.log_tail(80)
        assert "HERO Train had not run yet" in _texts(h["outputs"], "8")
        assert (loras / "after_r0002.safetensors").is_file()
        assert (loras / "early_r0001.safetensors").is_file()
        # the noises start a plain workflow: LoadLatent -> KSamplerAdvanced (no added noise)
        status, li = srv.get("/object_info/LoadLatent")
        assert lat.name in li["LoadLatent"]["input"]["required"]["latent"][0]
        h = srv.wait_history(srv.queue(latent_graph(ckpt.name, lat.name)), 300)
        assert h["status"]["status_str"] == "success", srv.log_tail(80)
        # the panel's route for the two data exports
        st_, body = srv.post("/hero/export", {"session": SID, "kind": "preferences"})
        assert st_ == 200 and body["pairs"] == 8, body
        st_, body = srv.post("/hero/export", {"session": SID, "kind": "noise", "max_noises": 3})
        assert st_ == 200 and body["noises"] == 3, body
        st_, body = srv.post("/hero/export", {"session": SID, "kind": "bogus"})
        assert st_ == 400 and "unknown export kind" in body["error"]
    finally:
        srv.stop()
