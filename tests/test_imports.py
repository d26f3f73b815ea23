"""The package's import graph: every module imports, and no two modules import each other (directly or round a
longer loop).

Imports are read with ``ast`` from the source, module level and inside functions alike: a function-level import
still ties the two modules together (a cycle hidden in a function is still a design knot and fails at call time
when a partially initialised module is hit), so both count.  ``if TYPE_CHECKING:`` imports count too.
``from pkg import name`` counts as an edge to ``pkg.name`` when that is a module, else to ``pkg``; an edge from a
package's ``__init__`` to its own submodules (re-exports) is not a cycle, since submodules never need the package
namespace to be complete, and is left out."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("delg", "loftr_tools")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for p in sorted((REPO / pkg).rglob("*.py")):
            parts = list(p.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__main__":
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = p
    return mods


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """``{module: {project modules it imports}}`` (module-level and function-level imports)."""
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                while t and t not in mods:  # 'delg.data.minibench.render.x' -> the module that defines it
                    t = t.rpartition(".")[0]
                if t and t != mod and not (is_pkg and t.startswith(mod + ".")):
                    graph[mod].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return [*stack[stack.index(n):], n]
            if n not in state and (c := visit(n)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_import_graph_has_no_cycle() -> None:
    cycle = find_cycle(import_graph(_modules()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_cycle_finder_sees_function_level_imports(tmp_path: Path) -> None:
    # the old dataset.py <-> folders.py knot: folders imports dataset at module level, dataset imports folders
    # inside load_dataset
    (tmp_path / "dataset.py").write_text("def load():\n    from pkg.folders import f\n")
    (tmp_path / "folders.py").write_text("from pkg.dataset import RetrievalDataset\n")
    mods = {"pkg.dataset": tmp_path / "dataset.py", "pkg.folders": tmp_path / "folders.py"}
    assert find_cycle(import_graph(mods)) == ["pkg.dataset", "pkg.folders", "pkg.dataset"]


@pytest.mark.parametrize("module", sorted(_modules()))
def test_every_module_imports(module: str) -> None:
    importlib.import_module(module)
