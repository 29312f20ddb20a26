"""The ComfyUI adapter: ComfyUI MODEL / CONDITIONING / VAE -> the engine's denoiser protocol.

The node operations live here (HERO Generate, Train, Apply LoRA, the exports); the nodes in
``nodes.py`` stay thin. The adapter's parts, split along their seams:

* ``host_models.py``   which MODEL HERO can train, the LoRA's layers and their kohya names;
* ``host_lora.py``     the session's LoRA on a MODEL: weight wrappers and plain patches;
* ``host_sampler.py``  the sampler bridge (``_CallbackSampler``, conds cloning, progress) and the
                       update's memory modes.

Each operation loads the session's state once and passes it down. Design (DESIGN.md
decisions 3-5, comfyui_guide 2.3-2.7):

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
* The session keeps the LoRA as a ``hero_engine.lora.LoraState`` (fp32, LDM module names without
  ``diffusion_model.``, the family-native kohya names and the family): the state every path reads
  and writes, so HERO_ExportLoRA needs no MODEL input.
* The MODEL that leaves HERO_Train / HERO_ApplyLoRA carries the LoRA as plain ``add_patches``
  (the same path as LoraLoader), so any KSampler can use it.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ..hero_engine import loop as hero_loop
from ..hero_engine.lora import export_kohya
from ..hero_engine.policy import PolicyOptimizer
from ..hero_engine.sampling import DDIMSchedule
from ..hero_engine.session import Session, SessionError
from .host_lora import attach_lora, patched_model, session_lora, trained_lora
from .host_models import HeroHostError, check_vae, lora_targets, model_family
from .host_sampler import (_clone_conds, _progress, _sampler_base, gradient_checkpointing,
                           make_denoiser, release_other_models)

log = logging.getLogger("HERO")

GENERATE_MICRO_BATCH = 8

# the node operations; the adapter's parts live in host_models (model checks), host_lora (the LoRA
# weight wrappers) and host_sampler (the sampler bridge)
__all__ = ["HeroHostError", "NothingToExport", "HeroBatch", "TrainResult", "generate", "train",
           "apply_lora", "export_lora", "export_preferences", "export_noise",
           "check_export_args", "export_path", "GENERATE_MICRO_BATCH"]


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
    guidance_scale: float = 5.0
    steps: int = 20
    width: int = 512
    height: int = 512
    reused: bool = False
    family: str = ""

    def __repr__(self) -> str:
        return (f"HeroBatch(session={self.session.session_id!r}, round={self.round}, "
                f"size={self.size}, reused={self.reused})")


def _load_pending_images(session: Session, round_idx: int, n: int) -> torch.Tensor:
    import numpy as np
    from PIL import Image
    ims = []
    for i in range(n):
        p = session.image_path(round_idx, i)
        if not p.is_file():
            raise SessionError(f"round {round_idx} image {p} is missing; delete "
                               f"{session.round_dir(round_idx)} to generate the round again")
        ims.append(torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255.0))
    return torch.stack(ims)


def generate(model, positive, negative, vae, session: Session, batch_size: int = 0,
             steps: int = 0, guidance_scale: float = 0.0, width: int = 512, height: int = 512,
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
    config = session.config
    steps = int(steps) or config.steps
    guidance_scale = float(guidance_scale) or config.guidance_scale
    n = int(batch_size) or config.batch_size
    round_idx = session.round
    pend = session.pending()
    if pend is not None:
        # a batch generated before a restart (or an earlier failed prompt): show the same images
        size = int(pend["meta"]["size"])
        data = session.load_generated(round_idx)
        if "latents" not in data:
            raise SessionError(f"round {round_idx}'s stored batch has no trajectory; delete "
                               f"{session.round_dir(round_idx)} to generate it again")
        x0 = data["latents"][:, -1].float()
        latent = model.model.process_latent_out(x0)
        images = _load_pending_images(session, round_idx, size)
        meta = pend["meta"]
        log.info("HERO: session %s round %d: re-using the batch generated before (%d images)",
                 session.session_id, round_idx, size)
        return HeroBatch(session, round_idx, size, images, latent, positive, negative,
                         float(meta.get("cfg", guidance_scale)), int(meta.get("steps", steps)),
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
    st = session.load_state()  # once: the LoRA here, the best noise and the pool in the loop
    mp = patched_model(model, session_lora(session, model, names, st, family))
    ms = mp.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, "ddim_uniform", steps).cpu()
    schedule = DDIMSchedule.from_sigmas(sigmas, ms.sigmas.detach().cpu())
    channels = mp.get_model_object("latent_format").latent_channels
    shape = (channels, height // 8, width // 8)
    guider = comfy.samplers.CFGGuider(mp)
    guider.set_conds(positive, negative)
    guider.set_cfg(guidance_scale)
    progress = _progress(steps)
    out: dict = {}

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
            # "cfg": the guidance scale (the key stored rounds' meta.json have)
            extra_meta={"cfg": guidance_scale, "steps": steps, "width": width, "height": height,
                        "seed": int(seed), "family": family, "host": "comfyui",
                        "prompt_text": workflow.get("prompt") or "",
                        "negative_text": workflow.get("negative") or "",
                        "checkpoint": workflow.get("checkpoint") or ""},
            batch_size=n, state=st)  # this round's size (a per-round setting, not persisted)
        return out["batch"].trajectory.x0.float().to(noise.device)

    noise = torch.zeros((n, *shape))
    latent = guider.sample(noise, torch.zeros_like(noise), _sampler_base()(run), sigmas,
                           seed=int(seed))
    return HeroBatch(session, round_idx, n, out["images"], latent.cpu(), positive, negative,
                     guidance_scale, steps, width, height, reused=False, family=family)


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
    round_idx = session.round
    # already trained (e.g. the prompt ran again): nothing to do
    if int(feedback.round) < round_idx:
        lora = session_lora(session, model, names, session.load_state(("lora",)), family)
        return TrainResult(patched_model(model, lora), {}, False,
                           f"round {feedback.round} was already trained")
    if int(feedback.round) > round_idx:
        raise HeroHostError(f"the feedback is for round {feedback.round} but session "
                            f"'{session.session_id}' is at round {round_idx}")
    if batch is None or getattr(batch, "positive", None) is None:
        raise HeroHostError("the feedback carries no HERO batch with conditioning; connect HERO "
                            "Generate -> HERO Feedback -> HERO Train")
    device = mm.get_torch_device()
    progress = _progress(100)
    log.info("HERO: session %s round %d: training (%d marks)", session.session_id, round_idx,
             feedback.marks.num_marked)
    with torch.inference_mode(False), torch.enable_grad():
        # once, outside inference mode (the optimizer's state is updated in place): the LoRA,
        # the optimizer, the encoder, the best, the pool
        st = session.load_state()
        lora = session_lora(session, model, names, st, family)
        plan = hero_loop.prepare_learning(session, device=device, progress=progress, state=st)
        mp, params = attach_lora(model, lora, trainable=True, copy_others=True)
        popt = PolicyOptimizer(params, session.config.policy)
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
        config = session.config
        # reward-weighted denoising trains the conditional prediction alone: at guidance scale 1
        # ComfyUI skips the unconditional pass (unless extra samples must be drawn with guidance)
        conditional_only = (config.update == "rwr"
                            and config.extra_samples(len(plan.trajectory)) == 0)
        guider.set_cfg(1.0 if conditional_only else float(batch.guidance_scale))
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
        new = trained_lora(lora, params)
        metrics = hero_loop.complete_round(session, plan, new, popt,
                                           {"host": "comfyui", "family": family})
    del mp, params, popt
    return TrainResult(patched_model(model, new), metrics, True,
                       f"round {round_idx} trained")


def apply_lora(model, session: Session, strength: float = 1.0):
    """HERO_ApplyLoRA: the session's current LoRA on a clone of ``model`` (plain patches)."""
    family = model_family(model)
    names = lora_targets(model, session)
    st = session.load_state(("lora",))
    if "lora" not in st:
        return model.clone(), False
    return patched_model(model, session_lora(session, model, names, st, family), strength), True


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


