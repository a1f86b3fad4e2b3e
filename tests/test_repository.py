"""Repository checks that CI enforces through the test suite.

The documentation site builds with ``mkdocs build --strict`` (broken links, missing
anchors and unparsable docstrings fail it), and the README stays a short entry
point whose links resolve on GitHub.
"""

import ast
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def _github_slug(heading: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(
        r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.M | re.S
    )
    return {_github_slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


@pytest.mark.skipif(
    not all(
        importlib.util.find_spec(m)
        for m in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")
    ),
    reason="mkdocs-material and mkdocstrings-python are not installed "
    "(python3 -m pip install -e '.[docs]')",
)
def test_docs_build_strictly(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(ROOT / "mkdocs.yml"),
            "--site-dir",
            str(tmp_path / "site"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    problems = [
        line
        for line in proc.stderr.splitlines()
        if line.startswith(("WARNING", "ERROR"))
    ]
    assert proc.returncode == 0, "\n".join(problems) or proc.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "pk" / "index.html").is_file()
    # the study write-ups outside docs/ are part of the site
    assert (tmp_path / "site" / "experiments" / "fviii" / "index.html").is_file()


def test_readme_is_short_and_its_links_resolve():
    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    assert len(text.splitlines()) < 200
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links
    for link in links:
        if re.match(r"^[a-z]+:", link):
            continue
        path, _, anchor = link.partition("#")
        target = ROOT / path if path else readme
        assert target.exists(), f"README links to {path}, which does not exist"
        if anchor:
            assert anchor in _anchors(target), (
                f"README links to {link}: no such heading"
            )


def test_readme_test_command_is_the_one_ci_runs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    command = 'python3 -m pip install -e ".[test]" && python3 -m pytest -n 2'
    assert command in readme
    assert command in ci


# ------------------------------------------------------------------ tooling
# ruff, ruff format and mypy run with the settings in pyproject.toml; each test
# names the failures. PHEMS_SKIP_FORMAT_CHECK=1 skips only the format check.


def _tool(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _needs(module: str):
    return pytest.mark.skipif(
        importlib.util.find_spec(module) is None,
        reason=f"{module} is not installed (python3 -m pip install -e '.[test]')",
    )


@_needs("ruff")
def test_ruff_check_is_clean():
    proc = _tool("ruff", "check", ".", "--output-format", "concise", "--no-fix")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


@_needs("ruff")
@pytest.mark.skipif(
    os.environ.get("PHEMS_SKIP_FORMAT_CHECK") == "1",
    reason="PHEMS_SKIP_FORMAT_CHECK=1",
)
def test_ruff_format_is_clean():
    proc = _tool("ruff", "format", "--check", ".")
    unformatted = [
        line for line in proc.stdout.splitlines() if line.startswith("Would reformat")
    ]
    assert proc.returncode == 0, (
        f"{len(unformatted)} files need `ruff format`:\n"
        + "\n".join(unformatted[:50])
        + proc.stderr[-2000:]
    )


@_needs("mypy")
def test_mypy_is_clean_on_the_checked_packages():
    """The packages in [tool.mypy] files (the ratchet) type-check."""
    proc = _tool("mypy", "--no-error-summary", timeout=240)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


def _top_level_imports(package: Path, root: Path = ROOT) -> dict[str, set[str]]:
    """Absolute imports of third-party modules in ``package``: top-level name ->
    the files importing it (relative imports and the standard library left out)."""
    found: dict[str, set[str]] = {}
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.partition(".")[0]
                if top in sys.stdlib_module_names or top == package.name:
                    continue
                found.setdefault(top, set()).add(str(path.relative_to(root)))
    return found


def _declared(extras: tuple[str, ...]) -> set[str]:
    """Normalised distribution names of the dependencies and ``extras``."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["project"]
    specs = list(project["dependencies"])
    for extra in extras:
        specs += project["optional-dependencies"][extra]
    return {canonicalize_name(Requirement(s).name) for s in specs}


def test_every_imported_package_is_declared():
    """Each third-party module that phems_clinical imports comes from a
    distribution declared in [project] dependencies or a runtime extra (flower,
    postgres); module -> distribution via importlib.metadata, else the name."""
    declared = _declared(("flower", "postgres"))
    providers = importlib.metadata.packages_distributions()
    missing = {}
    for module, files in _top_level_imports(ROOT / "phems_clinical").items():
        dists = {canonicalize_name(d) for d in providers.get(module, [module])}
        if not dists & declared:
            missing[module] = sorted(files)[:3]
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_declared_import_check_catches_an_undeclared_module(tmp_path):
    """The check above finds a third-party import and leaves stdlib out."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "m.py").write_text(
        "import os, json\nfrom collections import abc\nimport numpy as np\n"
        "from scipy.stats import norm\nfrom . import sibling\nimport pkg.x\n"
    )
    assert set(_top_level_imports(pkg, tmp_path)) == {"numpy", "scipy"}


def test_package_ships_its_type_marker():
    """PEP 561: phems_clinical/py.typed, inside the wheel's package folder."""
    assert (ROOT / "phems_clinical" / "py.typed").is_file()
    hatch = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["tool"]
    assert "phems_clinical" in hatch["hatch"]["build"]["targets"]["wheel"]["packages"]


@_needs("pre_commit")
def test_pre_commit_config_is_valid():
    proc = _tool("pre_commit", "validate-config", ".pre-commit-config.yaml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    config = (ROOT / ".pre-commit-config.yaml").read_text("utf-8")
    for hook in (
        "ruff-check",
        "ruff-format",
        "check-added-large-files",
        "detect-private-key",
        "end-of-file-fixer",
        "trailing-whitespace",
    ):
        assert f"id: {hook}" in config, hook
