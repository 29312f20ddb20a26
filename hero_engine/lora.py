"""LoRA state shared by the ComfyUI path and the diffusers/peft path; kohya safetensors export/import.

Every LoRA module patches one weight W [out, in] (or a conv W [out, in, kh, kw]):

    W' = W + (alpha / r) * up @ down          down [r, in], up [out, r], fp32 in the session

A ``LoraState`` (module names, kohya names, family, fp32 tensors) is the one representation: the
session stores it (``to_tensors()``, read back by ``read_session_lora``, which also reads the
formats older sessions stored), the ComfyUI adapter (``nodes/host_lora.py``) and the diffusers/peft
side (``state_from_peft``, ``load_state_into_peft``) read and write it, and ``export_kohya`` writes
it. This module imports no ComfyUI code (DESIGN.md decision 4); the ComfyUI adapter names the
modules itself (``nodes/host_models.py``). Files are written in the kohya layout with the family's
native names (decision 5): SD1.5 ``lora_unet_`` + diffusers name, SDXL ``lora_unet_`` + LDM/SGM
name, dots -> underscores; ``.lora_down.weight`` [r, in], ``.lora_up.weight`` [out, r], ``.alpha``
(0-dim, the trained alpha so alpha/r is preserved). The families are SD1.5 and SDXL; another
model family (the embedded toy, ``hero_engine.toy``) adds itself with ``register_family``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch

from .fileio import PUBLIC_MODE, atomic_write_bytes

__all__ = [
    "FAMILIES",
    "data_sha256",
    "safetensors_hashes",
    "DEFAULT_TARGETS",
    "LoraFormatError",
    "LoraModule",
    "LoraState",
    "kohya_prefix",
    "decode_kohya_prefix",
    "diffusers_to_ldm",
    "kohya_name",
    "ldm_naming",
    "register_family",
    "families",
    "add_lora",
    "lora_layers",
    "state_from_peft",
    "load_state_into_peft",
    "read_session_lora",
    "session_tensors",
    "export_kohya",
    "load_kohya",
    "atomic_write_bytes",
]

FAMILIES = ("sd15", "sdxl")  # the Stable Diffusion families of the LoRA file format
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
KOHYA_UNET = "lora_unet_"
_HEADER_KEY = "__hero_lora_header__"

# family -> (ss_base_model_version, modelspec.architecture, modelspec.implementation, resolution,
#            the naming of its kohya keys: "diffusers" or "ldm" module names)
_FAMILY_META = {
    "sd15": ("sd_v1", "stable-diffusion-v1/lora", "diffusers", "512x512", "diffusers"),
    "sdxl": ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora",
             "https://github.com/Stability-AI/generative-models", "1024x1024", "ldm"),
}


def register_family(name: str, base_model_version: str, architecture: str,
                    implementation: str = "diffusers", resolution: str | None = None,
                    naming: str = "diffusers") -> None:
    """Add a model family beyond SD1.5 / SDXL (the toy package adds ``"toy"``): what its files'
    ``ss_base_model_version`` / ``modelspec.*`` metadata say, and whether its kohya keys use the
    diffusers or the LDM module names. Registering the same family again with the same values is
    a no-op."""
    if naming not in ("diffusers", "ldm"):
        raise ValueError(f"naming must be 'diffusers' or 'ldm', got {naming!r}")
    meta = (base_model_version, architecture, implementation, resolution, naming)
    if _FAMILY_META.get(name, meta) != meta:
        raise ValueError(f"LoRA family {name!r} is already registered as {_FAMILY_META[name]}")
    _FAMILY_META[name] = meta


def families() -> tuple:
    """Every family a LoraState may have: SD1.5, SDXL and the registered ones."""
    return tuple(_FAMILY_META)


def data_sha256(blob: bytes) -> str:
    """SHA-256 (hex) of a safetensors file's tensor data: everything after the 8-byte header
    length and the JSON header. Editing the metadata does not change it."""
    n = int.from_bytes(blob[:8], "little")
    return hashlib.sha256(blob[8 + n:]).hexdigest()


def safetensors_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
                       ) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as kohya sd-scripts precomputes them: the file is
    serialised with only the ``ss_*`` metadata (the training metadata, meant to stay fixed),
    then model hash = SHA-256 of the bytes after the header, legacy hash = SHA-256 of the
    0x10000 bytes at offset 0x100000, first 8 hex digits."""
    from safetensors.torch import save as st_save
    ss = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    blob = st_save(dict(tensors), ss)
    legacy = hashlib.sha256(blob[0x100000:0x100000 + 0x10000]).hexdigest()[:8]
    return data_sha256(blob), legacy


