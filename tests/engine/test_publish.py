"""hero_engine.publish and the export side of lora/fileio: the hashes kohya and A1111 read, the
card metadata, the A1111 sidecar, file permissions, the preference dataset and the noise latent."""
import base64
import hashlib
import io
import json
import math
import os
import struct

import pytest
import torch
from PIL import Image

from hero_engine import fileio, loop, publish
from hero_engine import lora as L
from hero_engine.session import Session
from tiny import evaluator, query_fn, tiny_backend, tiny_config


def big_state(rank=160):
    """A LoRA state larger than 1.06 MB in fp16, so the legacy hash reads real bytes."""
    g = torch.Generator().manual_seed(1)
    st = L.LoraState(family="sd15", rank=rank)
    for p in ("to_q", "to_k"):
        st.add(f"down_blocks.0.attentions.0.transformer_blocks.0.attn1.{p}",
               L.LoraModule(torch.randn(rank, 1024, generator=g) * 0.01,
                            torch.randn(1024, rank, generator=g) * 0.01, 8.0))
    return st


def _independent_hashes(path):
    """Written from the algorithm's description, not from hero_engine: parse the safetensors
    header by hand; model hash = sha256 of everything after it; legacy hash = sha256 of the
    64 KiB at 1 MiB of the same file re-serialised with only the ss_* metadata."""
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    model = hashlib.sha256(raw[8 + n:]).hexdigest()
    from safetensors.torch import load_file, save
    tensors = load_file(str(path))
    ss = {k: v for k, v in header["__metadata__"].items() if k.startswith("ss_")}
    b = io.BytesIO(save(tensors, ss))
    b.seek(0x100000)
    legacy = hashlib.sha256(b.read(0x10000)).hexdigest()[0:8]
    return header["__metadata__"], model, legacy


def test_kohya_hashes_match_an_independent_computation(tmp_path):
    p = tmp_path / "big.safetensors"
    md = L.export_kohya(big_state(), p, {"ss_tag_frequency": json.dumps({"d": {"a cat": 3}}),
                                         "sshs_model_hash": "stale"})
    assert p.stat().st_size > 0x110000
    meta, model, legacy = _independent_hashes(p)
    assert meta["sshs_model_hash"] == model == md["sshs_model_hash"]
    assert meta["sshs_legacy_hash"] == legacy and len(legacy) == 8
    assert legacy != hashlib.sha256(b"").hexdigest()[:8]  # it read real bytes
    assert meta["modelspec.hash_sha256"] == "0x" + model
    # editing non-ss metadata leaves both hashes as they are (what kohya's design intends)
    from safetensors.torch import load_file, save_file
    t = load_file(str(p))
    p2 = tmp_path / "edited.safetensors"
    save_file(t, str(p2), {**meta, "modelspec.description": "edited by hand " * 20})
    _, model2, legacy2 = _independent_hashes(p2)
    assert (model2, legacy2) == (model, legacy)
    # a small file: the legacy hash is that of empty bytes, as kohya's
    small = tmp_path / "small.safetensors"
    L.export_kohya(big_state(rank=2), small)
    meta_s, model_s, legacy_s = _independent_hashes(small)
    assert meta_s["sshs_legacy_hash"] == legacy_s == hashlib.sha256(b"").hexdigest()[:8]
    assert meta_s["sshs_model_hash"] == model_s


def test_exports_get_normal_permissions_session_files_stay_private(tmp_path):
    old = os.umask(0o022)
    try:
        p = tmp_path / "x.safetensors"
        L.export_kohya(big_state(rank=2), p)
        assert (p.stat().st_mode & 0o777) == 0o644
        q = tmp_path / "state.bin"
        fileio.atomic_write_bytes(q, b"abc")
        assert (q.stat().st_mode & 0o777) == 0o600
        os.umask(0o077)
        r = tmp_path / "y.json"
        fileio.atomic_write_json(r, {"a": 1}, mode=fileio.PUBLIC_MODE)
        assert (r.stat().st_mode & 0o777) == 0o600  # the umask is honoured
        assert fileio.current_umask() == 0o077
    finally:
        os.umask(old)


