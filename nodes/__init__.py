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
    from .nodes import NODES, _panel_export
    out = list(NODES)
    try:
        from .feedback import HERO_Feedback
        out.insert(2, HERO_Feedback)
    except ImportError:
        log.exception("HERO: the HERO_Feedback node could not be imported")
    if routes is not None and hasattr(routes, "register_exporter"):
        routes.register_exporter(_panel_export)
    return out


class HeroExtension(ComfyExtension):
    async def get_node_list(self):
        return node_list()