class LoraFormatError(ValueError):
    """A LoRA file or state that cannot be read or applied; the message names the file and the problem."""


# --------------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------------


@dataclass
class LoraModule:
    """One LoRA pair: delta W = alpha / r * up @ down, down [r, in(,kh,kw)], up [out, r(,1,1)], fp32."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    def __post_init__(self):
        self.alpha = float(self.alpha)
        if self.down.shape[0] != self.up.shape[1]:
            raise LoraFormatError(
                f"rank mismatch: lora_down has rank {self.down.shape[0]} (shape {tuple(self.down.shape)}) "
                f"but lora_up has rank {self.up.shape[1]} (shape {tuple(self.up.shape)})")

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """alpha / r, the factor in W' = W + alpha/r * up @ down."""
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """alpha/r * up @ down, shaped like the patched weight ([out, in] or [out, in, kh, kw])."""
        d = self.up.flatten(1) @ self.down.flatten(1)
        if self.down.dim() == 4:
            d = d.reshape(self.up.shape[0], *self.down.shape[1:])
        return d * self.scale


@dataclass
class LoraState:
    """Ordered ``module_name -> LoraModule`` in the backend's own naming, plus the family, the rank and
    ``kohya_names`` (module_name -> kohya prefix such as ``lora_unet_down_blocks_0_..._to_q``)."""

    modules: "OrderedDict[str, LoraModule]" = field(default_factory=OrderedDict)
    family: str = "sd15"
    rank: int = 4
    kohya_names: dict = field(default_factory=dict)
    base_model: str = ""   # the model the names belong to (ComfyUI: its model config's class)

    def __post_init__(self):
        _check_family(self.family)
        self.modules = OrderedDict(self.modules)
        self.rank = int(self.rank)
        for n, m in self.modules.items():
            if m.rank != self.rank:
                raise LoraFormatError(f"module {n!r} has rank {m.rank}, the state has rank {self.rank}")

    @classmethod
    def init(cls, shapes: Mapping[str, tuple], rank: int = 4, alpha: float = 4.0, family: str = "sd15",
             kohya_names: Mapping[str, str] | None = None, seed: int | None = None,
             base_model: str = "") -> "LoraState":
        """A fresh HERO LoRA: for each ``name -> (out, in)`` (the patched weight's shape), down ~ N(0, (1/r)^2),
        up = 0, so W' = W + alpha/r * up @ down = W at the start. Used by the ComfyUI side, which
        owns no peft model."""
        gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        st = cls(family=family, rank=rank, base_model=base_model)
        for name, shape in shapes.items():
            out_f, in_f = int(shape[0]), int(shape[1])
            down = torch.randn(rank, in_f, generator=gen) / rank
            st.add(name, LoraModule(down, torch.zeros(out_f, rank), alpha),
                   (kohya_names or {}).get(name))
        return st

    # mapping-ish helpers
    def __len__(self) -> int:
        return len(self.modules)

    def __iter__(self):
        return iter(self.modules)

    def __contains__(self, name) -> bool:
        return name in self.modules

    def __getitem__(self, name) -> LoraModule:
        return self.modules[name]

    def items(self):
        return self.modules.items()

    def add(self, name: str, module: LoraModule, kohya: str | None = None) -> None:
        if module.rank != self.rank:
            raise LoraFormatError(f"module {name!r} has rank {module.rank}, the state has rank {self.rank}")
        self.modules[name] = module
        self.kohya_names[name] = kohya or kohya_prefix(name)

    def kohya(self, name: str) -> str:
        """The kohya prefix of ``name`` (defaults to ``lora_unet_`` + name with dots -> underscores)."""
        return self.kohya_names.get(name) or kohya_prefix(name)

    def delta(self, name: str) -> torch.Tensor:
        """alpha/r * up @ down for module ``name``."""
        return self.modules[name].delta()

    @property
    def alpha(self) -> float:
        """The common alpha (the first module's if they differ; every HERO state has one alpha)."""
        return next(iter(self.modules.values())).alpha if self.modules else float(self.rank)

    # what the session stores (fp32, exact)
    def to_tensors(self) -> dict:
        """The session's form of the state (its ``lora.pt``): ``<name>.down``, ``<name>.up`` (fp32
        copies), ``<name>.alpha`` (0-dim fp64, so any float alpha survives exactly) and
        ``__hero_lora_header__`` (uint8 JSON of ``header()``: names, order, family, rank, kohya
        names, base model), so the dict alone rebuilds the state (``from_tensors``) and every value
        is a tensor (a safetensors file can hold it)."""
        out = {}
        for name, m in self.modules.items():
            out[f"{name}.down"] = m.down.detach().to("cpu", torch.float32).clone().contiguous()
            out[f"{name}.up"] = m.up.detach().to("cpu", torch.float32).clone().contiguous()
            out[f"{name}.alpha"] = torch.tensor(m.alpha, dtype=torch.float64)
        raw = json.dumps(self.header()).encode("utf-8")
        out[_HEADER_KEY] = torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone()
        return out

    def header(self) -> dict:
        """String metadata that, with the tensors of ``to_tensors()``, rebuilds this state exactly."""
        return {
            "hero_lora_format": "hero-lora-state/1",
            "hero_lora_family": self.family,
            "hero_lora_rank": str(self.rank),
            "hero_lora_modules": json.dumps(list(self.modules)),
            "hero_lora_kohya_names": json.dumps({n: self.kohya(n) for n in self.modules}),
            "hero_lora_base_model": self.base_model,
        }

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], header: Mapping[str, str] | None = None
                     ) -> "LoraState":
        """Inverse of ``to_tensors()`` (``header`` defaults to the embedded ``__hero_lora_header__``)."""
        try:
            if header is None or "hero_lora_modules" not in header:
                if _HEADER_KEY not in tensors:
                    raise KeyError(_HEADER_KEY)
                header = json.loads(bytes(tensors[_HEADER_KEY].to(torch.uint8).tolist()).decode("utf-8"))
            names = json.loads(header["hero_lora_modules"])
            kohya = json.loads(header.get("hero_lora_kohya_names", "{}"))
            family = header["hero_lora_family"]
            rank = int(header["hero_lora_rank"])
        except (KeyError, ValueError) as e:
            raise LoraFormatError(f"LoRA state header is missing or malformed ({e!r})") from e
        modules = OrderedDict()
        for n in names:
            try:
                modules[n] = LoraModule(tensors[f"{n}.down"].to(torch.float32),
                                        tensors[f"{n}.up"].to(torch.float32),
                                        float(tensors[f"{n}.alpha"].item()))
            except KeyError as e:
                raise LoraFormatError(f"LoRA state has no tensor {e.args[0]!r} for module {n!r}") from e
        st = cls(modules, family, rank, {n: kohya.get(n) or kohya_prefix(n) for n in names},
                 header.get("hero_lora_base_model", ""))
        for n, m in st.modules.items():
            if m.rank != rank:
                raise LoraFormatError(f"module {n!r} has rank {m.rank}, the state header says {rank}")
        return st


