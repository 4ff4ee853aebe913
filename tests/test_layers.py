"""The import structure stays true (issue 21): read from the source, every import at any depth (imports
inside functions included, since those are how cycles used to hide).

- data_tools imports nothing from llava_vla_plugin (docs/DESIGN.md: the data side stands alone);
- llava_vla_plugin has no import cycle (register -> dataset -> register and four others were one, held
  together by imports inside functions);
- product modules never import llava_vla_plugin.testing (the demos' tiny-model and RLDS builders live in
  apps/);
- imports go only downward through the layers of docs/DESIGN.md: core < train < infer < experiments < apps
  (testing/ sits on top, for tests only); a module may import its own layer and the layers below;
- core imports no upstream (`llava`) module at module level, so the contracts load without upstream.
"""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PLUGIN, DATA = ROOT / "llava_vla_plugin", ROOT / "data_tools"
# The layer of each sub-package, bottom first. The package root (`llava_vla_plugin/__init__.py`: environment
# defaults and the lazy `VLAPolicy` name) is a facade and not ranked.
LAYERS = ["core", "train", "infer", "experiments", "apps", "testing"]


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "llava_vla_plugin" or len(parts) < 2:
        return None
    if parts[1] not in LAYERS:
        raise AssertionError(f"{module}: not in a layer; put it in one of {LAYERS} (docs/DESIGN.md)")
    return LAYERS.index(parts[1])


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Internal modules `path` imports (`from pkg import mod` counts as pkg.mod when that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    known = {_module(p) for p in (*PLUGIN.rglob("*.py"), *DATA.rglob("*.py"))}
    return {m for m in found if m in known}


def _graph() -> dict[str, set[str]]:
    return {_module(p): _imports(p) for p in (*PLUGIN.rglob("*.py"), *DATA.rglob("*.py"))}


def test_data_tools_never_imports_the_plugin():
    bad = {m: sorted(i for i in deps if i.startswith("llava_vla_plugin")) for m, deps in _graph().items()
           if m.startswith("data_tools")}
    assert not {m: d for m, d in bad.items() if d}


def test_no_import_cycle_in_the_plugin():
    graph = {m: {d for d in deps if d != m and d != "llava_vla_plugin"} for m, deps in _graph().items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (cycle := visit(d)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_product_code_does_not_import_testing():
    users = {m for m, deps in _graph().items() if not m.startswith("llava_vla_plugin.testing")
             and any(d.startswith("llava_vla_plugin.testing") for d in deps)}
    assert not users, sorted(users)


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for m, deps in sorted(graph.items()):
        lm = layer_of(m)
        for d in sorted(deps):
            ld = layer_of(d)
            if lm is not None and ld is not None and ld > lm:
                bad.append(f"{m} ({LAYERS[lm]}) imports {d} ({LAYERS[ld]})")
    return bad


def test_imports_go_only_downward():
    graph = {m: d for m, d in _graph().items() if m.startswith("llava_vla_plugin")}
    assert not upward_imports(graph), "\n".join(upward_imports(graph))


def _module_level_imports(path: Path) -> set[str]:
    """Imports run when the module is imported: top-level statements, including under if/try, not in defs."""
    found: set[str] = set()

    def walk(body):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if isinstance(node, ast.ClassDef):
                    walk(node.body)
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
            for field in ("body", "orelse", "finalbody", "handlers"):
                walk(getattr(node, field, []) or [])

    walk(ast.parse(path.read_text(), str(path)).body)
    return found


def test_core_imports_no_upstream_at_module_level():
    bad = {_module(p): sorted(i for i in _module_level_imports(p) if i == "llava" or i.startswith("llava."))
           for p in (PLUGIN / "core").rglob("*.py")}
    assert not {m: d for m, d in bad.items() if d}


def test_the_checks_see_what_they_guard(tmp_path):
    """The readers themselves (a test that cannot fail would not be one): an import inside a function is
    found, an upward import is reported, and a module-level upstream import is told from one in a function."""
    assert "llava_vla_plugin.core.visual_tokens" in _imports(PLUGIN / "train" / "dataset.py")
    # imported inside register()
    assert "llava_vla_plugin.train.dataset" in _imports(PLUGIN / "train" / "register.py")
    assert upward_imports({"llava_vla_plugin.core.prompt": {"llava_vla_plugin.infer.policy"},
                           "llava_vla_plugin.infer.policy": {"llava_vla_plugin.core.prompt"}}) == [
        "llava_vla_plugin.core.prompt (core) imports llava_vla_plugin.infer.policy (infer)"]
    f = tmp_path / "m.py"
    f.write_text("import os\ntry:\n    from llava.model import x\nexcept ImportError:\n    pass\n"
                 "def f():\n    import llava.train\n")
    assert _module_level_imports(f) == {"os", "llava.model"}
