"""The ComfyUI adapter: ComfyUI MODEL / CONDITIONING / VAE -> the engine's denoiser protocol.

Everything that touches ComfyUI's sampling and training machinery lives here; the nodes in
``nodes.py`` stay thin. Design (DESIGN.md decisions 3-5, comfyui_guide 2.3-2.7):

* Sampling and the PPO update both run *inside* ComfyUI's own ``CFGGuider`` with a custom
  ``comfy.samplers.Sampler`` (``_CallbackSampler``), so conds, CFG, ControlNets, hooks and model
  patches are processed exactly as in a KSampler. The sampler hands ``model_wrap`` to the engine as
  a :class:`hero_engine.sampling.Denoiser` (``make_denoiser``): VP latent x and abar ->
  sigma = sqrt((1 - abar) / abar), x_k = x sqrt(1 + sigma^2), x0 = model_wrap(x_k, sigma),
  eps = (x_k - x0) / sigma.
* For training, the LoRA lives on a ``model.clone()`` as ComfyUI weight wrappers
  (``add_weight_wrapper``): trainable ``LoraWeightWrapper`` modules on the attention and
  feed-forward layers and identity copy wrappers on every other weight and bias (guide 2.3
  "variant B": model weights are inference tensors). For generation it is merged as plain
  patches, as a KSampler with LoraLoader would run it. The cached checkpoint model is never
  mutated.
* The session keeps the LoRA as ``{"<ldm module>.down|up|alpha": tensor}`` (fp32, LDM module names
  without ``diffusion_model.``); the kohya names (family-native) are computed from the model.
* The MODEL that leaves HERO_Train / HERO_ApplyLoRA carries the LoRA as plain ``add_patches``
  (the same path as LoraLoader), so any KSampler can use it.
"""
from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ..hero_engine import loop as hero_loop
from ..hero_engine.lora import (LoraModule, LoraState, export_kohya, invert_unet_to_diffusers,
                                names_from_map)
from ..hero_engine.policy import PolicyOptimizer
from ..hero_engine.sampling import DDIMSchedule
from ..hero_engine.session import LORA_TARGETS, HeroConfig, Session, SessionError

log = logging.getLogger("HERO")

TARGET_SUFFIXES = tuple("." + s for s in LORA_TARGETS[HeroConfig().lora_targets])
DM = "diffusion_model."
GENERATE_MICRO_BATCH = 8


class HeroHostError(ValueError):
    """A model, input or session that HERO cannot use here; the message says what and the fix."""


# ---- model checks and names ------------------------------------------------------------------

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


# ---- the session's LoRA ------------------------------------------------------------------------

def initial_lora(model, names: list[str], rank: int, alpha: float, seed: int) -> dict:
    """Round-0 LoRA: down ~ N(0, 1/r^2) (peft's 'gaussian' init), up = 0 (so delta W = 0)."""
    g = torch.Generator().manual_seed(int(seed) * 7 + 12345)
    out = {}
    for n in names:
        w = _module(model, n).weight
        out[f"{n}.down"] = torch.randn(rank, w.shape[1], generator=g) / rank
        out[f"{n}.up"] = torch.zeros(w.shape[0], rank)
        out[f"{n}.alpha"] = torch.tensor(float(alpha), dtype=torch.float64)
    return out


def session_lora(session: Session, model, names: list[str]) -> dict:
    """The session's current LoRA tensors, checked against ``model`` (or the round-0 init)."""
    cfg = session.config
    st = session.load_state()
    tensors = st.get("lora")
    if tensors is None:
        return initial_lora(model, names, cfg.lora_rank, cfg.lora_alpha, cfg.seed)
    have = {k.rsplit(".", 1)[0] for k in tensors}
    if have != set(names):
        extra, missing = sorted(have - set(names)), sorted(set(names) - have)
        raise HeroHostError(
            f"session '{session.session_id}' holds a LoRA for a different model ("
            f"{len(have)} modules; {len(missing)} of this model's attention layers are missing, "
            f"e.g. {missing[:2]}; {len(extra)} unknown, e.g. {extra[:2]}). Use the checkpoint the "
            f"session was started with, or a new session_id.")
    for n in names:
        w = _module(model, n).weight
        d, u = tensors[f"{n}.down"], tensors[f"{n}.up"]
        if d.shape[1] != w.shape[1] or u.shape[0] != w.shape[0]:
            raise HeroHostError(
                f"session '{session.session_id}': LoRA module {n} has shape up {tuple(u.shape)} / "
                f"down {tuple(d.shape)} but the model's weight is {tuple(w.shape)}; use the "
                f"checkpoint the session was started with, or a new session_id.")
    return tensors