# --------------------------------------------------------------------------------------------------
# The session's form (``lora.pt``), and the formats older sessions stored
# --------------------------------------------------------------------------------------------------

_PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.(?P<adapter>[^.]+)\.weight$")


def session_tensors(lora: "LoraState | Mapping[str, torch.Tensor]") -> dict:
    """What a session stores for ``lora`` (a LoraState, or its ``to_tensors()`` form): fp32 copies
    with the header, checked (``LoraState.from_tensors``)."""
    state = lora if isinstance(lora, LoraState) else LoraState.from_tensors(lora)
    return state.to_tensors()


def read_session_lora(tensors: Mapping[str, torch.Tensor], family: str | None = None,
                      kohya_names: Mapping[str, str] | None = None, base_model: str = "",
                      alpha: float | None = None) -> LoraState:
    """A session's stored LoRA -> LoraState. The current form is ``LoraState.to_tensors()`` (its
    header names the family, the kohya names and the order). Sessions written before it stored
    one of two header-less forms, read with what the caller knows about them:

    * the ComfyUI adapter's ``{<ldm module>.down|up|alpha}``, the family and kohya names kept in
      ``session.json`` (``info.lora_layout``: pass its ``family``, ``kohya`` and ``model``);
    * the diffusers backend's peft parameters ``{<module>.lora_A|lora_B.<adapter>.weight}`` (no
      alpha: pass the backend's ``alpha``, and its ``family``); kohya names follow the family.

    ``family`` / ``kohya_names`` / ``base_model`` are only used for those older forms."""
    if _HEADER_KEY in tensors:
        return LoraState.from_tensors(tensors)
    if not tensors:
        raise LoraFormatError("the session's LoRA holds no tensors")
    if family is None:
        raise LoraFormatError("the session's LoRA was stored without its model family (a session "
                              "from an older ComfyUI-HERO, and the family is not recorded)")
    modules = OrderedDict()
    if all(_PEFT_KEY.match(k) for k in tensors):
        if alpha is None:
            raise LoraFormatError("the session's LoRA (peft parameters) was stored without alpha")
        pairs: "OrderedDict[str, dict]" = OrderedDict()
        for k, v in tensors.items():
            m = _PEFT_KEY.match(k)
            pairs.setdefault(m.group("module"), {})[m.group("ab")] = v
        for name, ab in pairs.items():
            if set(ab) != {"A", "B"}:
                raise LoraFormatError(f"the session's LoRA module {name!r} has no lora_A/lora_B pair")
            modules[name] = LoraModule(ab["A"].float(), ab["B"].float(), alpha)
        kohya = {n: kohya_name(n, family) for n in modules}
    else:
        for k in tensors:
            name, _, part = k.rpartition(".")
            if part not in ("down", "up", "alpha") or not name:
                raise LoraFormatError(f"the session's LoRA has an unknown key {k!r}")
            modules.setdefault(name, None)
        for name in modules:
            try:
                down, up = tensors[f"{name}.down"].float(), tensors[f"{name}.up"].float()
            except KeyError as e:
                raise LoraFormatError(f"the session's LoRA has no tensor {e.args[0]!r}") from None
            a = tensors.get(f"{name}.alpha")
            modules[name] = LoraModule(down, up, float(a) if a is not None else float(down.shape[0]))
        unnamed = [n for n in modules if n not in (kohya_names or {})]
        if unnamed:
            raise LoraFormatError(f"the session's recorded model layout does not name "
                                  f"{len(unnamed)} of its LoRA modules, e.g. {unnamed[:2]}")
        kohya = {n: kohya_names[n] for n in modules}
    rank = next(iter(modules.values())).rank
    return LoraState(modules, family, rank, kohya, base_model or "")


