"""The import structure stays true (issue 21): read from the source, every import at any depth (imports
inside functions included, since those are how cycles used to hide).

- data_tools imports nothing from llava_vla_plugin (docs/DESIGN.md: the data side stands alone);
- llava_vla_plugin has no import cycle (register -> dataset -> register and four others were one, held
  together by imports inside functions);
- product modules do not import llava_vla_plugin.testing, except the demos listed below, which build
  their tiny model and RLDS fixture with it (issue 21 moves those builders; the list may only shrink).
"""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PLUGIN, DATA = ROOT / "llava_vla_plugin", ROOT / "data_tools"
DEMOS_USING_TESTING = {"llava_vla_plugin.demo", "llava_vla_plugin.eval_demo"}


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
    assert users <= DEMOS_USING_TESTING, sorted(users - DEMOS_USING_TESTING)


def test_the_checks_see_imports_inside_functions(tmp_path):
    """The reader itself: an import inside a function is found (a test that cannot fail would not be)."""
    f = PLUGIN / "dataset.py"
    assert "llava_vla_plugin.visual_tokens" in _imports(f)
    assert "llava_vla_plugin.dataset" in _imports(PLUGIN / "register.py")  # imported inside register()
