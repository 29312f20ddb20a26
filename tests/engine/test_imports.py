"""The engine's import graph: no module outside ``hero_engine/harness/`` imports the harness (the
entry point ``hero_engine/__main__.py`` aside), and no two modules import each other, directly or
round a longer circle. Read from the source with ``ast``: nothing is imported."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "hero_engine"


def _module(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """module -> the hero_engine modules it imports (at any depth of its code)."""
    mods = {_module(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - node.level + 1]
                    root = ".".join(base + ([node.module] if node.module else []))
                else:
                    root = node.module or ""
                # "from . import loop" imports the module hero_engine.loop
                targets = [f"{root}.{a.name}" if f"{root}.{a.name}" in mods else root
                           for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != name and t.startswith("hero_engine"):
                    found.add(t)
        graph[name] = found
    return graph


def _is_harness(mod: str) -> bool:
    return mod == "hero_engine.harness" or mod.startswith("hero_engine.harness.")


def test_the_engine_never_imports_the_harness():
    graph = _imports()
    assert any(_is_harness(m) for m in graph), "no harness package found"
    offenders = {m: sorted(t for t in ts if _is_harness(t)) for m, ts in graph.items()
                 if not _is_harness(m) and m != "hero_engine.__main__"}
    assert not {m: ts for m, ts in offenders.items() if ts}


def test_no_import_circles():
    graph = _imports()
    # a package's __init__ importing its own modules is not a circle (Python loads it first)
    edges = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}
    circles, state = [], {}

    def visit(m, path):
        state[m] = "open"
        for t in sorted(edges.get(m, ())):
            if state.get(t) == "open":
                circles.append(path[path.index(t):] + [t])
            elif t not in state:
                visit(t, path + [t])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not circles, circles


# ComfyUI's top-level modules (a ComfyUI install puts them on sys.path): only nodes/ may import them
COMFYUI_MODULES = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "comfy_config",
                   "folder_paths", "server", "nodes", "node_helpers", "execution",
                   "latent_preview", "comfyui_version", "app", "utils"}


def _top_level_imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_only_nodes_imports_comfyui():
    """hero_engine (harness included) and the pack's entry file import no ComfyUI module: the
    entry file reaches ComfyUI only through ``from .nodes import ...``."""
    files = sorted(PKG.rglob("*.py")) + [PKG.parent / "__init__.py"]
    found = {str(p.relative_to(PKG.parent)): sorted(_top_level_imports(p) & COMFYUI_MODULES)
             for p in files}
    assert not {f: m for f, m in found.items() if m}
    # the check sees an import of ComfyUI where there is one
    assert "comfy_api" in _top_level_imports(PKG.parent / "nodes" / "sockets.py")