# --------------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------------


def kohya_prefix(module_name: str) -> str:
    """``lora_unet_`` + module name with dots -> underscores."""
    return KOHYA_UNET + module_name.replace(".", "_")


# compound words of UNet module names that contain "_" (longest first); everything else splits at "_"
_COMPOUNDS = sorted({
    "down_blocks", "up_blocks", "mid_block", "input_blocks", "middle_block", "output_blocks",
    "transformer_blocks", "to_q", "to_k", "to_v", "to_out", "proj_in", "proj_out", "time_embedding",
    "time_embed", "time_emb_proj", "conv_in", "conv_out", "conv_norm_out", "conv_shortcut", "linear_1",
    "linear_2", "add_embedding", "label_emb", "in_layers", "emb_layers", "out_layers", "skip_connection",
    "norm_out", "add_k_proj", "add_v_proj", "add_q_proj", "to_add_out", "ff_norm", "norm_cross",
    "class_embedding", "encoder_hid_proj",
}, key=len, reverse=True)
_COMPOUND_RE = re.compile(r"(?:^|(?<=_))(" + "|".join(map(re.escape, _COMPOUNDS)) + r")(?=_|$)")


def decode_kohya_prefix(prefix: str) -> str:
    """Best-effort inverse of ``kohya_prefix``: ``lora_unet_down_blocks_0_attentions_0_..._to_out_0``
    -> ``down_blocks.0.attentions.0....to_out.0`` (known compound words keep their underscores)."""
    body = prefix[len(KOHYA_UNET):] if prefix.startswith(KOHYA_UNET) else prefix
    protected = _COMPOUND_RE.sub(lambda m: m.group(1).replace("_", "\0"), body)
    return ".".join(p.replace("\0", "_") for p in protected.split("_"))


_DIFF_ATTN = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.attentions\.(\d+)\.(.+)$")
_DIFF_MID = re.compile(r"^mid_block\.attentions\.0\.(.+)$")
_LDM_ATTN = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.1\.(.+)$")
_LDM_MID = re.compile(r"^middle_block\.1\.(.+)$")