def lora_state(tensors: dict, names: list[str], family: str, kohya: dict) -> LoraState:
    """Session tensors -> hero_engine.lora.LoraState (for export)."""
    mods = {}
    rank = None
    for n in names:
        down, up = tensors[f"{n}.down"].float(), tensors[f"{n}.up"].float()
        a = tensors.get(f"{n}.alpha")
        mods[n] = LoraModule(down, up, float(a) if a is not None else float(down.shape[0]))
        rank = mods[n].rank
    return LoraState(mods, family, rank, {n: kohya[n] for n in names})


def remember_lora_layout(session: Session, model, family: str, names: list[str]) -> dict:
    """Store family + kohya names in the session info (HERO_ExportLoRA needs no MODEL input)."""
    kohya = kohya_names(model, family, names)
    info = {"family": family, "kohya": kohya, "rank": session.config.lora_rank,
            "alpha": session.config.lora_alpha,
            "model": type(model.model.model_config).__name__}
    if session.info.get("lora_layout") != info:
        session.update_info(lora_layout=info)
    return kohya


# ---- weight wrappers -------------------------------------------------------------------------

class LoraWeightWrapper(torch.nn.Module):
    """``w -> w + alpha/r * up @ down``; a ComfyUI weight function (``add_weight_wrapper``)."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, scale: float, trainable: bool):
        super().__init__()
        self.down = torch.nn.Parameter(down, requires_grad=trainable)
        self.up = torch.nn.Parameter(up, requires_grad=trainable)
        self.scale = float(scale)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        d = (self.up.to(w.device, torch.float32) @ self.down.to(w.device, torch.float32)) * self.scale
        return w.detach() + d.to(w.dtype)  # detach: gradients reach the LoRA only, never the model


def _own_copy(w: torch.Tensor) -> torch.Tensor:
    """Identity wrapper on a frozen weight (guide 2.3 variant B). A layer with a weight function
    gets its weight from ``comfy.ops.cast_bias_weight`` as a copy (``cast_to(copy=True)``, in both
    supported ComfyUI versions), made here outside inference mode: a normal tensor that autograd
    may save, unlike the model's own inference tensors. So the wrapper needs to copy nothing
    more (a second clone cost 12% of the PPO update on SD1.5, docs/performance.md); detached so
    no gradient reaches the shared model."""
    return w.detach()


def attach_lora(model, tensors: dict, names: list[str], trainable: bool, copy_others: bool):
    """``model.clone()`` with the LoRA as weight wrappers -> (patcher, {param name: Parameter}).
    With ``trainable`` the parameters are fp32 leaves requiring grad; with ``copy_others`` every
    other weight/bias gets an identity copy wrapper (needed for backward, guide 2.3)."""
    mp = model.clone()
    dev = mp.load_device
    params = {}
    for n in names:
        a = tensors.get(f"{n}.alpha")
        down = tensors[f"{n}.down"].detach().to(dev, torch.float32).clone()
        up = tensors[f"{n}.up"].detach().to(dev, torch.float32).clone()
        alpha = float(a) if a is not None else float(down.shape[0])
        wr = LoraWeightWrapper(down, up, alpha / down.shape[0], trainable)
        mp.add_weight_wrapper(f"{DM}{n}.weight", wr)
        params[f"{n}.down"] = wr.down
        params[f"{n}.up"] = wr.up
    if copy_others:
        targets = {DM + n for n in names}
        for mname, m in mp.model.named_modules():
            if not hasattr(m, "weight_function"):
                continue
            if getattr(m, "weight", None) is not None and mname not in targets:
                mp.add_weight_wrapper(f"{mname}.weight", _own_copy)
            if getattr(m, "bias", None) is not None:
                mp.add_weight_wrapper(f"{mname}.bias", _own_copy)
    return mp, params


def kohya_tensors(tensors: dict, names: list[str], kohya: dict) -> dict:
    """Session tensors -> an in-memory kohya LoRA dict (what export_kohya writes, fp32)."""
    out = {}
    for n in names:
        k = kohya[n]
        down = tensors[f"{n}.down"].float()
        out[f"{k}.lora_down.weight"] = down
        out[f"{k}.lora_up.weight"] = tensors[f"{n}.up"].float()
        a = tensors.get(f"{n}.alpha")
        out[f"{k}.alpha"] = torch.tensor(float(a) if a is not None else float(down.shape[0]))
    return out


def patched_model(model, tensors: dict, names: list[str], kohya: dict, strength: float = 1.0):
    """A fresh ``model.clone()`` with the LoRA as plain patches (LoraLoader's path), usable by any
    sampler. Every module must match a model key."""
    import comfy.lora
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    patches = comfy.lora.load_lora(kohya_tensors(tensors, names, kohya), key_map)
    if len(patches) != len(names):
        raise HeroHostError(f"only {len(patches)} of {len(names)} LoRA modules matched the model "
                            f"(kohya names); this is a bug, please report it")
    m = model.clone()
    m.add_patches(patches, float(strength))
    return m


# ---- denoiser + samplers -------------------------------------------------------------------

def make_denoiser(model_wrap, extra_args: dict):
    """The engine's Denoiser over ComfyUI's CFG-combined x0 prediction."""
    def denoiser(x: torch.Tensor, t: torch.Tensor, alpha_bar: torch.Tensor, index: torch.Tensor):
        ab = alpha_bar.to(x.device, torch.float32).reshape(-1)
        sigma = ((1.0 - ab) / ab).sqrt()
        view = (-1,) + (1,) * (x.dim() - 1)
        x_k = x.float() * (1.0 + sigma ** 2).sqrt().view(view)
        x0 = model_wrap(x_k, sigma, **extra_args)
        return (x_k - x0.float()) / sigma.view(view)
    return denoiser


def _clone_conds(d):
    """Clone every tensor in processed conds (nodes_train.process_cond_list + CONDRegular.cond)."""
    if isinstance(d, dict):
        for k, v in list(d.items()):
            if isinstance(v, torch.Tensor):
                d[k] = v.clone()
            else:
                d[k] = _clone_conds(v)
        return d
    if isinstance(d, list):
        for i, v in enumerate(d):
            d[i] = v.clone() if isinstance(v, torch.Tensor) else _clone_conds(v)
        return d
    c = getattr(d, "cond", None)
    if isinstance(c, torch.Tensor) and hasattr(d, "_copy_with"):
        return d._copy_with(c.clone())
    return d


def _sampler_base():
    import comfy.samplers

    class _CallbackSampler(comfy.samplers.Sampler):
        """A ComfyUI Sampler that hands model_wrap to ``fn(model_wrap, extra_args, noise)``."""

        def __init__(self, fn):
            self.fn = fn

        def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None,
                   denoise_mask=None, disable_pbar=False):
            return self.fn(model_wrap, extra_args, noise)

    return _CallbackSampler


def _progress(total_hint: int = 100):
    import comfy.model_management as mm
    import comfy.utils
    bar = comfy.utils.ProgressBar(max(1, total_hint))

    def progress(phase: str, i: int, n: int) -> None:
        mm.throw_exception_if_processing_interrupted()
        bar.update_absolute(int(i), int(max(n, 1)))
    return progress


# ---- memory modes of the update (hero_engine/memory.py) ----------------------------------------

def release_other_models(mp, device) -> int:
    """Unload every model ComfyUI holds on ``device`` except ``mp`` and its clones (the VAE, the
    text encoders) -> how many. ``comfy_extras/nodes_train.py`` does this with
    ``load_models_gpu([mp], memory_required=1e20)``; ``free_memory`` is called directly here
    because ``load_models_gpu`` frees nothing on a CPU device (the same call, testable there)."""
    import comfy.model_management as mm
    own = [mp, *mp.model_patches_models()]
    keep = [lm for lm in mm.current_loaded_models
            if lm.model is not None and any(lm.model is m or lm.model.is_clone(m) for m in own)]
    return len(mm.free_memory(1e30, device, keep_loaded=keep))


@contextlib.contextmanager
def gradient_checkpointing(mp, on: bool):
    """ComfyUI's own gradient checkpointing (the Train LoRA node's ``patch`` / ``unpatch`` of the
    diffusion model's highest child modules, ``comfy_extras/nodes_train.py``) for the update ->
    the number of checkpointed modules. The modules are shared with the host's MODEL, so they are
    always unpatched afterwards."""
    if not on:
        yield 0
        return
    try:
        from comfy_extras import nodes_train
        find, patch, unpatch = (nodes_train.find_all_highest_child_module_with_forward,
                                nodes_train.patch, nodes_train.unpatch)
    except (ImportError, AttributeError) as e:
        raise HeroHostError(f"gradient checkpointing uses ComfyUI's comfy_extras/nodes_train.py, "
                            f"which this ComfyUI does not offer ({e}); turn "
                            f"gradient_checkpointing off on HERO Session, or update ComfyUI"
                            ) from None
    mods = find(mp.model.diffusion_model)
    for m in mods:
        patch(m)
    try:
        yield len(mods)
    finally:
        for m in mods:
            unpatch(m)


def check_vae(vae) -> None:
    if vae is None or not hasattr(vae, "decode"):
        raise HeroHostError("HERO Generate needs a VAE to decode the batch: connect the VAE output "
                            "of Load Checkpoint (or a VAE Loader)")


@dataclass
class HeroBatch:
    """What flows on the HERO_BATCH socket: the round's batch plus what training needs again."""
    session: Session
    round: int
    size: int
    images: torch.Tensor          # [B, H, W, 3] in [0, 1] (ComfyUI IMAGE)
    latent: torch.Tensor          # [B, C, h, w] (ComfyUI LATENT samples)
    positive: Any = None
    negative: Any = None
    cfg: float = 5.0
    steps: int = 20
    width: int = 512
    height: int = 512
    reused: bool = False
    family: str = ""

    def __repr__(self) -> str:
        return (f"HeroBatch(session={self.session.session_id!r}, round={self.round}, "
                f"size={self.size}, reused={self.reused})")


def _load_pending_images(session: Session, k: int, n: int) -> torch.Tensor:
    import numpy as np
    from PIL import Image
    ims = []
    for i in range(n):
        p = session.image_path(k, i)
        if not p.is_file():
            raise SessionError(f"round {k} image {p} is missing; delete {session.round_dir(k)} to "
                               f"generate the round again")
        ims.append(torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255.0))
    return torch.stack(ims)