def test_thumbnail_tags_sidecar(tmp_path):
    im = tmp_path / "best.png"
    Image.new("RGB", (640, 320), (200, 30, 40)).save(im)
    url = publish.thumbnail_data_url(im)
    assert url.startswith("data:image/jpeg;base64,")
    t = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert t.format == "JPEG" and max(t.size) == 256 and t.size == (256, 128)
    tf = publish.tag_frequency([("a cat, watercolor", 8), ("a cat,  sunset ,", 4)], "d")
    assert tf == {"d": {"a cat": 12, "watercolor": 8, "sunset": 4}}
    sc = publish.a1111_user_metadata("desc", "sdxl", "n", 0.8)
    assert sc["sd version"] == "SDXL" and sc["preferred weight"] == 0.8
    assert set(sc) >= {"description", "sd version", "activation text", "preferred weight",
                       "negative text", "notes"}
    assert publish.a1111_user_metadata("d", "sd15")["sd version"] == "SD1"


@pytest.fixture(scope="module")
def trained_session(tmp_path_factory):
    root = tmp_path_factory.mktemp("pub")
    s = Session.create(root / "pub1", tiny_config(budget=12))
    be, ev = tiny_backend(), evaluator()
    for _ in range(2):
        loop.run_round(s, be, query_fn(be, ev, s))
    return s


def test_session_card(trained_session):
    s = trained_session
    md, sidecar = publish.session_card(s, "sd15", base_model="v1-5-pruned-emaonly.safetensors",
                                       author="me")
    assert md["ss_sd_model_name"] == "v1-5-pruned-emaonly.safetensors"
    assert md["modelspec.author"] == "me" and "hero" in md["modelspec.tags"]
    assert md["ss_num_train_images"] == str(s.marks_used) == "12"
    assert md["ss_seed"] == "0" and md["ss_num_epochs"] == "2"
    tf = json.loads(md["ss_tag_frequency"])
    assert tf == {"hero_pub1": {"a red thing": 12}}
    started, finished = float(md["ss_training_started_at"]), float(md["ss_training_finished_at"])
    assert started <= finished
    assert md["modelspec.thumbnail"].startswith("data:image/jpeg;base64,")
    assert "12 human marks over 2 rounds" in md["modelspec.description"]
    assert sidecar["sd version"] == "SD1" and sidecar["activation text"] == "a red thing"


def test_preference_pairs_and_jsonl(trained_session, tmp_path):
    s = trained_session
    out = tmp_path / "ds" / "prefs.jsonl"
    old = os.umask(0o022)
    try:
        res = publish.export_preferences(s, out)
    finally:
        os.umask(old)
    assert (out.stat().st_mode & 0o777) == 0o644
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    want = sum(len(s.marks_for(k).good) * len(s.marks_for(k).bad) for k in range(2))
    assert res["pairs"] == len(rows) == want > 0 and res["rounds"] == 2
    for r in rows:
        m = s.marks_for(r["round"])
        assert r["chosen_index"] in m.good and r["rejected_index"] in m.bad
        assert (out.parent / r["chosen"]).resolve() == s.image_path(r["round"], r["chosen_index"]).resolve()
        assert (out.parent / r["image_1"]).is_file()
        assert r["label_0"] == 1.0 and r["label_1"] == 0.0 and r["prompt"] == "a red thing"
        assert r["chosen_is_best"] == (m.best == r["chosen_index"])
    assert {(r["round"], r["chosen_index"], r["rejected_index"]) for r in rows} == {
        (k, g, b) for k in range(2) for g in s.marks_for(k).good for b in s.marks_for(k).bad}


def test_noise_latent_file(trained_session, tmp_path):
    from safetensors.torch import load_file
    from hero_engine.session import torch_load
    s = trained_session
    p = tmp_path / "n.latent"
    res = publish.export_noise_latent(s, p, "sd15")
    t = load_file(str(p))
    assert set(t) == {"latent_tensor", "latent_format_version_0"}
    lat = t["latent_tensor"]
    b = s.best
    n_good = len({(k, i) for k in range(2) for i in s.marks_for(k).good} | {(b.round, b.index)})
    assert res["noises"] == lat.shape[0] == n_good and res["best"]
    # row 0 is the best image's initial noise, scaled to ComfyUI's first step at sigma_max
    x_t = torch_load(s.round_dir(b.round) / "generated.pt")["noises"][b.index]
    back = lat[0] * publish.LATENT_SCALE["sd15"] / math.sqrt(1 + publish.NOISE_SIGMA_MAX ** 2)
    assert torch.allclose(back, x_t.float(), atol=1e-5)
    assert abs(publish.NOISE_SIGMA_MAX - 14.6146) < 1e-3
    with pytest.raises(ValueError, match="family"):
        publish.export_noise_latent(s, p, "toy")
    empty = Session.create(tmp_path / "empty", tiny_config())
    with pytest.raises(ValueError, match="no good or best image"):
        publish.export_noise_latent(empty, tmp_path / "e.latent", "sd15")