def diffusers_to_ldm(name: str, layers_per_block: int = 2) -> str:
    """Diffusers -> LDM/SGM name for modules inside a UNet attention block (SD1.5 and SDXL layout):
    ``down_blocks.b.attentions.a.X`` -> ``input_blocks.{1+b*(L+1)+a}.1.X``,
    ``mid_block.attentions.0.X`` -> ``middle_block.1.X``,
    ``up_blocks.b.attentions.a.X`` -> ``output_blocks.{b*(L+1)+a}.1.X`` (L = layers_per_block).
    Only attention subtrees have identical inner names in both layouts; other names raise ValueError."""
    m = _DIFF_ATTN.match(name)
    if m:
        kind, b, a, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
        if kind == "down_blocks":
            return f"input_blocks.{1 + b * (layers_per_block + 1) + a}.1.{rest}"
        return f"output_blocks.{b * (layers_per_block + 1) + a}.1.{rest}"
    m = _DIFF_MID.match(name)
    if m:
        return f"middle_block.1.{m.group(1)}"
    raise ValueError(f"no LDM name for diffusers module {name!r} (only attention blocks are mapped)")


def kohya_name(diffusers_name: str, family: str, layers_per_block: int = 2) -> str:
    """Kohya prefix of a diffusers module name in the family's native naming
    (sd15: diffusers name; sdxl: LDM/SGM name)."""
    if ldm_naming(family):
        return kohya_prefix(diffusers_to_ldm(diffusers_name, layers_per_block))
    return kohya_prefix(diffusers_name)


def ldm_naming(family: str) -> bool:
    """Whether the family's kohya keys use the LDM/SGM module names (SDXL) rather than the
    diffusers ones (SD1.5)."""
    _check_family(family)
    return _FAMILY_META[family][4] == "ldm"


def _check_family(family: str) -> None:
    if family not in _FAMILY_META:
        raise LoraFormatError(f"unknown family {family!r}; expected one of {families()}")


# --------------------------------------------------------------------------------------------------
# peft side (diffusers models: the toy, standalone SD pipelines)
# --------------------------------------------------------------------------------------------------


def add_lora(unet, rank: int = 4, alpha: float = 4.0, targets=DEFAULT_TARGETS, init: str = "gaussian",
             adapter_name: str = "hero", seed: int | None = None) -> list:
    """Add a peft LoRA adapter to a diffusers model and return its trainable parameters.

    Effective weight W' = W + lora_alpha/r * lora_B @ lora_A (peft scaling = alpha / r).
    HERO init ``"gaussian"``: A ~ N(0, (1/r)^2) (std 1/r, what peft's ``init_lora_weights="gaussian"``
    does), B = 0, so the adapter starts as the identity. ``seed`` makes A reproducible (peft itself
    draws from the global RNG). ``init="default"`` is peft's kaiming-uniform A. Base weights are left
    as they are (freeze them with ``unet.requires_grad_(False)`` before calling, as trainers do)."""
    from peft import LoraConfig

    if init not in ("gaussian", "default"):
        raise ValueError(f"init must be 'gaussian' or 'default', got {init!r}")
    config = LoraConfig(r=int(rank), lora_alpha=float(alpha), target_modules=list(targets),
                        init_lora_weights="gaussian" if init == "gaussian" else True)
    unet.add_adapter(config, adapter_name=adapter_name)
    layers = lora_layers(unet, adapter_name)
    if not layers:
        raise ValueError(f"no module of the model matched the LoRA targets {tuple(targets)}")
    gen = None
    if seed is not None and init == "gaussian":
        gen = torch.Generator().manual_seed(int(seed))
    params = []
    for _, layer in layers.items():
        a = layer.lora_A[adapter_name].weight
        b = layer.lora_B[adapter_name].weight
        if gen is not None:
            with torch.no_grad():
                a.copy_(torch.randn(a.shape, generator=gen) / rank)
        a.requires_grad_(True)
        b.requires_grad_(True)
        params += [a, b]
    return params


def lora_layers(model, adapter_name: str = "hero") -> "OrderedDict[str, object]":
    """``module_name -> peft LoraLayer`` for every layer carrying ``adapter_name``, in module order."""
    from peft.tuners.lora import LoraLayer

    return OrderedDict((n, m) for n, m in model.named_modules()
                       if isinstance(m, LoraLayer) and adapter_name in m.lora_A)


def _layer_alpha(layer, adapter_name: str) -> float:
    """The alpha that reproduces peft's scaling: alpha / r == scaling."""
    r = layer.r[adapter_name]
    scaling = float(layer.scaling[adapter_name])
    alpha = float(layer.lora_alpha[adapter_name])
    return alpha if math.isclose(alpha / r, scaling, rel_tol=1e-9) else scaling * r


