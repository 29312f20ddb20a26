"""The embedded toy domain: procedural shape images, a tiny text-conditioned pixel diffusion model,
and four HERO tasks with simulated evaluators (see docs/toy.md)."""
from .model import ToyModel, load_toy_model
from .tasks import TASKS, ToyTask

__all__ = ["ToyModel", "load_toy_model", "TASKS", "ToyTask"]
