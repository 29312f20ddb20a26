"""In-process host tests: the ComfyUI adapter (nodes/host.py) on tiny SD1.5- and SDXL-shaped models.

Run: ``~/comfy/venv/bin/python -m pytest tests/host/test_adapter.py`` (COMFYUI_PATH selects the
host; ``test_inprocess_old_host`` repeats this file and test_export_diffusers.py, interrupt test
included, on HERO_COMFYUI_OLD_PATH in a child process)."""
from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from host_paths import COMFYUI_PATH, OLD_PATH, REPO
from tiny_models import TinyVAE, make_conds, make_model

KINDS = ["sd15", "sdxl"]


def new_session(pack, root: Path, name="s1", batch=4, steps=3):
    S = pack.engine_session
    P = __import__("support.pack_import", fromlist=["x"]).import_pack_module("hero_engine.policy")
    R = __import__("support.pack_import", fromlist=["x"]).import_pack_module("hero_engine.representation")
    config = S.HeroConfig(batch_size=batch, steps=steps, seed=3,
                          policy=P.PolicyConfig(timesteps_per_sample=2, lr=1e-2),
                          representation=R.RepresentationConfig(epochs=2))
    return S.Session.create(root / name, config)


def gen(pack, mp, kind, s, **kw):
    pos, neg = make_conds(kind)
    with torch.inference_mode():
        return pack.host.generate(mp, pos, neg, TinyVAE(), s, width=64, height=64, **kw)


def mark_and_train(pack, mp, s, batch, best=0):
    n = batch.size
    s.record_marks(batch.round, pack.feedback.Marks([i for i in range(n) if i % 2 == 0],
                                                    [i for i in range(n) if i % 2 == 1], best))
    fb = SimpleNamespace(session=s, round=batch.round, marks=s.marks_for(batch.round), batch=batch)
    with torch.inference_mode():
        return pack.host.train(mp, s, fb)


def weights_digest(mp) -> str:
    h = hashlib.sha256()
    for k, v in sorted(mp.model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def ksample(mp, kind, seed=7, steps=3):
    import nodes as comfy_nodes  # ComfyUI's nodes.py
    pos, neg = make_conds(kind)
    lat = {"samples": torch.zeros(2, 4, 8, 8)}
    with torch.inference_mode():
        return comfy_nodes.common_ksampler(mp, seed, steps, 5.0, "euler", "normal", pos, neg,
                                           lat)[0]["samples"].clone()


@pytest.mark.parametrize("kind", KINDS)
def test_round_generate_train_resume(pack, dirs, kind):
    mp = make_model(kind)
    s = new_session(pack, dirs["output"])
    b = gen(pack, mp, kind, s)
    assert b.images.shape == (4, 64, 64, 3) and b.latent.shape == (4, 4, 8, 8)
    assert 0 <= float(b.images.min()) and float(b.images.max()) <= 1
    assert s.pending() is not None and not b.reused
    # a restart before marking: the same batch comes back, not a new one
    b_again = gen(pack, mp, kind, pack.engine_session.Session.open(s.path))
    assert b_again.reused and torch.allclose(b_again.images, b.images, atol=1 / 255)
    assert torch.allclose(b_again.latent, b.latent, rtol=2e-3, atol=1e-3)  # stored as fp16
    r = mark_and_train(pack, mp, s, b)
    assert r.trained and s.round == 1
    st = s.load_state()
    ups = [v for k, v in st["lora"].items() if k.endswith(".up")]
    assert ups and max(float(u.abs().max()) for u in ups) > 0, "the PPO step changed the LoRA"
    assert r.metrics["policy_backward_passes"] > 0
    assert s.load_lora().family == kind  # the session's LoRA carries its family
    # the trained model is a plain-patch clone: differs from the base in a KSampler
    assert not torch.equal(ksample(r.model, kind), ksample(mp, kind))
    # round 1 is generated from the feedback-guided noise with the new LoRA
    b1 = gen(pack, mp, kind, s)
    assert b1.round == 1 and not b1.reused
    # training the same (already completed) feedback again is a no-op
    fb = SimpleNamespace(session=s, round=0, marks=s.marks_for(0), batch=b)
    with torch.inference_mode():
        assert not pack.host.train(mp, s, fb).trained


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_only_lora(pack, comfy, kind):
    import comfy.samplers
    mp = make_model(kind)
    names = pack.host_models.lora_targets(mp)
    assert len(names) > 0 and all(n.endswith(pack.host_models.TARGET_SUFFIXES) for n in names)
    tensors = pack.host_lora.initial_lora(mp, names, 4, 4.0, 0)
    for n in names:  # non-zero up so every LoRA tensor gets a gradient
        tensors[n].up = torch.randn_like(tensors[n].up) * 0.01
    pos, neg = make_conds(kind)
    with torch.inference_mode():  # as inside a node
        with torch.inference_mode(False), torch.enable_grad():
            tr, params = pack.host_lora.attach_lora(mp, tensors, trainable=True, copy_others=True)
            g = comfy.samplers.CFGGuider(tr)
            g.set_conds(pos, neg)
            g.set_cfg(4.0)
            sig = comfy.samplers.calculate_sigmas(tr.get_model_object("model_sampling"),
                                                  "ddim_uniform", 3)

            def run(model_wrap, extra_args, noise):
                model_wrap.conds = pack.host_sampler._clone_conds(model_wrap.conds)
                den = pack.host_sampler.make_denoiser(model_wrap, extra_args)
                x = torch.randn(2, 4, 8, 8)
                eps = den(x, torch.tensor([500, 200]), torch.tensor([0.3, 0.7]), torch.arange(2))
                eps.pow(2).mean().backward()
                return noise
            noise = torch.zeros(2, 4, 8, 8)
            g.sample(noise, noise.clone(), pack.host_sampler._sampler_base()(run), sig, seed=0)
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in params.values())
    base = list(mp.model.parameters())
    leaked = [n for n, p in mp.model.named_parameters() if p.grad is not None]
    assert base and not leaked, leaked[:5]


