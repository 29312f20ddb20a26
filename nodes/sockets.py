"""The HERO socket types and the node category, defined once for every node module."""
from __future__ import annotations

from comfy_api.latest import io

CATEGORY = "HERO"

SessionT = io.Custom("HERO_SESSION")
Batch = io.Custom("HERO_BATCH")
Feedback = io.Custom("HERO_FEEDBACK")
