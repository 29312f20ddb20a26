"""The ComfyUI adapter's model checks: which MODEL HERO can train (SD1.5 / SDXL, epsilon
prediction, discrete DDPM schedule), the layers its LoRA goes on, and their family-native kohya
names (DESIGN.md decision 5)."""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Mapping, Optional

from ..hero_engine.lora import kohya_prefix, ldm_naming
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


def _strip_param(name: str) -> str:
    for suf in (".weight", ".bias"):
        if name.endswith(suf):
            return name[: -len(suf)]
    return name


def _strip_dm(name: str) -> str:
    return name[len(DM):] if name.startswith(DM) else name


def invert_unet_to_diffusers(diffusers_to_ldm_keys: Mapping[str, str]) -> dict:
    """Turn the map ``comfy.utils.unet_to_diffusers(unet_config)`` returns (``diffusers.param`` ->
    ``ldm.param``) into a module-level ``ldm_name -> diffusers_name`` map for ``names_from_map``."""
    out = {}
    for d, l in diffusers_to_ldm_keys.items():
        out[_strip_dm(_strip_param(l))] = _strip_param(d)
    return out


def names_from_map(ldm_names: Iterable[str], ldm_to_diffusers_map: Optional[Mapping[str, str]],
                   family: str) -> "OrderedDict[str, str]":
    """``ldm_name -> kohya prefix`` for the ComfyUI side (module names as in the host's model, with or
    without ``diffusion_model.``). sd15: ``lora_unet_`` + diffusers name, looked up in
    ``ldm_to_diffusers_map`` (module names, or the ``.weight`` keys of ``invert_unet_to_diffusers``);
    sdxl: ``lora_unet_`` + the LDM name itself (the map is not needed)."""
    ldm_names_only = ldm_naming(family)  # LoraFormatError for an unknown family
    out = OrderedDict()
    lookup = None
    if not ldm_names_only:
        if ldm_to_diffusers_map is None:
            raise ValueError(f"family {family!r} names LoRA keys by diffusers name: pass ldm_to_diffusers_map")
        lookup = {_strip_dm(_strip_param(k)): _strip_param(v) for k, v in ldm_to_diffusers_map.items()}
    for name in ldm_names:
        ldm = _strip_dm(name)
        if ldm_names_only:
            out[name] = kohya_prefix(ldm)
            continue
        if ldm not in lookup:
            raise KeyError(f"LDM module {ldm!r} is not in the LDM->diffusers map "
                           f"({len(lookup)} entries); cannot name it for family {family!r}")
        out[name] = kohya_prefix(lookup[ldm])
    return out


def base_model_name(model) -> str:
    """What the exported file records as ``hero_base_model``: the model config's class."""
    return type(model.model.model_config).__name__


def _module(model, name: str):
    m = model.model.diffusion_model
    for part in name.split("."):
        m = getattr(m, part)
    return m


def check_vae(vae) -> None:
    if vae is None or not hasattr(vae, "decode"):
        raise HeroHostError("HERO Generate needs a VAE to decode the batch: connect the VAE output "
                            "of Load Checkpoint (or a VAE Loader)")

