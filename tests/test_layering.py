"""The import layering of the package holds: a lower layer never imports a higher
one, at module level or inside a function (checked on the source's AST).

Layers, lowest first: shared utilities; data; models (PK and statistical models);
privacy; federation; evaluation and dosing; use cases; runner and app (peers that
do not import each other). A use case is one module of
:mod:`phems_clinical.usecases` that the lower layers receive as an argument.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "phems_clinical"

#: package -> layer (higher number = higher layer); modules not listed directly
#: under phems_clinical are shared utilities (layer 0).
LAYERS = {
    "data": 1,
    "pk": 2,
    "models": 2,
    "privacy": 3,
    "federation": 4,
    "evaluation": 5,
    "dosing": 5,
    "usecases": 6,
    "runner": 7,
    "app": 7,
}
#: peers that must not import each other
PEERS = {("runner", "app"), ("app", "runner")}
#: the package's entry point sits above everything
ENTRY = {"__main__": 8}
#: existing imports between the peers, each for a reason (checked: no other)
ALLOWED = {
    # ``phems run`` is a subcommand of the CLI: the dispatcher starts the runner
    ("phems_clinical/app/cli.py", "phems_clinical.runner"),
    ("phems_clinical/app/cli.py", "phems_clinical.runner.validate"),
    # the PK demo experiment fits with the ``phems fit`` pipeline, and the runner
    # words its errors by the CLI's error contract
    ("phems_clinical/runner/__init__.py", "phems_clinical.app.fit"),
    ("phems_clinical/runner/__init__.py", "phems_clinical.app.cli"),
}


def _package(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "phems_clinical" or len(parts) < 2:
        return None
    return parts[1]


def _layer(package: str | None) -> int:
    return LAYERS.get(package or "", ENTRY.get(package or "", 0))


def _imports(path: Path, rel: Path) -> list[tuple[int, str]]:
    """(line, imported module) of every import in ``path`` (``rel``: its path
    from the folder above the package), absolute or relative."""
    here = list(rel.with_suffix("").parts)[:-1]  # the module's package
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((node.lineno, mod))
            # ``from phems_clinical import usecases`` names a package
            if mod == "phems_clinical":
                out += [(node.lineno, f"phems_clinical.{a.name}") for a in node.names]
    return out


def violations(root: Path = ROOT) -> list[str]:
    """Every import of a higher layer (or of a peer) by a lower one."""
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent)
        own = _package(".".join(rel.with_suffix("").parts))
        own_layer = _layer(own)
        if own not in LAYERS:
            own = None
        for line, mod in _imports(path, rel):
            pkg = _package(mod)
            if pkg is None or pkg == own or pkg not in LAYERS:
                continue
            if (rel.as_posix(), mod) in ALLOWED:
                continue
            if _layer(pkg) > own_layer or (own, pkg) in PEERS:
                found.append(f"{rel}:{line} ({own or 'shared'}) imports {mod}")
    return found


def test_no_lower_layer_imports_a_higher_one():
    assert violations() == []


def test_checker_sees_a_violation(tmp_path):
    """The check itself can fail: an evaluation module importing the use cases
    (inside a function) and a runner module importing the app are reported."""
    pkg = tmp_path / "phems_clinical"
    (pkg / "evaluation").mkdir(parents=True)
    (pkg / "runner").mkdir()
    (pkg / "evaluation" / "bad.py").write_text(
        "def f():\n    from phems_clinical import usecases\n    return usecases\n"
    )
    (pkg / "runner" / "bad.py").write_text("from ..app import derive\n")
    (pkg / "runner" / "fine.py").write_text(
        "from phems_clinical.usecases import get\nfrom . import pipeline\n"
    )
    found = violations(pkg)
    assert found == [
        "phems_clinical/evaluation/bad.py:2 (evaluation) imports "
        "phems_clinical.usecases",
        "phems_clinical/runner/bad.py:1 (runner) imports phems_clinical.app",
    ]


@pytest.mark.parametrize(
    "package", ["evaluation", "privacy", "federation", "models", "data"]
)
def test_lower_layers_do_not_branch_on_use_case_names(package):
    """No comparison of ``use_case`` with a literal name below the use cases."""
    names = ("haemophilia", "picu", "cardiac")
    hits = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and any(
                isinstance(c, ast.Constant) and c.value in names
                for c in [node.left, *node.comparators]
            ):
                hits.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    allowed = {"federation"}  # the Flower apps' run-config recipe lookup
    assert hits == [] or package in allowed, hits
