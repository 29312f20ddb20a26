"""HERO (Hiranaka et al., ICLR 2025): online human-feedback RL for diffusion models.

One module per mechanism: ``sampling`` (DDIM log-probs), ``guidance`` (feedback-guided noise),
``representation`` (triplet embedding), ``reward``, ``extra_samples`` (unmarked samples the
representation scores), ``policy`` (PPO / D3PO), ``denoising`` (reward-weighted denoising, `hero`'s
update), ``memory`` (how the update fits the card), ``feedback`` (the marks contract), ``session``
(durable state; ``fileio``, ``locks`` and ``repair`` keep it safe), ``lora`` (the LoRA and its
export), ``publish`` (the exported files' cards), ``backends`` (a diffusers UNet), ``loop`` (one
round), ``toy`` (the embedded toy model). Around it, never imported by it: ``harness``
(``experiment``, ``evaluator``, ``bench``, ``cli``, ``plots``: the demo and the benchmark). Imports
no ComfyUI.
"""
__version__ = "0.1.0"
