"""The package's public face: each subpackage's ``__all__`` resolves, and no module
reaches into another module's private (underscore) names."""

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "phems_clinical"
PACKAGES = [
    "pk",
    "federation",
    "evaluation",
    "privacy",
    "models",
    "data",
    "dosing",
    "usecases",
    "runner",
    "app",
]


def _module_of(node: ast.ImportFrom, rel: Path) -> str:
    """The absolute module an ``ImportFrom`` in file ``rel`` reads from."""
    if not node.level:
        return node.module or ""
    here = list(rel.with_suffix("").parts)[:-1]
    base = here[: len(here) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def private_imports(root: Path = ROOT) -> list[str]:
    """``from phems_clinical.x import _y`` and ``x._y`` (``x`` a module of the
    package bound by an import) anywhere under ``root``."""
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent)
        tree = ast.parse(path.read_text(), str(path))
        modules: set[str] = set()  # local names bound to a package module
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                mod = _module_of(node, rel)
                if not mod.startswith("phems_clinical"):
                    continue
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        found.append(f"{rel}:{node.lineno} imports {mod}.{a.name}")
                    else:
                        modules.add(a.asname or a.name)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("phems_clinical"):
                        modules.add(a.asname or a.name.split(".")[0])
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in modules
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                found.append(f"{rel}:{node.lineno} uses {node.value.id}.{node.attr}")
    return found


def test_no_module_uses_another_modules_private_names():
    assert private_imports() == []


def test_checker_sees_private_imports(tmp_path):
    """The check can fail: a relative import of a private name and an attribute
    access through an imported module are both reported."""
    pkg = tmp_path / "phems_clinical"
    (pkg / "pk").mkdir(parents=True)
    (pkg / "pk" / "a.py").write_text("def _h():\n    return 1\n")
    (pkg / "pk" / "b.py").write_text(
        "from .a import _h\nfrom phems_clinical.pk import a as _a\n"
        "import numpy as np\nx = _a._h() + np._NoValue.__hash__()\n"
    )
    assert private_imports(pkg) == [
        "phems_clinical/pk/b.py:1 imports phems_clinical.pk.a._h",
        "phems_clinical/pk/b.py:4 uses _a._h",
    ]


@pytest.mark.parametrize("package", PACKAGES)
def test_every_exported_name_resolves(package):
    mod = importlib.import_module(f"phems_clinical.{package}")
    names = mod.__all__
    assert names, f"phems_clinical.{package}.__all__ is empty"
    assert len(set(names)) == len(names), "duplicate names in __all__"
    missing = [n for n in names if not hasattr(mod, n)]
    assert missing == []
    assert mod.__doc__ and len(mod.__doc__) > 80, "needs a module docstring"
