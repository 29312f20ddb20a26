"""The harness around the engine: simulated sessions on the toy model (``experiment``), the scripted
person that marks them (``evaluator``), the feedback-efficiency benchmark (``bench``), the command
line (``cli``: ``python -m hero_engine demo|bench|repair``) and its line plots (``plots``).

The engine never imports the harness (tests/engine/test_imports.py); the harness imports the
engine.
"""
