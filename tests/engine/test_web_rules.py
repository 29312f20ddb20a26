"""The front end's marking rules and wait estimate (web/js/hero_rules.js): its node unit tests,
run here so CI runs them (skipped where no ``node`` is installed)."""
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_hero_rules_js():
    r = subprocess.run(["node", "--test", str(REPO / "tests" / "browser" / "js")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "# fail 0" in r.stdout
