"""The session's LoRA on a ComfyUI MODEL: ComfyUI weight wrappers for training (DESIGN.md
decision 4, guide 2.3 "variant B") and plain patches (LoraLoader's path) for sampling.

The LoRA is a ``hero_engine.lora.LoraState`` (module names = LDM names without
``diffusion_model.``, the family's kohya names, fp32), the one form the session stores."""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch

from ..hero_engine.lora import LoraFormatError, LoraModule, LoraState, read_session_lora
from ..hero_engine.session import Session
from .host_models import DM, HeroHostError, _module, base_model_name, kohya_names, model_family


def initial_lora(model, names: list[str], rank: int, alpha: float, seed: int,
                 family: Optional[str] = None) -> LoraState:
    """Round-0 LoRA: down ~ N(0, 1/r^2) (peft's 'gaussian' init), up = 0 (so delta W = 0), named
    for ``model`` (``family``: the model's, checked here when not given)."""
    family = family or model_family(model)
    shapes = OrderedDict((n, tuple(_module(model, n).weight.shape)) for n in names)
    return LoraState.init(shapes, rank=rank, alpha=alpha, family=family,
                          kohya_names=kohya_names(model, family, names),
                          seed=int(seed) * 7 + 12345, base_model=base_model_name(model))


def session_lora(session: Session, model, names: list[str], state: Optional[dict] = None,
                 family: Optional[str] = None) -> LoraState:
    """The session's current LoRA, checked against ``model`` (or the round-0 init).
    ``state``: the session's learned state if the caller has loaded it (else it is read here);
    ``family``: the model's, if the caller has checked it."""
    config = session.config
    st = session.load_state(("lora",)) if state is None else state
    tensors = st.get("lora")
    family = family or model_family(model)
    if tensors is None:
        return initial_lora(model, names, config.lora_rank, config.lora_alpha, config.seed, family)
    have = {k.rsplit(".", 1)[0] for k in tensors if k.endswith((".down", ".up"))}
    if have != set(names):
        extra, missing = sorted(have - set(names)), sorted(set(names) - have)
        raise HeroHostError(
            f"session '{session.session_id}' holds a LoRA for a different model ("
            f"{len(have)} modules; {len(missing)} of this model's attention layers are missing, "
            f"e.g. {missing[:2]}; {len(extra)} unknown, e.g. {extra[:2]}). Use the checkpoint the "
            f"session was started with, or a new session_id.")
    try:  # a session from before the LoRA kept its names: named from this model, as then
        lora = read_session_lora(tensors, family=family, kohya_names=kohya_names(model, family, names),
                                 base_model=base_model_name(model))
    except LoraFormatError as e:
        raise HeroHostError(f"session '{session.session_id}': {e}") from None
    for n in names:
        w = _module(model, n).weight
        d, u = lora[n].down, lora[n].up
        if d.shape[1] != w.shape[1] or u.shape[0] != w.shape[0]:
            raise HeroHostError(
                f"session '{session.session_id}': LoRA module {n} has shape up {tuple(u.shape)} / "
                f"down {tuple(d.shape)} but the model's weight is {tuple(w.shape)}; use the "
                f"checkpoint the session was started with, or a new session_id.")
    return lora


def trained_lora(lora: LoraState, params: dict) -> LoraState:
    """``lora`` with the trained down/up of ``attach_lora``'s parameters (fp32 copies on the CPU);
    alpha as the session has always stored it (fp32)."""
    mods = OrderedDict()
    for n, m in lora.items():
        alpha = float(torch.tensor(m.alpha, dtype=torch.float32))
        mods[n] = LoraModule(params[f"{n}.down"].detach().cpu().float().clone(),
                             params[f"{n}.up"].detach().cpu().float().clone(), alpha)
    return LoraState(mods, lora.family, lora.rank, dict(lora.kohya_names), lora.base_model)


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


def attach_lora(model, lora: LoraState, trainable: bool, copy_others: bool):
    """``model.clone()`` with the LoRA as weight wrappers -> (patcher, {param name: Parameter}),
    the parameters named ``<module>.down`` / ``<module>.up``. With ``trainable`` they are fp32
    leaves requiring grad; with ``copy_others`` every other weight/bias gets an identity copy
    wrapper (needed for backward, guide 2.3)."""
    mp = model.clone()
    dev = mp.load_device
    params = {}
    names = list(lora)
    for n, m in lora.items():
        down = m.down.detach().to(dev, torch.float32).clone()
        up = m.up.detach().to(dev, torch.float32).clone()
        wr = LoraWeightWrapper(down, up, m.alpha / down.shape[0], trainable)
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


def kohya_tensors(lora: LoraState) -> dict:
    """The LoRA as an in-memory kohya LoRA dict (what export_kohya writes, fp32)."""
    out = {}
    for n, m in lora.items():
        k = lora.kohya(n)
        out[f"{k}.lora_down.weight"] = m.down.float()
        out[f"{k}.lora_up.weight"] = m.up.float()
        out[f"{k}.alpha"] = torch.tensor(float(m.alpha))
    return out


def patched_model(model, lora: LoraState, strength: float = 1.0):
    """A fresh ``model.clone()`` with the LoRA as plain patches (LoraLoader's path), usable by any
    sampler. Every module must match a model key."""
    import comfy.lora
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    patches = comfy.lora.load_lora(kohya_tensors(lora), key_map)
    if len(patches) != len(lora):
        raise HeroHostError(f"only {len(patches)} of {len(lora)} LoRA modules matched the model "
                            f"(kohya names); this is a bug, please report it")
    m = model.clone()
    m.add_patches(patches, float(strength))
    return m