def state_from_peft(unet, family: str = "sd15", adapter_name: str = "hero") -> LoraState:
    """Copy the peft adapter into a LoraState (fp32, detached). Module names are the diffusers names
    (``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``); kohya names follow the family
    (sd15: diffusers name, sdxl: LDM name via ``diffusers_to_ldm``). alpha = peft lora_alpha."""
    _check_family(family)
    layers = lora_layers(unet, adapter_name)
    if not layers:
        raise ValueError(f"the model has no LoRA adapter named {adapter_name!r}")
    lpb = _layers_per_block(unet)
    modules = OrderedDict()
    kohya = {}
    rank = None
    for name, layer in layers.items():
        down = layer.lora_A[adapter_name].weight.detach().to("cpu", torch.float32).clone()
        up = layer.lora_B[adapter_name].weight.detach().to("cpu", torch.float32).clone()
        modules[name] = LoraModule(down, up, _layer_alpha(layer, adapter_name))
        kohya[name] = kohya_name(name, family, lpb)
        rank = modules[name].rank if rank is None else rank
        if modules[name].rank != rank:
            raise LoraFormatError(f"module {name!r} has rank {modules[name].rank}, others have {rank}")
    return LoraState(modules, family, rank, kohya)


def _layers_per_block(unet) -> int:
    unet_config = getattr(unet, "config", None)
    lpb = getattr(unet_config, "layers_per_block", 2) if unet_config is not None else 2
    return int(lpb[0] if isinstance(lpb, (list, tuple)) else lpb)


def load_state_into_peft(unet, state: LoraState, adapter_name: str = "hero") -> None:
    """Write ``state`` into the model's peft adapter (creating it on the state's modules if absent).
    Modules are matched by name, else by kohya name (so a state read from an SDXL file with LDM names
    fits a diffusers SDXL UNet). Sets peft's scaling to alpha/r per module. Every module of the state
    must find its layer and every layer of the adapter must get a module, else LoraFormatError."""
    layers = lora_layers(unet, adapter_name)
    lpb = _layers_per_block(unet)
    if not layers:
        # create the adapter exactly on the state's modules
        names = _match_names(unet_module_names(unet), state, lpb)
        add_lora(unet, state.rank, state.alpha, targets=list(names.values()), adapter_name=adapter_name)
        layers = lora_layers(unet, adapter_name)
    matched = _match_names(list(layers), state, lpb)
    missing_layers = [n for n in layers if n not in matched.values()]
    if missing_layers:
        raise LoraFormatError(f"{len(missing_layers)} LoRA layer(s) of adapter {adapter_name!r} have no module "
                              f"in the state, e.g. {missing_layers[:3]}")
    with torch.no_grad():
        for sname, lname in matched.items():
            m, layer = state[sname], layers[lname]
            a = layer.lora_A[adapter_name].weight
            b = layer.lora_B[adapter_name].weight
            if a.shape != m.down.shape or b.shape != m.up.shape:
                raise LoraFormatError(
                    f"module {sname!r}: state shapes down {tuple(m.down.shape)} / up {tuple(m.up.shape)} do not "
                    f"fit layer {lname!r} lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} (rank mismatch?)")
            a.copy_(m.down.to(a.device, a.dtype))
            b.copy_(m.up.to(b.device, b.dtype))
            layer.lora_alpha[adapter_name] = m.alpha
            layer.scaling[adapter_name] = m.alpha / layer.r[adapter_name]


def unet_module_names(model) -> list:
    return [n for n, _ in model.named_modules() if n]


def _match_names(candidates: list, state: LoraState, lpb: int) -> "OrderedDict[str, str]":
    """state module name -> candidate module name, by exact name, then by kohya name."""
    cset = set(candidates)
    by_kohya = {}
    for c in candidates:
        by_kohya.setdefault(kohya_prefix(c), c)
        if ldm_naming(state.family):
            try:
                by_kohya.setdefault(kohya_prefix(diffusers_to_ldm(c, lpb)), c)
            except ValueError:
                pass
    out = OrderedDict()
    unmatched = []
    for n in state:
        if n in cset:
            out[n] = n
        elif state.kohya(n) in by_kohya:
            out[n] = by_kohya[state.kohya(n)]
        else:
            unmatched.append(n)
    if unmatched:
        raise LoraFormatError(f"{len(unmatched)} LoRA module(s) of the state match no module of the model, "
                              f"e.g. {unmatched[:3]} (kohya {[state.kohya(n) for n in unmatched[:3]]})")
    return out


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def _meta_str(v) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v, ensure_ascii=False)
    return str(v)


def _fmt_alpha(a: float) -> str:
    return str(float(a))  # as sd-scripts writes it ("4.0")


