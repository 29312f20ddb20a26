"""A LoRA exported from a ComfyUI model (nodes.host.export_lora, what HERO_ExportLoRA and the
session panel's export write) loads in diffusers with every key, on an SD1.5-architecture UNet
built from the same weights, and reproduces the ComfyUI model's output with the LoRA.

The diffusers UNet2DConditionModel is the tiny SD1.5-shaped comfy UNet (tests/host/tiny_models.py)
in diffusers' layout; its weights are the comfy model's, renamed with ComfyUI's own
``comfy.utils.unet_to_diffusers`` map (strict load: every tensor has a home). The file is loaded
through diffusers' kohya path (``StableDiffusionLoraLoaderMixin.lora_state_dict`` +
``load_lora_into_unet``), which is what ``StableDiffusionPipeline.load_lora_weights`` runs.

Also re-run on HERO_COMFYUI_OLD_PATH by tests/host/test_adapter.py::test_inprocess_old_host."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from tiny_models import TinyVAE, make_conds, make_model

pytest.importorskip("peft")
pytest.importorskip("diffusers")


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.msgs = []

    def emit(self, record):
        self.msgs.append(record.getMessage())


def diffusers_unet_like(mp):
    """The diffusers twin of the tiny comfy SD1.5 UNet, with the comfy weights."""
    import comfy.utils
    from diffusers import UNet2DConditionModel
    uc = mp.model.model_config.unet_config
    mult = list(uc["channel_mult"])
    depth = list(uc["transformer_depth"])
    assert len(set(uc["num_res_blocks"])) == 1 and all(d in (0, 1) for d in depth)
    chans = tuple(uc["model_channels"] * m for m in mult)
    down = tuple("CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depth)
    up = tuple("CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(depth))
    unet = UNet2DConditionModel(
        sample_size=uc.get("image_size", 32), in_channels=uc["in_channels"],
        out_channels=uc["out_channels"], layers_per_block=uc["num_res_blocks"][0],
        block_out_channels=chans, down_block_types=down, up_block_types=up,
        cross_attention_dim=uc["context_dim"],
        attention_head_dim=uc["num_heads"],  # SD1.5 configs: this field is the number of heads
        use_linear_projection=bool(uc.get("use_linear_in_transformer", False)),
        norm_num_groups=32).eval()
    ldm = {k: v for k, v in mp.model.diffusion_model.state_dict().items()}
    mapping = comfy.utils.unet_to_diffusers(uc)  # diffusers key -> LDM key
    sd = {}
    for dk, lk in mapping.items():
        if lk in ldm:
            sd[dk] = ldm[lk].detach().clone().float()
    missing, unexpected = unet.load_state_dict(sd, strict=False)
    assert not missing and not unexpected, (missing[:5], unexpected[:5])
    assert len(sd) == len(ldm), "every comfy UNet tensor must map to a diffusers tensor"
    unet.requires_grad_(False)
    return unet


def comfy_forward(mp, x, t, c):
    """The ModelPatcher's UNet (its patches, e.g. a LoRA, applied) on raw UNet inputs."""
    import comfy.model_management as mm
    mm.load_models_gpu([mp])
    with torch.inference_mode():
        return mp.model.diffusion_model(x.clone(), timesteps=t.clone(), context=c.clone()).float().clone()


def test_exported_lora_loads_in_diffusers_sd15(pack, dirs, comfy):
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as Mixin
    from safetensors import safe_open

    mp = make_model("sd15")
    S = pack.engine_session
    P = __import__("support.pack_import", fromlist=["x"]).import_pack_module("hero_engine.policy")
    R = __import__("support.pack_import", fromlist=["x"]).import_pack_module("hero_engine.representation")
    # a high learning rate so the trained LoRA visibly changes the output
    config = S.HeroConfig(batch_size=4, steps=2, seed=5, lora_rank=4, lora_alpha=2.0,
                          policy=P.PolicyConfig(timesteps_per_sample=2, lr=5e-2),
                          representation=R.RepresentationConfig(epochs=2))
    s = S.Session.create(dirs["output"] / "dx", config)
    pos, neg = make_conds("sd15")
    with torch.inference_mode():
        b = pack.host.generate(mp, pos, neg, TinyVAE(), s, width=64, height=64)
    s.record_marks(0, pack.feedback.Marks([0, 2], [1, 3], 0))
    fb = SimpleNamespace(session=s, round=0, marks=s.marks_for(0), batch=b)
    with torch.inference_mode():
        r = pack.host.train(mp, s, fb)
    assert r.trained
    res = pack.host.export_lora(s, "hero_dx")
    path = res["path"]
    with safe_open(path, "pt") as f:
        keys = list(f.keys())
    n_modules = len(pack.host_models.lora_targets(mp))
    assert res["modules"] == n_modules and len(keys) == 3 * n_modules

    unet = diffusers_unet_like(mp)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10.0, 600.0])
    c = pos[0][0].expand(2, -1, -1).contiguous()
    with torch.no_grad():
        base_d = unet(x, t, c).sample
    base_c = comfy_forward(mp, x, t, c)
    # the twin is the same network (fp32, different op order)
    torch.testing.assert_close(base_d, base_c, atol=1e-4, rtol=1e-4)

    h = _Collect()
    for name in ("diffusers", "peft"):
        logging.getLogger(name).addHandler(h)
    try:
        state, alphas = Mixin.lora_state_dict(path)
        Mixin.load_lora_into_unet(state, alphas, unet, adapter_name="hero")
    finally:
        for name in ("diffusers", "peft"):
            logging.getLogger(name).removeHandler(h)
    bad = [m for m in h.msgs if "unexpected keys" in m or "missing keys" in m or "not loaded" in m]
    assert not bad, bad
    from peft.tuners.lora import LoraLayer
    layers = {n: m for n, m in unet.named_modules() if isinstance(m, LoraLayer) and "hero" in m.lora_A}
    assert len(layers) == n_modules, (len(layers), n_modules)
    for n, m in layers.items():
        assert m.scaling["hero"] == pytest.approx(2.0 / 4)
        assert float(m.lora_B["hero"].weight.detach().abs().max()) > 0, n  # trained, non-zero up weights

    with torch.no_grad():
        out_d = unet(x, t, c).sample
    out_c = comfy_forward(r.model, x, t, c)  # HERO_Train's model (the LoRA as patches)
    assert (out_c - base_c).abs().max() > 5e-4, "the LoRA must change the output for this to mean anything"
    # fp16 file vs the fp32 session LoRA
    torch.testing.assert_close(out_d, out_c, atol=1e-4, rtol=1e-4)
    # the diffusers side moved with the LoRA as the comfy side did
    delta_d, delta_c = out_d - base_d, out_c - base_c
    rel = (delta_d - delta_c).norm() / delta_c.norm()
    assert rel < 2e-2, float(rel)
