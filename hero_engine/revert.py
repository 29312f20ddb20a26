"""Mark-checked updates (not in HERO): the person's next marks judge the last LoRA update.

Round k's batch is drawn by the LoRA the last update made; the batch it is compared with was drawn
by the LoRA that update started from, theta_a (the *anchor*). If the share of images marked good
fell significantly (a one-sided two-proportion z-test on the marked counts),

    z = (g_a - g_k) / sqrt(p (1 - p) (1 / n_a + 1 / n_k)),   p = (G_a + G_k) / (n_a + n_k),
    z > revert_z,

the last update is judged harmful: this round's update starts again from theta_a and its optimizer
state, with the learning rate multiplied by ``revert_damping`` once more (lr * damping^reverts).
Otherwise the update starts from the LoRA that drew this batch, which becomes the anchor.

Why: an update that over-trains a small marked set can lower the share of good images it draws
(docs/benchmarks.md, "What the instability is and is not"). The marks are already paid for;
reading them as a check on the update costs no mark and no compute. ``revert_z = 0`` turns it off.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

from .feedback import Marks

__all__ = ["UpdateStart", "update_start", "drop_z"]


@dataclasses.dataclass
class UpdateStart:
    """Where this round's update starts: the LoRA tensors and optimizer state (``None``: the
    initial LoRA / a fresh optimizer), the learning-rate factor, and the anchor to store."""
    lora: Any
    policy_opt: Optional[dict]
    reverted: bool
    lr_scale: float
    anchor: Optional[dict]       # {"lora", "policy_opt", "good", "marked"}; stored with the state
    metrics: dict


def drop_z(good_a: int, n_a: int, good_k: int, n_k: int) -> float:
    """z of the fall from g_a = good_a / n_a to g_k = good_k / n_k (positive: g_k is lower)."""
    if n_a <= 0 or n_k <= 0:
        return 0.0
    p = (good_a + good_k) / (n_a + n_k)
    var = p * (1 - p) * (1 / n_a + 1 / n_k)
    if var <= 0:
        return 0.0
    return (good_a / n_a - good_k / n_k) / math.sqrt(var)


def update_start(config, state: dict, marks: Marks, history: list[dict]) -> UpdateStart:
    """Decide where this round's update starts (module docstring). ``state``: the session's
    learned state before the update (its "lora", "policy_opt" and "anchor", any may be absent);
    ``marks``: this round's marks; ``history``: the completed rounds' metrics."""
    lora, opt = state.get("lora"), state.get("policy_opt")
    good, marked = len(marks.good), marks.num_marked
    reverts = sum(1 for h in history if h.get("reverted"))
    anchor = state.get("anchor")
    z = None
    if config.revert_z > 0 and anchor is not None:
        z = drop_z(anchor["good"], anchor["marked"], good, marked)
    reverted = z is not None and z > config.revert_z
    if reverted:
        reverts += 1
        lora, opt = anchor["lora"], anchor["policy_opt"]
    else:
        anchor = {"lora": lora, "policy_opt": opt, "good": good, "marked": marked}
    if config.revert_z <= 0:
        anchor, reverts = None, 0
    scale = config.revert_damping ** reverts
    metrics = {"reverted": reverted, "lr_scale": scale}
    if z is not None:
        metrics["revert_z"] = z
    return UpdateStart(lora, opt, reverted, scale, anchor, metrics)
