"""ComfyUI-HERO: online human-feedback LoRA fine-tuning (HERO, arXiv 2410.05116) for ComfyUI.

V3 entry point only (no NODE_CLASS_MAPPINGS); heavy modules are imported lazily by the nodes."""
import logging

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    try:
        from .nodes import HeroExtension
        return HeroExtension()
    except Exception:
        logging.getLogger("HERO").exception("ComfyUI-HERO failed to load")
        raise


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
