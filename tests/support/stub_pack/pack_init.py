# __init__.py of the throwaway test pack (copied by tests.support.stub_pack.build)
import logging

WEB_DIRECTORY = "./web"

try:
    from .nodes import comfy_entrypoint  # noqa: F401
    from .nodes import routes  # noqa: F401  (registers /hero/* routes)
except Exception:
    logging.exception("HERO test pack failed to import")
    raise
