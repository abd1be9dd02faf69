"""The package's modules import each other in one direction only: no import circle, function-level imports included.

An import inside a function still ties two modules together: it only hides the circle until that function
runs. So the graph is read from every `import` statement anywhere in a module's source, with `ast`.
"""

import ast
from pathlib import Path

import pytest

import minibert
from minibert import config, model

PACKAGE_DIR = Path(minibert.__file__).parent


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the package modules it imports. `import a.b` and `from a import b` (b a module) point at
    a.b; `from a import name` at a, whose __init__ defines the name. The parent packages Python runs on
    the way to a.b are not counted: a module's own package is already (half-)initialised when it runs,
    so they add no order to get wrong. Reading a name out of one's own package's __init__ is counted: it
    works only while that __init__ defines the name before it imports the module."""
    paths = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from . import x, from ..y import z
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in paths else base)
        graph[name] = {t for t in targets if t in paths and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once fully explored

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return path[path.index(target):] + [node, target] if target in path else [node, target]
            if target not in state and (cycle := visit(target, path + [node])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [])):
            return cycle
    return None


def test_the_package_has_no_import_circle():
    graph = import_graph(PACKAGE_DIR)
    assert "minibert.model" in graph and "minibert.config" in graph["minibert.model"]  # the walk read the package
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_config_is_at_the_bottom_and_model_below_checkpoint():
    graph = import_graph(PACKAGE_DIR)
    assert graph["minibert.config"] == set()
    assert "minibert.checkpoint" not in graph["minibert.model"]
    assert "minibert.model" in graph["minibert.checkpoint"]


@pytest.mark.parametrize("where", ["top", "function"])
def test_a_circle_is_found_also_through_a_function_level_import(tmp_path, where):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.b import g\n\ndef f():\n    return g()\n")
    (package / "c.py").write_text("import json\n")
    circular = "from pkg import a\n" if where == "top" else "def g():\n    from pkg.a import f\n    return f\n"
    (package / "b.py").write_text(circular)
    assert find_cycle(import_graph(package)) in (["pkg.a", "pkg.b", "pkg.a"], ["pkg.b", "pkg.a", "pkg.b"])
    (package / "b.py").write_text("def g():\n    from pkg import c\n    return c\n")
    assert find_cycle(import_graph(package)) is None


def test_config_knows_the_attention_backends_without_importing_the_model():
    assert config.ATTENTION_BACKEND_NAMES == tuple(model.ATTENTION_BACKENDS)