def kohya_metadata(state: LoraState, metadata: Mapping | None = None, title: str | None = None) -> dict:
    """The safetensors ``__metadata__`` for a kohya export: ``ss_*`` + ``modelspec.*`` + the caller's
    keys (all values strings; lists/dicts as JSON). The caller may override descriptive keys (title,
    comment, usage hint, date...); the structural ones (network module/dim/alpha, base model,
    architecture, spec version) always describe ``state``."""
    _check_family(state.family)
    base, arch, impl, res, _ = _FAMILY_META[state.family]
    alphas = sorted({m.alpha for m in state.modules.values()})
    title = title or "hero_lora"
    md = {
        "ss_output_name": title,
        "ss_training_comment": "HERO: online human-feedback RL (ComfyUI-HERO); UNet-only LoRA on attention",
        "ss_v2": "False",
        "modelspec.implementation": impl,
        "modelspec.title": title,
        "modelspec.date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "modelspec.prediction_type": "epsilon",
        "modelspec.trigger_phrase": "",
        "modelspec.usage_hint": ("No trigger word: use with the prompt(s) it was trained on. "
                                 "Strength 1.0 as trained; 0.6-1.0 usable."),
    }
    if res:
        md["modelspec.resolution"] = res
    for k, v in (metadata or {}).items():
        md[str(k)] = _meta_str(v)
    md.update({
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(state.rank),
        "ss_network_alpha": _fmt_alpha(alphas[0]) if len(alphas) == 1 else json.dumps(alphas),
        "ss_base_model_version": base,
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": arch,
    })
    return md


def export_kohya(state: LoraState, path: str | os.PathLike, metadata: Mapping | None = None,
                 dtype: torch.dtype = torch.float16, mode: int | None = PUBLIC_MODE) -> dict:
    """Write ``state`` as a kohya LoRA safetensors file (atomic) and return the metadata written.

    The file gets ``sshs_model_hash`` / ``sshs_legacy_hash`` (computed as kohya sd-scripts does,
    ``safetensors_hashes`` above) and ``modelspec.hash_sha256`` (``0x`` + the
    SHA-256 of the tensor data, which metadata edits leave unchanged), and normal permissions
    (``mode & ~umask``, 0644 under umask 022; ``mode=None``: private 0600).

    Per module: ``<kohya>.lora_down.weight`` [r, in], ``<kohya>.lora_up.weight`` [out, r] in ``dtype``,
    ``<kohya>.alpha`` 0-dim fp32 = the trained alpha, so every loader applies
    W' = W + alpha/r * up @ down with the trained alpha/r."""
    from safetensors.torch import save as st_save

    if len(state) == 0:
        raise ValueError("refusing to export an empty LoRA state")
    tensors = {}
    for name, m in state.items():
        k = state.kohya(name)
        if not k.startswith(KOHYA_UNET):
            raise ValueError(f"kohya name {k!r} of module {name!r} does not start with {KOHYA_UNET!r}")
        if f"{k}.alpha" in tensors:
            raise ValueError(f"two modules map to the same kohya name {k!r}")
        down = m.down.detach().to("cpu", dtype).contiguous()
        up = m.up.detach().to("cpu", dtype).contiguous()
        if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
            raise ValueError(f"module {name!r} has non-finite weights in {dtype} "
                             f"(NaN, or overflow: export with dtype=torch.float32)")
        tensors[f"{k}.lora_down.weight"] = down
        tensors[f"{k}.lora_up.weight"] = up
        tensors[f"{k}.alpha"] = torch.tensor(float(m.alpha), dtype=torch.float32)
    title = os.path.splitext(os.path.basename(os.fspath(path)))[0]
    md = kohya_metadata(state, metadata, title=title)
    for k in ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256"):
        md.pop(k, None)  # never a caller's stale value
    model_hash, legacy_hash = safetensors_hashes(tensors, md)
    md["sshs_model_hash"] = model_hash
    md["sshs_legacy_hash"] = legacy_hash
    md["modelspec.hash_sha256"] = "0x" + model_hash
    atomic_write_bytes(path, st_save(tensors, metadata=md), mode=mode)
    return md


_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


def _read_safetensors(path: str):
    from safetensors import safe_open

    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such LoRA file")
    try:
        with safe_open(path, framework="pt") as f:
            md = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # SafetensorError, header errors, truncated files
        raise LoraFormatError(f"{path}: not a safetensors file ({type(e).__name__}: {e})") from e
    return tensors, md


