"""The embedded toy domain: procedural shape images, a tiny text-conditioned pixel diffusion model,
and four HERO tasks with simulated evaluators (see docs/toy.md)."""
from ..lora import register_family
from .model import ToyModel, load_toy_model
from .tasks import TASKS, ToyTask

__all__ = ["ToyModel", "load_toy_model", "TASKS", "ToyTask"]

# the toy's LoRA files: diffusers module names, metadata that names the toy (not an SD family)
register_family("toy", base_model_version="toy", architecture="hero-toy/lora",
                implementation="diffusers", resolution=None, naming="diffusers")
