"""Tiny in-process ComfyUI models (SD1.5- and SDXL-shaped) for the host tests (guide 6.3)."""
from __future__ import annotations

import torch


def _unet_config(sdxl: bool) -> dict:
    unet_config = dict(use_checkpoint=False, image_size=32, in_channels=4, out_channels=4, model_channels=32,
                       num_res_blocks=[1, 1], channel_mult=[1, 2], transformer_depth=[1, 1],
                       transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1, context_dim=64,
                       num_heads=2, num_head_channels=-1, use_linear_in_transformer=sdxl,
                       use_spatial_transformer=True, legacy=False, adm_in_channels=2816 if sdxl else None,
                       use_temporal_attention=False, use_temporal_resblock=False, dtype=torch.float32)
    if sdxl:
        # BASE.unet_extra_config forces num_head_channels=64 for SDXL: 64 channels -> 1-2 heads
        unet_config.update(num_classes="sequential", model_channels=64)
    return unet_config


def make_model(kind: str = "sd15", seed: int = 0, model_type=None):
    """A ModelPatcher around a ~1 M parameter UNet. ``kind``: sd15 | sdxl; ``model_type``: a
    comfy.model_base.ModelType to force (e.g. V_PREDICTION)."""
    import comfy.model_base
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    cfg_cls = comfy.supported_models.SDXL if kind == "sdxl" else comfy.supported_models.SD15
    mc = cfg_cls(_unet_config(kind == "sdxl"))
    base_cls = comfy.model_base.SDXL if kind == "sdxl" else comfy.model_base.BaseModel
    mt = model_type if model_type is not None else comfy.model_base.ModelType.EPS
    with torch.inference_mode():  # as a loader node would build it
        model = base_cls(mc, model_type=mt, device=torch.device("cpu"))
        g = torch.Generator().manual_seed(seed)
        for p in model.diffusion_model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def make_conds(kind: str = "sd15", seed: int = 0):
    """(positive, negative) CONDITIONING lists shaped like CLIPTextEncode's output."""
    g = torch.Generator().manual_seed(seed + 1000)
    out = []
    for _ in range(2):
        c = torch.randn(1, 7, 64, generator=g)
        extra = {}
        if kind == "sdxl":
            extra = {"pooled_output": torch.randn(1, 1280, generator=g), "width": 64, "height": 64}
        out.append([[c, extra]])
    return out[0], out[1]


class TinyVAE:
    """Stands in for comfy.sd.VAE: decode(latent [B,4,h,w]) -> image [B,8h,8w,3] in [0,1]."""

    def decode(self, samples):
        x = samples[:, :3].float()
        x = torch.nn.functional.interpolate(x, scale_factor=8, mode="nearest")
        return (x.tanh() * 0.5 + 0.5).permute(0, 2, 3, 1).contiguous()

    def spacial_compression_decode(self):
        return 8