def _family_from(path: str, md: Mapping[str, str], prefixes: Iterable[str]) -> str:
    by_base = {v[0]: k for k, v in _FAMILY_META.items()}
    by_arch = {v[1]: k for k, v in _FAMILY_META.items()}
    base = md.get("ss_base_model_version")
    if base is not None:
        if base in by_base:
            return by_base[base]
        raise LoraFormatError(f"{path}: unknown family: ss_base_model_version={base!r} "
                              f"(expected one of {sorted(by_base)})")
    arch = md.get("modelspec.architecture")
    if arch is not None:
        if arch in by_arch:
            return by_arch[arch]
        raise LoraFormatError(f"{path}: unknown family: modelspec.architecture={arch!r}")
    prefixes = list(prefixes)
    ldm = any(re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_", p) for p in prefixes)
    diff = any(re.match(r"lora_unet_(down_blocks|mid_block|up_blocks)_", p) for p in prefixes)
    if ldm and not diff:
        return "sdxl"
    if diff and not ldm:
        return "sd15"
    raise LoraFormatError(f"{path}: unknown family: no ss_base_model_version metadata and the key names "
                          f"do not tell (pass family=" + "|".join(repr(f) for f in families()) + ")")


def _natural_key(s: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", s)]


def load_kohya(path: str | os.PathLike, family: str | None = None):
    """Read a kohya LoRA file (UNet keys only) -> ``(LoraState, metadata)``; inverse of ``export_kohya``.

    Tensors come back as fp32; a module without ``.alpha`` gets alpha = r (scale 1, the kohya rule).
    Module names are decoded from the kohya prefixes in the family's native naming (sd15:
    diffusers, sdxl: LDM); ``kohya_names`` keeps the exact prefixes. Raises LoraFormatError naming
    the file for: not a safetensors file, foreign keys (text encoder, DoRA, LoHa...), a missing
    up/down pair, a rank mismatch, an unknown family."""
    path = os.fspath(path)
    tensors, md = _read_safetensors(path)
    if not tensors:
        raise LoraFormatError(f"{path}: the file holds no tensors")
    groups: "OrderedDict[str, dict]" = OrderedDict()
    for key in sorted(tensors, key=_natural_key):
        suf = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if suf is None or not key.startswith(KOHYA_UNET):
            what = ("text-encoder keys are not supported (HERO LoRAs are UNet-only)"
                    if key.startswith("lora_te") else
                    f"expected 'lora_unet_<module>' + one of {_SUFFIXES}")
            raise LoraFormatError(f"{path}: unsupported key {key!r}: {what}")
        groups.setdefault(key[: -len(suf)], {})[suf] = tensors[key]
    fam = family or _family_from(path, md, groups)
    _check_family(fam)
    modules = OrderedDict()
    kohya = {}
    rank = None
    for prefix, g in groups.items():
        if ".lora_down.weight" not in g or ".lora_up.weight" not in g:
            have = "lora_down" if ".lora_down.weight" in g else "lora_up" if ".lora_up.weight" in g else "alpha"
            raise LoraFormatError(f"{path}: module {prefix!r} has {have} but no matching "
                                  f"{'lora_up' if have == 'lora_down' else 'lora_down'} (missing up/down pair)")
        down = g[".lora_down.weight"].to(torch.float32)
        up = g[".lora_up.weight"].to(torch.float32)
        if down.dim() not in (2, 4) or up.dim() != down.dim() or down.shape[0] != up.shape[1]:
            raise LoraFormatError(f"{path}: rank mismatch in {prefix!r}: lora_down {tuple(down.shape)} vs "
                                  f"lora_up {tuple(up.shape)} (expected [r, in] and [out, r])")
        r = int(down.shape[0])
        if rank is None:
            rank = r
        elif r != rank:
            raise LoraFormatError(f"{path}: rank mismatch: module {prefix!r} has rank {r}, others rank {rank} "
                                  f"(a HERO LoRA state has one rank)")
        alpha = float(g[".alpha"].item()) if ".alpha" in g else float(r)
        name = decode_kohya_prefix(prefix)
        if name in modules:
            raise LoraFormatError(f"{path}: two keys decode to module {name!r}")
        modules[name] = LoraModule(down, up, alpha)
        kohya[name] = prefix
    dim = md.get("ss_network_dim")
    if dim is not None and dim.strip().isdigit() and int(dim) != rank:
        raise LoraFormatError(f"{path}: rank mismatch: ss_network_dim={dim} but the tensors have rank {rank}")
    return LoraState(modules, fam, rank, kohya), md
