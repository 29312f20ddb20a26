"""ComfyUI-HERO nodes: the ComfyExtension listing every node (V3 API) and the marks routes."""
from __future__ import annotations

import logging

from comfy_api.latest import ComfyExtension

log = logging.getLogger("HERO")

try:
    from . import routes  # noqa: F401  (registers /hero/* on the server as an import side effect)
except ImportError:
    routes = None
    log.exception("HERO: the marks API routes could not be registered")


def node_list() -> list:
    """Every HERO node, in the order ComfyUI lists them (ids in example_workflows/ and locales/)."""
    from .nodes import (HERO_ApplyLoRA, HERO_ExportLoRA, HERO_ExportNoise, HERO_ExportPreferences,
                        HERO_Generate, HERO_Session, HERO_Train)
    try:
        from .feedback import HERO_Feedback
    except ImportError:
        HERO_Feedback = None
        log.exception("HERO: the HERO_Feedback node could not be imported")
    return [n for n in (HERO_Session, HERO_Generate, HERO_Feedback, HERO_Train, HERO_ApplyLoRA,
                        HERO_ExportLoRA, HERO_ExportPreferences, HERO_ExportNoise) if n is not None]


class HeroExtension(ComfyExtension):
    async def get_node_list(self):
        return node_list()
