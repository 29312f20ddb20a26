"""The pack as the Comfy Registry and ComfyUI-Manager see it: pyproject, LICENSE, icon and banner,
what the published archive holds (comfy-cli: git-tracked files minus .comfyignore), the publish
workflow, comfy-cli's ruff checks, and a requirements.txt that installs nothing ComfyUI lacks."""
import ast
import os
import re
import shutil
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = None


def pyproject() -> dict:
    if tomllib is None:
        pytest.skip("tomllib needs Python 3.11")
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_license_and_pyproject():
    pp = pyproject()
    proj, comfy = pp["project"], pp["tool"]["comfy"]
    assert proj["license"] == {"file": "LICENSE"}
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License") and "WITHOUT WARRANTY OF ANY KIND" in text
    assert re.fullmatch(r"\d+\.\d+\.\d+", proj["version"])
    name = proj["name"]  # Registry id rules
    assert len(name) < 100 and "comfyui" not in name.lower() and re.fullmatch(
        r"[A-Za-z][A-Za-z0-9]*([._-][A-Za-z0-9]+)*", name)
    assert proj["urls"]["Repository"].startswith("https://github.com/")
    assert comfy["PublisherId"] and comfy["DisplayName"]
    assert proj["dependencies"] == []  # the nodes need nothing ComfyUI lacks
    assert "diffusers>=0.30" in proj["optional-dependencies"]["dev"]


def _raw_url_to_path(url: str, repo_url: str) -> Path:
    owner_repo = repo_url.rstrip("/").split("github.com/")[1]
    prefix = f"https://raw.githubusercontent.com/{owner_repo}/main/"
    assert url.startswith(prefix), (url, prefix)
    return REPO / url[len(prefix):]


def test_icon_and_banner():
    pp = pyproject()
    comfy, repo_url = pp["tool"]["comfy"], pp["project"]["urls"]["Repository"]
    icon = _raw_url_to_path(comfy["Icon"], repo_url)
    banner = _raw_url_to_path(comfy["Banner"], repo_url)
    with Image.open(icon) as im:
        assert im.format == "PNG" and im.size[0] == im.size[1] <= 400
    with Image.open(banner) as im:
        assert im.format == "PNG" and abs(im.size[0] / im.size[1] - 21 / 9) < 0.01
    # the committed files are what the script draws
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import make_icons
    finally:
        sys.path.pop(0)
    assert make_icons.icon().size == Image.open(icon).size
    assert make_icons.banner().size == Image.open(banner).size


