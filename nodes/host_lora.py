"""The session's LoRA on a ComfyUI MODEL: ComfyUI weight wrappers for training (DESIGN.md
decision 4, guide 2.3 "variant B") and plain patches (LoraLoader's path) for sampling."""
from __future__ import annotations

from typing import Optional

import torch

from ..hero_engine.lora import LoraModule, LoraState
from ..hero_engine.session import Session
from .host_models import DM, HeroHostError, _module, kohya_names


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


def session_lora(session: Session, model, names: list[str], state: Optional[dict] = None) -> dict:
    """The session's current LoRA tensors, checked against ``model`` (or the round-0 init).
    ``state``: the session's learned state if the caller has loaded it (else it is read here)."""
    cfg = session.config
    st = session.load_state(("lora",)) if state is None else state
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