def generate(model, positive, negative, vae, session: Session, batch_size: int = 0,
             steps: int = 0, cfg: float = 0.0, width: int = 512, height: int = 512,
             seed: int = 0, workflow: Optional[dict] = None) -> HeroBatch:
    """HERO_Generate: sample the round's batch with the current LoRA through ComfyUI's guider
    (or re-use the round's stored batch after a restart). ``workflow``: what the node read from
    the queued graph (``prompt``/``negative`` text, base ``checkpoint`` name), recorded for the
    exported LoRA's card."""
    import comfy.samplers

    workflow = workflow or {}
    if workflow.get("checkpoint") and session.info.get("base_checkpoint") != workflow["checkpoint"]:
        session.update_info(base_checkpoint=workflow["checkpoint"])

    family = model_family(model)
    check_vae(vae)
    if positive is None or negative is None:
        raise HeroHostError("connect both positive and negative CONDITIONING (CLIP Text Encode)")
    names = lora_targets(model, session)
    kohya = remember_lora_layout(session, model, family, names)
    scfg = session.config
    steps = int(steps) or scfg.steps
    cfg = float(cfg) or scfg.cfg
    n = int(batch_size) or scfg.batch_size
    k = session.round
    pend = session.pending()
    if pend is not None:
        # a batch generated before a restart (or an earlier failed prompt): show the same images
        size = int(pend["meta"]["size"])
        data = session.load_generated(k)
        if "latents" not in data:
            raise SessionError(f"round {k}'s stored batch has no trajectory; delete "
                               f"{session.round_dir(k)} to generate it again")
        x0 = data["latents"][:, -1].float()
        latent = model.model.process_latent_out(x0)
        images = _load_pending_images(session, k, size)
        meta = pend["meta"]
        log.info("HERO: session %s round %d: re-using the batch generated before (%d images)",
                 session.session_id, k, size)
        return HeroBatch(session, k, size, images, latent, positive, negative,
                         float(meta.get("cfg", cfg)), int(meta.get("steps", steps)),
                         int(meta.get("width", width)), int(meta.get("height", height)),
                         reused=True, family=family)
    if n < 2:
        raise HeroHostError("batch_size must be at least 2 (a good and a bad image)")
    if width % 8 or height % 8:
        raise HeroHostError(f"width and height must be multiples of 8, got {width}x{height}")

    # the LoRA merged into the weights as plain patches (LoraLoader's path): sampling then costs
    # what a KSampler with the LoRA costs. Weight wrappers (attach_lora, what training needs)
    # recompute W + B A in every call: 22% of Generate on SD1.5 at 64 px (docs/performance.md).
    # In fp32 both give the same weights bit for bit (the host test checks the PPO ratio is 1).
    mp = patched_model(model, session_lora(session, model, names), names, kohya)
    ms = mp.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, "ddim_uniform", steps).cpu()
    schedule = DDIMSchedule.from_sigmas(sigmas, ms.sigmas.detach().cpu())
    channels = mp.get_model_object("latent_format").latent_channels
    shape = (channels, height // 8, width // 8)
    guider = comfy.samplers.CFGGuider(mp)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    progress = _progress(steps)
    out: dict = {}
    old_bs = scfg.batch_size

    def run(model_wrap, extra_args, noise):
        def decode(x0):
            lat = model_wrap.inner_model.process_latent_out(x0.float())
            img = vae.decode(lat)
            if img.dim() == 5:  # video VAEs: [B, T, H, W, C]
                img = img.reshape(-1, *img.shape[-3:])
            img = img[..., :3].float().clamp(0, 1).cpu()
            out["images"] = img
            return img.permute(0, 3, 1, 2)

        out["batch"] = hero_loop.generate_round(
            session, make_denoiser(model_wrap, extra_args), decode, schedule, shape,
            [workflow["prompt"]] if workflow.get("prompt") else [],
            device=noise.device, progress=progress, micro_batch=GENERATE_MICRO_BATCH,
            extra_meta={"cfg": cfg, "steps": steps, "width": width, "height": height,
                        "seed": int(seed), "family": family, "host": "comfyui",
                        "prompt_text": workflow.get("prompt") or "",
                        "negative_text": workflow.get("negative") or "",
                        "checkpoint": workflow.get("checkpoint") or ""})
        return out["batch"].trajectory.x0.float().to(noise.device)

    noise = torch.zeros((n, *shape))
    try:
        scfg.batch_size = n  # this round's size (per-round setting, not persisted)
        latent = guider.sample(noise, torch.zeros_like(noise), _sampler_base()(run), sigmas,
                               seed=int(seed))
    finally:
        scfg.batch_size = old_bs
    return HeroBatch(session, k, n, out["images"], latent.cpu(), positive, negative, cfg, steps,
                     width, height, reused=False, family=family)


@dataclass
class TrainResult:
    model: Any
    metrics: dict
    trained: bool
    message: str = ""


def _same_session(a, b) -> bool:
    try:
        return Path(a.path).resolve() == Path(b.path).resolve()
    except Exception:  # noqa: BLE001
        return a is b


def train(model, session: Session, feedback) -> TrainResult:
    """HERO_Train: representation learning + one PPO epoch on the LoRA inside ComfyUI's guider,
    then commit the round. Returns a MODEL with the LoRA as plain patches."""
    import comfy.model_management as mm
    import comfy.samplers

    family = model_family(model)
    fb_session = getattr(feedback, "session", None)
    batch = getattr(feedback, "batch", None)
    if fb_session is None or not hasattr(feedback, "round") or not hasattr(feedback, "marks"):
        raise HeroHostError("the 'feedback' input must come from HERO Feedback")
    if not _same_session(fb_session, session):
        raise HeroHostError(f"the feedback belongs to session '{fb_session.session_id}' but this "
                            f"HERO Train is connected to session '{session.session_id}'; connect "
                            f"the same HERO Session to HERO Generate and HERO Train")
    if batch is not None and not _same_session(getattr(batch, "session", session), session):
        raise HeroHostError(f"the batch belongs to session '{batch.session.session_id}', not "
                            f"'{session.session_id}'")
    names = lora_targets(model, session)
    kohya = remember_lora_layout(session, model, family, names)
    k = session.round
    if int(feedback.round) < k:  # already trained (e.g. the prompt ran again): nothing to do
        tensors = session_lora(session, model, names)
        return TrainResult(patched_model(model, tensors, names, kohya), {}, False,
                           f"round {feedback.round} was already trained")
    if int(feedback.round) > k:
        raise HeroHostError(f"the feedback is for round {feedback.round} but session "
                            f"'{session.session_id}' is at round {k}")
    if batch is None or getattr(batch, "positive", None) is None:
        raise HeroHostError("the feedback carries no HERO batch with conditioning; connect HERO "
                            "Generate -> HERO Feedback -> HERO Train")
    tensors = session_lora(session, model, names)
    device = mm.get_torch_device()
    progress = _progress(100)
    log.info("HERO: session %s round %d: training (%d marks)", session.session_id, k,
             feedback.marks.count)
    with torch.inference_mode(False), torch.enable_grad():
        plan = hero_loop.prepare_learning(session, device=device, progress=progress)
        mp, params = attach_lora(model, tensors, names, trainable=True, copy_others=True)
        popt = PolicyOptimizer(params, session.config.policy)
        st = session.load_state()
        if "policy_opt" in st:
            try:
                popt.load_state_dict(st["policy_opt"])
            except ValueError as e:
                raise HeroHostError(f"session '{session.session_id}': {e}") from None
        mm.load_models_gpu([mp], memory_required=0, force_full_load=True)
        pcfg = session.config.policy
        released = release_other_models(mp, mp.load_device) if pcfg.release_models else 0
        ms = mp.get_model_object("model_sampling")
        sigmas = comfy.samplers.calculate_sigmas(ms, "ddim_uniform", max(1, len(plan.trajectory.schedule))).cpu()
        guider = comfy.samplers.CFGGuider(mp)
        guider.set_conds(batch.positive, batch.negative)
        scfg = session.config
        # reward-weighted denoising trains the conditional prediction alone: at cfg 1 ComfyUI
        # skips the unconditional pass (unless extra samples must be drawn with guidance)
        conditional_only = scfg.update == "rwr" and scfg.extra_samples(len(plan.trajectory)) == 0
        guider.set_cfg(1.0 if conditional_only else float(batch.cfg))
        res: dict = {}

        def run(model_wrap, extra_args, noise):
            model_wrap.conds = _clone_conds(model_wrap.conds)
            ex = dict(extra_args)
            res.update(hero_loop.apply_policy_update(
                session, plan, make_denoiser(model_wrap, ex), popt, progress))
            return torch.zeros_like(noise)

        shape = tuple(plan.trajectory.latents.shape[2:])
        bs = max(1, min(session.config.policy.train_batch_size, len(plan.trajectory)))
        noise = torch.zeros((bs, *shape))
        with gradient_checkpointing(mp, pcfg.gradient_checkpointing) as n_checkpointed:
            guider.sample(noise, torch.zeros_like(noise), _sampler_base()(run), sigmas, seed=0)
        plan.metrics.update({"released_models": released,
                             "checkpointed_modules": n_checkpointed})
        lora_out = {}
        for n in names:
            lora_out[f"{n}.down"] = params[f"{n}.down"].detach()
            lora_out[f"{n}.up"] = params[f"{n}.up"].detach()
            lora_out[f"{n}.alpha"] = torch.as_tensor(tensors[f"{n}.alpha"]).detach().clone()
        metrics = hero_loop.complete_round(session, plan, lora_out, popt,
                                           {"host": "comfyui", "family": family})
    new = {k_: v.detach().cpu().float() for k_, v in lora_out.items()}
    del mp, params, popt
    return TrainResult(patched_model(model, new, names, kohya), metrics, True,
                       f"round {k} trained")


def apply_lora(model, session: Session, strength: float = 1.0):
    """HERO_ApplyLoRA: the session's current LoRA on a clone of ``model`` (plain patches)."""
    family = model_family(model)
    names = lora_targets(model, session)
    kohya = remember_lora_layout(session, model, family, names)
    st = session.load_state()
    if "lora" not in st:
        return model.clone(), False
    tensors = session_lora(session, model, names)
    return patched_model(model, tensors, names, kohya, strength), True


# ---- export ------------------------------------------------------------------------------------

EXPORT_DTYPES = ("fp16", "fp32")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_RESERVED = ({"con", "prn", "aux", "nul", "clock$"} | {f"com{i}" for i in range(10)}
             | {f"lpt{i}" for i in range(10)})
_LITERALS = {"true", "false", "null", "none", "nan", "inf", "undefined"}


def check_export_args(prefix, dtype) -> tuple[str, str]:
    """Validate an export's file name prefix and dtype (before anything is loaded) -> both, or
    HeroHostError naming the problem and the fix."""
    if not isinstance(prefix, str):
        raise HeroHostError(f"filename_prefix must be text, got {type(prefix).__name__} "
                            f"{prefix!r}; use e.g. 'hero' (letters, digits, '_' or '-')")
    p = prefix.strip()
    if not _PREFIX_RE.match(p):
        raise HeroHostError(f"invalid filename_prefix {prefix!r}: use 1-64 letters, digits, '_' or "
                            f"'-', starting with a letter or digit (the file goes to "
                            f"models/loras/hero/<prefix>_r<round>.safetensors)")
    if p.lower() in _RESERVED:
        raise HeroHostError(f"filename_prefix {prefix!r} is a reserved device name on Windows; "
                            f"choose another name, e.g. 'hero_{p.lower()}'")
    if p.lower() in _LITERALS:
        raise HeroHostError(f"filename_prefix {prefix!r} reads as a value, not a name (a boolean "
                            f"or null turned into text?); choose a name such as 'hero'")
    if dtype is None:
        dtype = "fp16"
    if not isinstance(dtype, str) or dtype.strip().lower() not in EXPORT_DTYPES:
        raise HeroHostError(f"unknown dtype {dtype!r}: choose one of {', '.join(EXPORT_DTYPES)}")
    return p, dtype.strip().lower()


def export_path(prefix: str, round_: int) -> Path:
    import folder_paths
    prefix, _ = check_export_args(prefix, "fp16")
    root = Path(folder_paths.get_folder_paths("loras")[0])
    return root / "hero" / f"{prefix}_r{round_:04d}.safetensors"


class NothingToExport(HeroHostError):
    """The session has nothing of that kind yet (no trained round, no marks): HERO's export
    nodes show it as a message and let the round go on; the panel's route answers 409."""


def export_lora(session: Session, prefix, dtype="fp16", author: str = "") -> dict:
    """HERO_ExportLoRA: write the session's LoRA as a kohya file into models/loras/hero/, with
    the metadata tools display (kohya hashes, modelspec card with the best image as thumbnail,
    training tags from the prompts) and A1111's ``<name>.json`` sidecar beside it.
    The arguments are checked first; then, under the session lock (a round commit waits), only
    the LoRA is loaded (not the 128 MB encoder), written, and recorded as the last export."""
    import json
    from ..hero_engine.fileio import PUBLIC_MODE, atomic_write_json
    from ..hero_engine.publish import session_card
    prefix, dtype = check_export_args(prefix, dtype)

    def write(st: dict, s: Session) -> dict:
        if "lora" not in st:
            raise NothingToExport(f"session '{s.session_id}' has no trained LoRA yet: the "
                                  f"first export comes after round 0 is trained (HERO Train)")
        layout = s.info.get("lora_layout")
        if not layout:
            raise HeroHostError(f"session '{s.session_id}' does not record its model family; "
                                f"run HERO Generate or HERO Apply LoRA once with the session's "
                                f"model")
        tensors = st["lora"]
        have = {k.rsplit(".", 1)[0] for k in tensors}
        names = [n for n in layout["kohya"] if n in have]
        if len(names) != len(have):
            raise HeroHostError(f"session '{s.session_id}': the recorded model layout does not "
                                f"cover the LoRA ({len(have) - len(names)} modules unnamed); run "
                                f"HERO Apply LoRA once with the session's model, then export "
                                f"again")
        state = lora_state(tensors, names, layout["family"], layout["kohya"])
        path = export_path(prefix, s.round)
        cfg = s.config
        md = {"hero_session_id": s.session_id, "hero_round": str(s.round),
              "hero_labels_used": str(s.labels_used), "hero_method": cfg.method,
              "hero_config": json.dumps(cfg.to_json(), sort_keys=True),
              "hero_base_model": layout.get("model", ""), "hero_family": layout["family"],
              "hero_best": json.dumps(s.best.__dict__ if s.best else None),
              "ss_training_comment": f"HERO online human-feedback RL, session {s.session_id}, "
                                     f"{s.round} rounds, {s.labels_used} labels"}
        base = s.info.get("base_checkpoint") or layout.get("model", "")
        card, sidecar = session_card(s, layout["family"], base_model=base, author=author)
        md.update(card)
        md_written = export_kohya(state, path, md,
                                  dtype=torch.float16 if dtype == "fp16" else torch.float32,
                                  mode=PUBLIC_MODE)
        side = path.with_suffix(".json")
        atomic_write_json(side, sidecar, mode=PUBLIC_MODE)
        return {"file": f"hero/{path.name}", "path": str(path), "filename": f"hero/{path.name}",
                "modules": len(names), "metadata": md_written, "sidecar": str(side)}

    res = session.export_state(write, names=("lora",))
    res.pop("file", None)
    from ..hero_engine.fileio import remove_stale_temps
    remove_stale_temps(Path(res["path"]).parent, recursive=False)  # an export killed earlier
    return res


# ---- the session's data for other tools --------------------------------------------------------

def export_preferences(session: Session) -> dict:
    """HERO_ExportPreferences: the marks as good-vs-bad pairs (JSONL) in the session folder,
    ``output/hero/<id>/exports/preferences_r<round>.jsonl`` (image paths relative to it)."""
    from ..hero_engine.publish import export_preferences as write
    with session.locked():
        session.refresh()
        if not any(session.marks_for(k) is not None for k in range(session.round + 1)):
            raise NothingToExport(f"session '{session.session_id}' has no marked round yet")
        path = Path(session.path) / "exports" / f"preferences_r{session.round:04d}.jsonl"
        res = write(session, path)
    import folder_paths
    out = Path(folder_paths.get_output_directory()).resolve()
    try:
        res["filename"] = str(path.resolve().relative_to(out))
    except ValueError:
        res["filename"] = path.name
    res["round"] = session.round
    return res


def export_noise(session: Session, limit: int = 64) -> dict:
    """HERO_ExportNoise: the best and good initial noises as ``input/hero_<id>_r<round>.latent``
    (ComfyUI's input folder, where LoadLatent lists files)."""
    import folder_paths
    from ..hero_engine.publish import export_noise_latent
    with session.locked():
        session.refresh()
        if session.best is None:
            raise NothingToExport(f"session '{session.session_id}' has no best image yet: mark "
                                  f"and train round 0 first")
        family = (session.info.get("lora_layout") or {}).get("family")
        if family is None:
            raise HeroHostError(f"session '{session.session_id}' does not record its model "
                                f"family; run HERO Generate once with the session's model")
        name = f"hero_{session.session_id}_r{session.round:04d}.latent"
        path = Path(folder_paths.get_input_directory()) / name
        res = export_noise_latent(session, path, family, limit=int(limit))
    res["filename"] = name
    res["round"] = session.round
    return res
