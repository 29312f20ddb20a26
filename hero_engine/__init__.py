"""HERO (Hiranaka et al., ICLR 2025): online human-feedback RL for diffusion models.

One module per mechanism: ``sampling`` (DDIM log-probs), ``guidance`` (feedback-guided noise),
``representation`` (triplet embedding), ``reward``, ``policy`` (PPO / D3PO), ``feedback`` (the marks
contract), ``session`` (durable state), ``lora`` (export), ``loop`` (one round). Imports no ComfyUI.
"""
__version__ = "0.1.0"
