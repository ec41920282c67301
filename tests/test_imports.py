"""The package's import graph: no cycle, and no module reaching for another's private names.

Imports are read with ``ast`` from every module of ``influence_core``, at module level *and* inside functions
(a function-level import still ties the two modules together; it only hides the cycle until the function runs).
Imports under ``if TYPE_CHECKING:`` are left out: they never run.
"""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "influence_core"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for other in node.orelse:
                yield other
                yield from _runtime_nodes(other)
            continue
        yield node
        yield from _runtime_nodes(node)


def imported_modules(name: str) -> set[str]:
    """The package's modules that module ``name`` imports (relative and absolute, at any depth)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            targets = [source] + [f"{source}.{alias.name}" for alias in node.names]  # `from . import x`: a module
        else:
            continue
        out.update(t for t in targets if t in MODULES and t != name)
    return out


def test_the_import_graph_has_no_cycle():
    # guards: pipeline → second_pass → training → corruption → pipeline (corruption's function-level import of
    # the pipeline closed it), and any cycle that comes back
    graph = {name: imported_modules(name) for name in MODULES}
    try:
        tuple(TopologicalSorter(graph).static_order())
    except CycleError as e:
        raise AssertionError(f"import cycle: {' → '.join(reversed(e.args[1]))}") from None


def test_the_graph_reader_sees_function_level_imports():
    # guards the test above: a cycle closed inside a function must count
    assert "influence_core.pipeline" in imported_modules("influence_core.cli")


def test_no_module_imports_another_modules_private_names():
    # guards: second_pass took training._predict; a name used across modules gets a public name and home
    private = []
    for name, path in [*MODULES.items(), *((module_name(p), p) for p in sorted((ROOT / "pages").rglob("*.py")))]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                private += [f"{name}: from {node.module} import {a.name}" for a in node.names if a.name.startswith("_")]
    assert not private, private