@pytest.mark.parametrize("kind", KINDS)
def test_cached_model_untouched(pack, dirs, kind):
    mp = make_model(kind)
    before_w = weights_digest(mp)
    before_k = ksample(mp, kind)
    s = new_session(pack, dirs["output"])
    r = mark_and_train(pack, mp, s, gen(pack, mp, kind, s))
    assert weights_digest(mp) == before_w, "HERO training changed the model's weights"
    ksample(r.model, kind)  # the LoRA model runs in between (ComfyUI patches lazily)
    assert torch.equal(ksample(mp, kind), before_k), "plain KSampler output changed after HERO"
    assert weights_digest(mp) == before_w


def random_kohya_lora(pack, mp, kind, scale=0.5):
    names = pack.host_models.lora_targets(mp)
    kohya = pack.host_models.kohya_names(mp, kind, names)
    g = torch.Generator().manual_seed(5)
    sd = {}
    for n in names[: len(names) // 2]:
        w = pack.host_models._module(mp, n).weight
        sd[f"{kohya[n]}.lora_down.weight"] = torch.randn(2, w.shape[1], generator=g) * scale
        sd[f"{kohya[n]}.lora_up.weight"] = torch.randn(w.shape[0], 2, generator=g) * scale
        sd[f"{kohya[n]}.alpha"] = torch.tensor(2.0)
    return sd


@pytest.mark.parametrize("kind", ["sd15"])
def test_lora_loaded_before_hero_still_applies(pack, dirs, kind):
    import comfy.sd
    mp = make_model(kind)
    with torch.inference_mode():
        mp2 = comfy.sd.load_lora_for_models(mp, None, random_kohya_lora(pack, mp, kind), 1.0, 0)[0]
    b1 = gen(pack, mp, kind, new_session(pack, dirs["output"], "plain"))
    b2 = gen(pack, mp2, kind, new_session(pack, dirs["output"], "lora"))
    assert (b1.latent - b2.latent).abs().max() > 1e-3, "the LoRA loaded before HERO was ignored"
    # and training on top of it works
    s = new_session(pack, dirs["output"], "lora2")
    assert mark_and_train(pack, mp2, s, gen(pack, mp2, kind, s)).trained


def test_names_from_map_comfy_style(pack):
    L = pack.lora
    M = __import__("support.pack_import", fromlist=["x"]).import_pack_module("nodes.host_models")
    # what comfy.utils.unet_to_diffusers returns: diffusers param key -> LDM param key
    d2l = {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight": "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight": "input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.bias": "input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.bias",
    }
    l2d = M.invert_unet_to_diffusers(d2l)
    assert l2d["input_blocks.1.1.transformer_blocks.0.attn1.to_out.0"] == "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
    ldm = ["diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q",
           "input_blocks.1.1.transformer_blocks.0.attn1.to_out.0"]
    assert list(M.names_from_map(ldm, l2d, "sd15").values()) == [
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"]
    # the raw .weight map works too; SDXL uses the LDM name and needs no map
    assert M.names_from_map(ldm[:1], {v: k for k, v in d2l.items()}, "sd15")[ldm[0]].endswith("attn1_to_q")
    assert M.names_from_map(ldm, None, "sdxl")[ldm[1]] == "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_out_0"
    with pytest.raises(KeyError, match="not in the LDM->diffusers map"):
        M.names_from_map(["output_blocks.3.1.proj_in"], l2d, "sd15")
    with pytest.raises(L.LoraFormatError):
        M.names_from_map(ldm, l2d, "flux")


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.msgs = []

    def emit(self, record):
        self.msgs.append(record.getMessage())


@pytest.mark.parametrize("kind", KINDS)
def test_export_round_trip(pack, dirs, kind):
    import comfy.sd
    import comfy.utils
    from safetensors import safe_open
    mp = make_model(kind)
    s = new_session(pack, dirs["output"])
    r = mark_and_train(pack, mp, s, gen(pack, mp, kind, s))
    res = pack.host.export_lora(s, "hero_test")
    p = Path(res["path"])
    assert p == dirs["loras"] / "hero" / "hero_test_r0001.safetensors" and p.is_file()
    import folder_paths
    assert "hero/hero_test_r0001.safetensors" in folder_paths.get_filename_list("loras")
    with safe_open(str(p), "pt") as f:
        md = f.metadata()
        keys = list(f.keys())
    assert md["ss_network_module"] == "networks.lora" and md["hero_session_id"] == "s1"
    assert md["ss_base_model_version"] == ("sdxl_base_v1-0" if kind == "sdxl" else "sd_v1")
    assert md["modelspec.architecture"] and md["hero_round"] == "1"
    prefix = "lora_unet_input_blocks_" if kind == "sdxl" else "lora_unet_down_blocks_"
    assert any(k.startswith(prefix) for k in keys)
    assert all(k.startswith("lora_unet_") for k in keys)
    names = pack.host_models.lora_targets(mp)
    h = _Collect()
    logging.getLogger().addHandler(h)
    try:
        with torch.inference_mode():
            lora = comfy.utils.load_torch_file(str(p), safe_load=True)
            loaded, _ = comfy.sd.load_lora_for_models(mp, None, lora, 1.0, 0)
    finally:
        logging.getLogger().removeHandler(h)
    assert not [m for m in h.msgs if "lora key not loaded" in m], h.msgs
    assert len([k for k in loaded.patches if k.startswith("diffusion_model.")]) == len(names)
    a, b, base = ksample(r.model, kind), ksample(loaded, kind), ksample(mp, kind)
    # The file stores the LoRA in fp16, so the reloaded model matches to fp16 precision of the
    # output's scale (the tiny random UNet samples values near 100), and far closer than the
    # trained LoRA moved the sample from the base model.
    err, effect = float((a - b).abs().max()), float((a - base).abs().max())
    print(f"export round trip: err {err:.3g}, LoRA effect {effect:.3g}, scale {float(a.abs().max()):.3g}")
    assert err <= 1e-3 * float(a.abs().max()), (err, effect)
    assert err <= 0.05 * effect, (err, effect)
    # ApplyLoRA gives the same model as HERO_Train
    with torch.inference_mode():
        m3, applied = pack.host.apply_lora(mp, s, 1.0)
    assert applied and torch.equal(ksample(m3, kind), a)


def test_bad_inputs(pack, dirs, comfy):
    import comfy.model_base
    host = pack.host
    vp = make_model("sd15", model_type=comfy.model_base.ModelType.V_PREDICTION)
    with pytest.raises(host.HeroHostError, match="V_PREDICTION.*not supported|v-prediction"):
        pack.host_models.model_family(vp)
    mp = make_model("sd15")
    s = new_session(pack, dirs["output"])
    pos, neg = make_conds("sd15")
    with pytest.raises(host.HeroHostError, match="VAE"):
        with torch.inference_mode():
            host.generate(mp, pos, neg, None, s, width=64, height=64)
    for bad in ("../evil", "a/b", "x y", "", "a" * 65, "..\\x"):
        with pytest.raises(ValueError, match="invalid session id"):
            pack.nodes.open_session(bad, pack.engine_session.HeroConfig())
    assert not (dirs["output"].parent / "evil").exists()
    with pytest.raises(host.HeroHostError, match="filename_prefix"):
        host.export_path("../x", 1)
    # a batch/feedback from another session
    b = gen(pack, mp, "sd15", s)
    s.record_marks(0, pack.feedback.Marks([0, 1], [2, 3], 0))
    other = new_session(pack, dirs["output"], "other")
    fb = SimpleNamespace(session=s, round=0, marks=s.marks_for(0), batch=b)
    with pytest.raises(host.HeroHostError, match="belongs to session 's1'.*'other'"):
        with torch.inference_mode():
            host.train(mp, other, fb)
    # export before any trained round
    with pytest.raises(host.HeroHostError, match="no trained LoRA"):
        host.export_lora(other, "x")
    # a session trained on another model refuses a different architecture
    with torch.inference_mode():
        assert host.train(mp, s, fb).trained
    with pytest.raises(host.HeroHostError, match="checkpoint the session was started with"):
        with torch.inference_mode():
            host.apply_lora(make_model("sdxl"), s, 1.0)


def test_node_schemas(pack):
    """Every node: category HERO, a description, a tooltip on every input."""
    nodes = pack.nodes.NODES
    ids = set()
    for cls in nodes:
        sch = cls.define_schema()
        if hasattr(sch, "validate"):
            sch.validate()  # 0.3.64: ids unique between inputs and outputs, etc.
        ids.add(sch.node_id)
        assert sch.category == "HERO" and sch.description
        for inp in sch.inputs:
            assert inp.tooltip, f"{sch.node_id}.{inp.id} has no tooltip"
    assert ids == {"HERO_Session", "HERO_Generate", "HERO_Train", "HERO_ApplyLoRA",
                   "HERO_ExportLoRA", "HERO_ExportPreferences", "HERO_ExportNoise"}


def test_metrics_plot(pack):
    img = pack.nodes.metrics_plot([{"round": 0, "labels_used": 4, "good_rate": 0.5,
                                    "triplet_loss_last": 0.4, "reward_std": 0.1},
                                   {"round": 1, "labels_used": 8, "good_rate": 0.75,
                                    "triplet_loss_last": 0.3, "reward_std": 0.2}])
    assert img.shape == (1, 512, 768, 3) and 0 <= float(img.min()) and float(img.max()) <= 1
    assert pack.nodes.metrics_plot([]).shape == (1, 512, 768, 3)


@pytest.mark.skipif(os.environ.get("HERO_INPROCESS_CHILD") == "1", reason="child run")
def test_inprocess_old_host():
    """The same in-process tests on the older supported ComfyUI (0.3.64)."""
    if not (OLD_PATH / "comfy" / "samplers.py").is_file():
        pytest.skip(f"HERO_COMFYUI_OLD_PATH={OLD_PATH} not found")
    if Path(os.path.realpath(OLD_PATH)) == Path(os.path.realpath(COMFYUI_PATH)):
        pytest.skip("COMFYUI_PATH is already the old host")
    env = dict(os.environ, COMFYUI_PATH=str(OLD_PATH), HERO_INPROCESS_CHILD="1")
    files = [Path(__file__), Path(__file__).parent / "test_export_diffusers.py",
             Path(__file__).parent / "test_store_host.py",
             Path(__file__).parent / "test_publish_host.py"]
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-rA", "-p", "no:cacheprovider",
                        *map(str, files)], cwd=str(REPO), env=env, capture_output=True,
                       text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    # these ran (not skipped) on the old host
    for t in ("test_adapter.py::test_interrupt_generate_and_train",
              "test_adapter.py::test_export_round_trip[sd15]",
              "test_export_diffusers.py::test_exported_lora_loads_in_diffusers_sd15",
              "test_store_host.py::test_fingerprint_inputs_as_comfyui_calls_it",
              "test_store_host.py::test_panel_exports_during_real_commits",
              "test_publish_host.py::test_preferences_and_noise_latent_through_loadlatent",
              "test_publish_host.py::test_round0_export_wiring_on_a_server"):
        assert f"PASSED tests/host/{t}" in r.stdout, r.stdout[-3000:]


def test_interrupt_generate_and_train(pack, dirs, comfy):
    """ComfyUI's interrupt stops sampling and training; nothing half-done is committed."""
    mm = comfy
    mp = make_model("sd15")
    s = new_session(pack, dirs["output"])
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            gen(pack, mp, "sd15", s)
    finally:
        mm.interrupt_current_processing(False)
    assert s.pending() is None, "an interrupted generation must not store a batch"
    b = gen(pack, mp, "sd15", s)
    s.record_marks(0, pack.feedback.Marks([0, 1], [2, 3], 0))
    fb = SimpleNamespace(session=s, round=0, marks=s.marks_for(0), batch=b)
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            with torch.inference_mode():
                pack.host.train(mp, s, fb)
    finally:
        mm.interrupt_current_processing(False)
    s2 = pack.engine_session.Session.open(s.path)
    assert s2.round == 0 and s2.marks_for(0) is not None and s2.load_state() == {}
    with torch.inference_mode():
        assert pack.host.train(mp, s2, SimpleNamespace(session=s2, round=0, marks=s2.marks_for(0),
                                                       batch=b)).trained
    assert s2.round == 1


def test_memory_settings_on_host(pack, dirs, comfy, monkeypatch):
    """The HERO Session memory widgets apply to an existing session (never listed as kept), and
    HERO Train uses them: ComfyUI's gradient checkpointing (the same LoRA, the modules unpatched
    afterwards), the other models unloaded during the update, a fixed micro-batch."""
    import dataclasses
    import torch.utils.checkpoint as tuc
    from support.pack_import import import_pack_module
    mm = comfy
    N = pack.nodes
    mem = import_pack_module("hero_engine.memory")
    out = N.HERO_Session.execute("mem", batch_size=4, steps=3, encoder_epochs=2)
    assert out.result[0].config.policy.release_models is True
    out = N.HERO_Session.execute("mem", batch_size=4, steps=3, encoder_epochs=2, lora_rank=8,
                                 micro_batch=1, gradient_checkpointing=True, chains_on="device",
                                 mixed_precision="no", release_models=False)
    s = out.result[0]
    p = s.config.policy
    assert (p.micro_batch, p.gradient_checkpointing, p.chains_on, p.mixed_precision,
            p.release_models) == (1, True, "device", "no", False)
    assert s.config.lora_rank == 4, "an existing session keeps its learned settings"
    _, _, kept = N.open_session("mem", s.config.__class__(lora_rank=8, policy=p))
    assert "lora_rank" in kept and not any(k.split(".")[-1] in mem.MEMORY_SETTINGS for k in kept)
    with pytest.raises(ValueError, match="chains_on must be 'cpu' or 'device'"):
        N.HERO_Session.execute("mem", chains_on="disk")

    mp = make_model("sd15")
    calls = []
    real = tuc.checkpoint
    monkeypatch.setattr(tuc, "checkpoint", lambda *a, **k: (calls.append(1), real(*a, **k))[1])

    def trained(name, **memory):
        S = pack.engine_session
        s = new_session(pack, dirs["output"], name=name)
        s.config = mem.with_memory_settings(
            dataclasses.replace(s.config, policy=dataclasses.replace(s.config.policy,
                                                                       denoise_steps=3)),
            **memory)
        other = make_model("sd15")   # stands for the VAE / text encoders ComfyUI holds
        mm.load_models_gpu([other])
        r = mark_and_train(pack, mp, s, gen(pack, mp, "sd15", s))
        loaded = [lm.model for lm in mm.current_loaded_models]
        return S.Session.open(s.path).load_state()["lora"], r.metrics, any(m is other
                                                                           for m in loaded)

    base, m0, kept_other = trained("plain", release_models=False)
    assert kept_other and m0["released_models"] == 0 and m0["checkpointed_modules"] == 0
    assert not calls
    ck, m1, kept_other = trained("ckpt", gradient_checkpointing=True, release_models=True)
    assert m1["checkpointed_modules"] > 0 and len(calls) > 0, "ComfyUI's checkpointing ran"
    assert not kept_other and m1["released_models"] >= 1, "the other models were unloaded"
    assert not [n for n, m in mp.model.diffusion_model.named_modules() if hasattr(m, "org_forward")]
    change = max(float(v.abs().max()) for k, v in base.items() if k.endswith(".up"))
    assert change > 0
    for k in base:
        assert torch.allclose(base[k], ck[k], atol=1e-6 * max(1.0, change)), k
    one, m2, _ = trained("mb1", micro_batch=1)
    assert m0["train_micro_batch"] == 2 and m2["train_micro_batch"] == 1
    assert m2["policy_backward_passes"] == 2 * m0["policy_backward_passes"]


def test_ppo_ratio_is_one_through_comfyui(pack, dirs):
    """Generate merges the LoRA as plain patches, training recomputes it through weight wrappers:
    on a trained LoRA (round 1) both give the same policy, so the stored log-probs are what the
    update recomputes (PPO ratio 1 before the first step)."""
    import comfy.samplers
    from support.pack_import import import_pack_module
    loop = import_pack_module("hero_engine.loop")
    sampling = import_pack_module("hero_engine.sampling")
    S = pack.engine_session
    P = import_pack_module("hero_engine.policy")
    mp = make_model("sd15")
    s = S.Session.create(dirs["output"] / "ratio", S.HeroConfig(
        method="ddpo-binary", batch_size=4, steps=3, seed=3,
        policy=P.PolicyConfig(timesteps_per_sample=2, lr=3e-2)))
    mark_and_train(pack, mp, s, gen(pack, mp, "sd15", s))
    lora = s.load_state()["lora"]
    assert max(float(v.abs().max()) for k, v in lora.items() if k.endswith(".up")) > 0
    b = gen(pack, mp, "sd15", s)      # round 1, with the trained LoRA merged
    s.record_marks(1, pack.feedback.Marks([0, 1], [2, 3], 0))
    names = pack.host_models.lora_targets(mp, s)
    with torch.inference_mode():
        with torch.inference_mode(False), torch.enable_grad():
            plan = loop.prepare_learning(s, device="cpu")
            traj = plan.trajectory
            n, T = traj.log_probs.shape
            tr, _ = pack.host_lora.attach_lora(mp, pack.host_lora.session_lora(s, mp, names), trainable=True,
                                     copy_others=True)
            g = comfy.samplers.CFGGuider(tr)
            g.set_conds(b.positive, b.negative)
            g.set_cfg(b.guidance_scale)
            sig = comfy.samplers.calculate_sigmas(tr.get_model_object("model_sampling"),
                                                  "ddim_uniform", T)
            worst = []

            def run(model_wrap, extra_args, noise):
                model_wrap.conds = pack.host_sampler._clone_conds(model_wrap.conds)
                den = pack.host_sampler.make_denoiser(model_wrap, dict(extra_args))
                with torch.no_grad():
                    for t in range(T):
                        lp = sampling.trajectory_log_prob(den, traj, torch.arange(n),
                                                          torch.full((n,), t), device="cpu")
                        worst.append(float((lp - traj.log_probs[:, t]).abs().max()))
                return noise
            noise = torch.zeros(n, 4, 8, 8)
            g.sample(noise, noise.clone(), pack.host_sampler._sampler_base()(run), sig, seed=0)
    assert len(worst) == T and max(worst) < 1e-5, worst
