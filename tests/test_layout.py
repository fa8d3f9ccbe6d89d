"""The package's shape: no import cycles, intra-package imports at module level, one error base,
notebooks that import only what they use."""

from __future__ import annotations

import ast
import graphlib
import inspect
from pathlib import Path

import nbformat
import pytest

from medcap_helpers import devices, errors
from medcap_helpers.pipeline import notebook_dir

PACKAGE = Path(__file__).resolve().parents[1] / "medcap_helpers"
MODULES = {p.stem: p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}


def _package_imports(node: ast.AST) -> set[str]:
    """medcap_helpers modules imported anywhere under ``node``."""
    found: set[str] = set()
    for item in ast.walk(node):
        if isinstance(item, ast.ImportFrom) and item.module:
            if item.module == "medcap_helpers":
                found |= {alias.name for alias in item.names if alias.name in MODULES}
            elif item.module.startswith("medcap_helpers."):
                found.add(item.module.split(".")[1])
        elif isinstance(item, ast.Import):
            found |= {alias.name.split(".")[1] for alias in item.names
                      if alias.name.startswith("medcap_helpers.") and alias.name.split(".")[1] in MODULES}
    return found


def import_graph() -> dict[str, set[str]]:
    return {name: _package_imports(ast.parse(path.read_text())) - {name} for name, path in MODULES.items()}


def test_the_import_graph_has_no_cycle() -> None:
    graph = import_graph()
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as err:
        pytest.fail(f"import cycle among medcap_helpers modules: {' -> '.join(err.args[1])}")
    assert set(order) == set(graph)


def test_a_cycle_would_be_found() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    with pytest.raises(graphlib.CycleError):
        list(graphlib.TopologicalSorter(graph).static_order())


def test_package_modules_are_imported_at_module_level_only() -> None:
    """A function-level import of a sibling module is how cycles hide; there are none."""
    hidden = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        for function in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for imported in _package_imports(function):
                hidden.append(f"{name}.{function.name} imports {imported}")
    assert not hidden, hidden


def test_every_library_error_has_the_medcap_base_and_keeps_its_kind() -> None:
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__]
    assert len(classes) >= 12
    for cls in classes:
        assert issubclass(cls, errors.MedcapError), cls
    assert issubclass(errors.ConfigError, ValueError) and issubclass(errors.ImageLoadError, ValueError)
    assert issubclass(errors.ModelLoadError, OSError) and issubclass(errors.RunLocked, OSError)
    assert issubclass(devices.OutOfMemory, errors.MedcapError)
    import torch

    assert issubclass(devices.OutOfMemory, torch.cuda.OutOfMemoryError)


def test_errors_are_defined_in_one_place() -> None:
    defined = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and (node.name.endswith(("Error", "NotFound")) or node.name in
                                                   ("OutOfMemory", "BudgetTooSmall", "StageFailed", "RunLocked")):
                defined.append((name, node.name))
    assert {module for module, _ in defined} <= {"errors", "devices"}, defined


@pytest.mark.parametrize("path", sorted(notebook_dir().glob("*.ipynb")), ids=lambda p: p.stem)
def test_notebooks_import_only_what_they_use(path: Path) -> None:
    code = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
    tree = ast.parse(code)
    imported = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names}
    used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    assert imported <= used, f"{path.name} imports {sorted(imported - used)} without using them"
