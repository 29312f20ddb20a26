"""The engine's import graph: no module outside ``hero_engine/harness/`` imports the harness (the
entry point ``hero_engine/__main__.py`` aside), and no two modules import each other, directly or
round a longer circle. Read from the source with ``ast``: nothing is imported."""
import ast
import re
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


# What ComfyUI calls by name (its v3 node and extension protocol): a method of these names has
# its caller in the host
COMFYUI_HOOKS = {"comfy_entrypoint", "get_node_list", "define_schema", "execute",
                 "fingerprint_inputs", "validate_inputs", "check_lazy_status", "on_load"}


def _names_used(tree: ast.AST) -> set[str]:
    """Every name the code refers to (names, attributes, imports, identifier-like strings such as a
    getattr or a dispatch table), leaving out docstrings and the ``__all__`` lists: a function
    that is only exported or only described has no caller."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__"
                                                for t in node.targets):
            skip |= {id(c) for c in ast.walk(node.value)}
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)):
            skip.add(id(body[0].value))
    used = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Name):
            used.add(node.id)
        elif isinstance(node, ast.Attribute):
            used.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and node.value.isidentifier():
            used.add(node.value)
    return used


def _defined(tree: ast.Module) -> list[tuple[str, int]]:
    """The module's functions and its classes' methods (name, line), dunders left out."""
    out = []
    for node in tree.body:
        members = node.body if isinstance(node, ast.ClassDef) else [node]
        out += [(f.name, f.lineno) for f in members
                if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                and not (f.name.startswith("__") and f.name.endswith("__"))]
    return out


def test_every_function_has_a_caller():
    """No function or method of the engine, the harness, the nodes or the entry file is called
    only from tests: each has a caller in the pack's own code, is a ComfyUI hook, or is public API
    named in docs/engine_api.md (what a script calls)."""
    root = PKG.parent
    files = sorted(PKG.rglob("*.py")) + sorted((root / "nodes").rglob("*.py")) + [root / "__init__.py"]
    trees = {p: ast.parse(p.read_text(), str(p)) for p in files}
    used = set().union(*(_names_used(t) for t in trees.values()))
    api = set(re.findall(r"\w+", (root / "docs" / "engine_api.md").read_text()))
    orphans = [f"{p.relative_to(root)}:{line} {name}" for p, t in trees.items()
               for name, line in _defined(t)
               if name not in used and name not in COMFYUI_HOOKS and name not in api]
    # each has no caller outside tests: remove it, or document it in docs/engine_api.md
    assert not orphans, orphans
    # the check finds a function nothing calls
    probe = ast.parse("def used():\n    pass\n\ndef unused():\n    used()\n")
    assert [n for n, _ in _defined(probe) if n not in _names_used(probe)] == ["unused"]

