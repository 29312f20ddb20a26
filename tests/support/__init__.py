"""Helpers shared by the host and browser tests (a headless ComfyUI server, a random SD1.5
checkpoint, an in-memory session stand-in)."""
