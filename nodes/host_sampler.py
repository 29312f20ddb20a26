"""The sampler bridge: the engine runs inside ComfyUI's own ``CFGGuider`` through a custom
``comfy.samplers.Sampler`` (``_CallbackSampler``), which hands ``model_wrap`` to the engine as a
:class:`hero_engine.sampling.Denoiser`; conds cloning for backward, progress and interrupt, and
the update's memory modes (hero_engine/memory.py)."""
from __future__ import annotations

import contextlib

import torch

from .host_models import HeroHostError


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

