"""The ComfyUI adapter's model checks: which MODEL HERO can train (SD1.5 / SDXL, epsilon
prediction, discrete DDPM schedule), the layers its LoRA goes on, and their family-native kohya
names (DESIGN.md decision 5)."""
from __future__ import annotations

from typing import Optional

from ..hero_engine.lora import invert_unet_to_diffusers, names_from_map
from ..hero_engine.session import LORA_TARGETS, HeroConfig, Session

TARGET_SUFFIXES = tuple("." + s for s in LORA_TARGETS[HeroConfig().lora_targets])
DM = "diffusion_model."


class HeroHostError(ValueError):
    """A model, input or session that HERO cannot use here; the message says what and the fix."""



def _prediction_name(ms) -> str:
    import comfy.model_sampling as cms
    for name in ("EDM", "V_PREDICTION", "IMG_TO_IMG", "X0", "CONST", "EPS"):
        cls = getattr(cms, name, None)
        if cls is not None and isinstance(ms, cls):
            return name
    return type(ms).__name__


def model_family(model) -> str:
    """'sd15' or 'sdxl' for a supported ComfyUI MODEL, else HeroHostError naming the type."""
    import comfy.model_sampling as cms
    import comfy.supported_models as sm
    if model is None or not hasattr(model, "model") or not hasattr(model, "get_model_object"):
        raise HeroHostError(f"expected a ComfyUI MODEL (from Load Checkpoint), got "
                            f"{type(model).__name__}")
    base = model.model
    mc = getattr(base, "model_config", None)
    ms = model.get_model_object("model_sampling")
    pred = _prediction_name(ms)
    fam = None
    in_ch = (getattr(mc, "unet_config", {}) or {}).get("in_channels", 4)
    if mc is not None and in_ch == 4:
        if isinstance(mc, sm.SDXL):
            fam = "sdxl"
        elif type(mc) is sm.SD15:
            fam = "sd15"
    what = f"{type(mc).__name__ if mc is not None else type(base).__name__} with {pred} prediction"
    if fam is None:
        raise HeroHostError(f"HERO supports SD1.5 and SDXL epsilon-prediction models; this MODEL is "
                            f"{what} ({in_ch} input channels). Load an SD1.5 or SDXL checkpoint.")
    if pred != "EPS" or not isinstance(ms, cms.ModelSamplingDiscrete):
        raise HeroHostError(f"HERO supports SD1.5 and SDXL epsilon-prediction models with the "
                            f"discrete DDPM schedule; this MODEL is {what} "
                            f"({type(ms).__mro__[1].__name__} sampling). v-prediction, EDM, flow and "
                            f"x0 models are not supported (remove ModelSampling* patches, or use an "
                            f"eps checkpoint).")
    return fam


def lora_targets(model, session: Optional[Session] = None) -> list[str]:
    """LDM module names (without ``diffusion_model.``) of the linear layers HERO trains: the
    session's ``lora_targets`` set (hero_engine.session.LORA_TARGETS; default the config's)."""
    key = (session.config if session is not None else HeroConfig()).lora_targets
    suffixes = tuple("." + s for s in LORA_TARGETS[key])
    out = []
    for name, m in model.model.diffusion_model.named_modules():
        w = getattr(m, "weight", None)
        if (name.endswith(suffixes) and hasattr(m, "weight_function") and w is not None
                and w.dim() == 2):
            out.append(name)
    if not out:
        raise HeroHostError(f"this MODEL has no layers named {'/'.join(LORA_TARGETS[key])} to "
                            f"put a LoRA on")
    return out


def kohya_names(model, family: str, names: list[str]) -> dict:
    """LDM name -> family-native kohya prefix (SD1.5: diffusers name, SDXL: LDM name)."""
    import comfy.utils
    m = None
    if family != "sdxl":
        m = invert_unet_to_diffusers(comfy.utils.unet_to_diffusers(model.model.model_config.unet_config))
    return dict(names_from_map(names, m, family))


def _module(model, name: str):
    m = model.model.diffusion_model
    for part in name.split("."):
        m = getattr(m, part)
    return m


def check_vae(vae) -> None:
    if vae is None or not hasattr(vae, "decode"):
        raise HeroHostError("HERO Generate needs a VAE to decode the batch: connect the VAE output "
                            "of Load Checkpoint (or a VAE Loader)")