def _stored_lora(session: Session, state: dict):
    """The session's stored LoRA (its family and kohya names come with it; a session from an
    older version is read with the layout its session.json recorded)."""
    from ..hero_engine.lora import LoraFormatError
    try:
        lora = session.load_lora(state)
    except LoraFormatError as e:
        raise HeroHostError(f"session '{session.session_id}': {e}; train a round with the "
                            f"session's model (HERO Train), then export again") from None
    if lora is None:
        raise NothingToExport(f"session '{session.session_id}' has no trained LoRA yet: the "
                              f"first export comes after round 0 is trained (HERO Train)")
    return lora


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
        state = _stored_lora(s, st)
        path = export_path(prefix, s.round)
        config = s.config
        md = {"hero_session_id": s.session_id, "hero_round": str(s.round),
              # "hero_labels_used": the marks used (the key's old name, as exported files have it)
              "hero_labels_used": str(s.marks_used), "hero_method": config.method,
              "hero_config": json.dumps(config.to_json(), sort_keys=True),
              "hero_base_model": state.base_model, "hero_family": state.family,
              "hero_best": json.dumps(s.best.__dict__ if s.best else None),
              "ss_training_comment": f"HERO online human-feedback RL, session {s.session_id}, "
                                     f"{s.round} rounds, {s.marks_used} labels"}
        base = s.info.get("base_checkpoint") or state.base_model
        card, sidecar = session_card(s, state.family, base_model=base, author=author)
        md.update(card)
        md_written = export_kohya(state, path, md,
                                  dtype=torch.float16 if dtype == "fp16" else torch.float32,
                                  mode=PUBLIC_MODE)
        side = path.with_suffix(".json")
        atomic_write_json(side, sidecar, mode=PUBLIC_MODE)
        return {"file": f"hero/{path.name}", "path": str(path), "filename": f"hero/{path.name}",
                "modules": len(state), "metadata": md_written, "sidecar": str(side)}

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
        if not any(session.marks_for(round_idx) is not None
                   for round_idx in range(session.round + 1)):
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
        family = _stored_lora(session, session.load_state(("lora",))).family
        name = f"hero_{session.session_id}_r{session.round:04d}.latent"
        path = Path(folder_paths.get_input_directory()) / name
        res = export_noise_latent(session, path, family, limit=int(limit))
    res["filename"] = name
    res["round"] = session.round
    return res
