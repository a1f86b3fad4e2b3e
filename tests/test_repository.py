"""Repository checks that CI enforces through the test suite.

The documentation site builds with ``mkdocs build --strict`` (broken links, missing
anchors and unparsable docstrings fail it), and the README stays a short entry
point whose links resolve on GitHub.
"""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

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