def packed_files() -> list[str]:
    """What ``comfy node publish`` would put in the archive: ``git ls-files`` minus the files the
    .comfyignore patterns match (gitignore semantics, as comfy-cli's pathspec gitwildmatch)."""
    if shutil.which("git") is None:
        pytest.skip("git not installed")
    r = subprocess.run(["git", "-C", str(REPO), "ls-files"], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip("not a git checkout")
    tracked = [p for p in r.stdout.splitlines() if p.strip()]
    ign = subprocess.run(["git", "-C", str(REPO), "ls-files", "-c", "-i",
                          "--exclude-from=.comfyignore"], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    return sorted(set(tracked) - set(ign))


def _relative_imports(path: Path) -> set[Path]:
    """Modules a pack file imports relatively (``from ..hero_engine.x import y``)."""
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = path.parent
            for _ in range(node.level - 1):
                base = base.parent
            mod = base.joinpath(*node.module.split(".")) if node.module else base
            names = [mod] if node.module else [base / a.name for a in node.names]
            for m in names:
                if (m.with_suffix(".py")).is_file():
                    out.add(m.with_suffix(".py"))
                elif (m / "__init__.py").is_file():
                    out.add(m / "__init__.py")
    return out


def test_published_archive_holds_the_runtime_only():
    files = packed_files()
    total = sum((REPO / f).stat().st_size for f in files if (REPO / f).is_file())
    assert total < 1_000_000, (total, sorted(files, key=lambda f: -(REPO / f).stat().st_size)[:5])
    for bad in ("tests/", "docs/", "scripts/", "benchmarks/", ".ci/", ".github/", "hero_engine/toy/weights/"):
        assert not [f for f in files if f.startswith(bad)], bad
    for need in ("__init__.py", "pyproject.toml", "LICENSE", "README.md", "requirements.txt",
                 "nodes/nodes.py", "nodes/routes.py", "hero_engine/session.py",
                 "hero_engine/publish.py", "web/js/hero.js", "example_workflows/hero_sd15_round.json"):
        assert need in files, need
    # every module the ComfyUI path imports (from __init__.py, transitively) is in the archive
    todo, seen = [REPO / "__init__.py"], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        todo += list(_relative_imports(p))
    missing = [str(p.relative_to(REPO)) for p in seen if str(p.relative_to(REPO)) not in files]
    assert not missing, missing
    assert len(seen) > 10  # the walk followed the lazy imports inside the nodes too


def test_publish_workflow_is_the_registry_form():
    import yaml
    wf = yaml.safe_load((REPO / ".github" / "workflows" / "publish.yml").read_text())
    on = wf.get("on", wf.get(True))  # YAML 1.1 reads a bare `on` as True
    assert on["push"]["branches"] == ["main"] and on["push"]["paths"] == ["pyproject.toml"]
    assert "workflow_dispatch" in on
    steps = wf["jobs"]["publish-node"]["steps"]
    pub = [s for s in steps if str(s.get("uses", "")).startswith("Comfy-Org/publish-node-action@")]
    assert len(pub) == 1
    assert pub[0]["with"]["personal_access_token"] == "${{ secrets.REGISTRY_ACCESS_TOKEN }}"
    assert any(str(s.get("uses", "")).startswith("actions/checkout@") for s in steps)


def _semicolon_statements(path: Path) -> list[int]:
    """Lines where ';' separates statements (ruff E702), found with Python's tokenizer."""
    with open(path, "rb") as f:
        toks = list(tokenize.tokenize(f.readline))
    return [t.start[0] for t in toks if t.type == tokenize.OP and t.string == ";"]


def test_comfy_cli_publish_checks_pass():
    """comfy-cli's validate runs ``ruff check . --select S102,S307,E702``: no exec, no eval, no
    ``a; b`` statements. With ruff at hand it runs that; otherwise the tokenizer and AST check the
    same three rules on every Python file of the repository."""
    py = [REPO / f for f in subprocess.run(["git", "-C", str(REPO), "ls-files", "*.py"],
                                           capture_output=True, text=True).stdout.split()]
    assert py
    bad = []
    for p in py:
        bad += [f"{p.relative_to(REPO)}:{n}: E702" for n in _semicolon_statements(p)]
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                    and node.func.id in ("exec", "eval"):
                bad.append(f"{p.relative_to(REPO)}:{node.lineno}: {node.func.id}")
    assert not bad, bad
    ruff = shutil.which("ruff") or os.environ.get("HERO_RUFF")
    if ruff:
        r = subprocess.run([ruff, "check", ".", "-q", "--no-cache", "--select", "S102,S307,E702"],
                           cwd=str(REPO), capture_output=True, text=True)
        assert r.returncode == 0 and not r.stdout.strip(), r.stdout


def test_tokenizer_check_catches_e702(tmp_path):
    p = tmp_path / "x.py"
    p.write_text("a = 1; b = 2\ns = 'a; b'  # c; d\n")
    assert _semicolon_statements(p) == [1]


def test_requirements_install_nothing_comfyui_lacks():
    """Every requirement line names a package ComfyUI's own requirements.txt already brings (today:
    none at all); demo/bench/test packages live in requirements-dev.txt."""
    comfy_brings = {"torch", "torchvision", "numpy", "safetensors", "pillow", "aiohttp", "pyyaml",
                    "tqdm", "psutil", "scipy", "einops", "transformers", "tokenizers"}
    lines = [ln.split("#")[0].strip() for ln in (REPO / "requirements.txt").read_text().splitlines()]
    reqs = [re.split(r"[<>=!~ \[;]", ln)[0].lower() for ln in lines if ln]
    assert all(r in comfy_brings for r in reqs), reqs
    assert "torch" not in reqs
    dev = (REPO / "requirements-dev.txt").read_text()
    assert "diffusers" in dev and "peft" in dev
    assert "requirements-dev.txt" in (REPO / "scripts" / "dev.sh").read_text()
