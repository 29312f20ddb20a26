"""Memory modes of the LoRA update (not in HERO; what lets a 64-image round train on an 8-12 GB
card). The settings live in ``policy.PolicyConfig``; none changes what is learned:

- ``micro_batch``: images per backward pass. Every AdamW step still averages
  ``n_step = train_batch_size x grad_accum`` images; with micro-batch b the step accumulates
  n_step / b passes. 0 (auto) sizes b from the free accelerator memory:

      b = max { b' | b' divides n_step, fixed + b' x per_image <= headroom x free }

  with ``fixed`` and ``per_image`` measured by two probe passes (1 and 2 images) whose
  gradients are discarded. On a CPU (no free-memory figure) auto keeps ``train_batch_size``.
- ``chains_on="cpu"``: the round's denoising chains stay in host memory in the fp16 they are
  stored in; each micro-batch's transitions move to the device when they are used. fp16 -> fp32
  is exact, so the PPO ratio is still exactly 1 before the first step.
- ``gradient_checkpointing``: the backend recomputes the UNet's blocks in the backward pass
  (diffusers' ``enable_gradient_checkpointing``, ComfyUI's ``nodes_train.patch``).
- ``mixed_precision``: autocast (fp16/bf16) around the UNet; the LoRA weights stay fp32.
- ``release_models`` (the ComfyUI adapter): every other model ComfyUI holds on the card (the VAE,
  the text encoders) is unloaded before the update, as ``comfy_extras/nodes_train.py`` does; they
  load again for the next HERO Generate. The diffusers backend gets its encoders as callables and
  leaves them to its caller.

These are the settings of the machine, not of the method: ``with_memory_settings`` sets them on
an existing session's config (the HERO Session node applies its widgets this way every run), and
they are never reported as a changed setting of an existing session.

An out-of-memory error during the update restores the LoRA and optimizer as they were and becomes
``UpdateOutOfMemory``, whose message names each setting to change and what it would save.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

import torch

__all__ = ["MemoryProbe", "UpdateOutOfMemory", "choose_micro_batch", "probe_cuda",
           "resolve_micro_batch", "oom_advice", "is_oom", "GiB", "MEMORY_SETTINGS",
           "with_memory_settings"]

# the PolicyConfig fields that say how the update fits the machine (none changes what is learned)
MEMORY_SETTINGS = ("micro_batch", "gradient_checkpointing", "chains_on", "mixed_precision",
                   "release_models")

GiB = float(1 << 30)
HEADROOM = 0.85   # share of the free memory the update may plan to use (allocator slack)


class UpdateOutOfMemory(RuntimeError):
    """The update ran out of accelerator memory; the previous LoRA and optimizer were kept."""


@dataclass
class MemoryProbe:
    """What one probe measured: bytes for the model's fixed part of a pass and per image."""
    fixed: float
    per_image: float
    free: float


def with_memory_settings(config, **values):
    """``config`` (a HeroConfig) with the given memory settings of its policy replaced (``None``
    keeps a setting), validated. Unknown names raise ``ValueError``."""
    unknown = sorted(set(values) - set(MEMORY_SETTINGS))
    if unknown:
        raise ValueError(f"not a memory setting: {', '.join(unknown)} (memory settings: "
                         f"{', '.join(MEMORY_SETTINGS)})")
    change = {k: v for k, v in values.items() if v is not None}
    if not change:
        return config
    policy = dataclasses.replace(config.policy, **change).validate()
    return dataclasses.replace(config, policy=policy)


def is_oom(e: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(e, oom) or (isinstance(e, RuntimeError) and "out of memory" in str(e))


def choose_micro_batch(n_step: int, probe: Optional[MemoryProbe], fallback: int) -> int:
    """The largest divisor b of ``n_step`` with ``fixed + b * per_image <= HEADROOM * free``
    (at least 1); ``fallback`` (capped to a divisor of ``n_step``) without a probe."""
    divisors = [b for b in range(1, n_step + 1) if n_step % b == 0]
    if probe is None:
        return max(b for b in divisors if b <= max(1, fallback))
    fits = [b for b in divisors if probe.fixed + b * probe.per_image <= HEADROOM * probe.free]
    return max(fits) if fits else 1


def probe_cuda(device: torch.device, run: Callable[[int], None]) -> Optional[MemoryProbe]:
    """Peak memory of ``run(1)`` and ``run(2)`` (each a forward + backward of that many images)
    above what is allocated now -> the fixed and per-image parts, and the free memory (the
    driver's free plus what torch's cache holds unused). ``None`` off CUDA."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    peaks = []
    for b in (1, 2):
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run(b)
        torch.cuda.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device) - base)
    per = max(0.0, float(peaks[1] - peaks[0]))
    fixed = max(0.0, float(peaks[0]) - per)
    free_driver, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return MemoryProbe(fixed, per, float(free_driver + cached))


def resolve_micro_batch(config, device, run: Optional[Callable[[int], None]] = None):
    """``config`` (a PolicyConfig) with ``train_batch_size`` = the micro-batch to use and
    ``grad_accum`` = the passes per AdamW step, the images per step unchanged -> (config,
    probe or None). ``run(b)``: a probe pass of b images (used only when ``micro_batch`` is 0
    on CUDA)."""
    n_step = max(1, config.train_batch_size * config.grad_accum)
    probe = None
    if config.micro_batch > 0:
        b = choose_micro_batch(n_step, None, config.micro_batch)
    else:
        if run is not None:
            probe = probe_cuda(torch.device(device), run)
        b = choose_micro_batch(n_step, probe, config.train_batch_size)
    if b == config.train_batch_size:
        return config, probe
    return dataclasses.replace(config, train_batch_size=b, grad_accum=n_step // b), probe


def oom_advice(config, micro_batch: int, chain_bytes: float, probe: Optional[MemoryProbe]) -> str:
    """The settings that would have fit, each with what it saves (estimates from the probe:
    halving the micro-batch saves half its activations; checkpointing keeps about a third)."""
    tips = []
    act = None if probe is None else probe.per_image * micro_batch
    if micro_batch > 1:
        save = "" if act is None else f" (saves about {act / 2 / GiB:.1f} GiB)"
        tips.append(f"policy.micro_batch {max(1, micro_batch // 2)} (now {micro_batch}){save}")
    if not config.gradient_checkpointing:
        save = "" if act is None else f" (saves about {act * 2 / 3 / GiB:.1f} GiB)"
        tips.append(f"policy.gradient_checkpointing true{save}; the update then takes about 1.3-1.6x longer")
    if config.chains_on != "cpu" and chain_bytes > 0:
        tips.append(f"policy.chains_on \"cpu\" (saves {chain_bytes / GiB:.2f} GiB)")
    if not config.release_models:
        tips.append("policy.release_models true (frees the VAE's and text encoders' memory)")
    if config.mixed_precision == "no":
        tips.append("policy.mixed_precision \"fp16\" or \"bf16\" (about halves the activations)")
    return "; ".join(tips) if tips else "a smaller image size or batch"
