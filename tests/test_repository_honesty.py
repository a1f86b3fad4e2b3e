"""The repository cites primary sources only, and carries no machine paths and no
tracker words: every tracked (or new, not ignored) text file is searched line by line.

A failure names ``file:line`` and the rule broken. A line that must keep a pattern
goes into ``ALLOWED`` with the reason.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Citations of documents that are not in the repository: development reference
#: notes and tracker documents. A path that names a file of the repository is fine.
#: The patterns are assembled from parts so that this file does not itself name
#: the notes or the machine's folders it searches for.
_MD = "." + "md"
_NOTE_NAMES = "|".join(
    ("privacy", "pk_" + "models", "clinical", "federation", "pk_library_" + "sources")
)
_SHARED = "shared" + "/" + "reference"
CITATION = re.compile(
    rf"(?P<path>[\w./-]*\b(?:{_NOTE_NAMES})\{_MD})|{_SHARED}|notes/issue|"
    rf"\bissue\d+(?:_\w+)?\{_MD}"
)
#: Absolute paths of a development machine.
_ROOTS = ("work", "root")
MACHINE = re.compile(
    "|".join(f"/{r}/" for r in _ROOTS) + r"|/home/\w|(?<![\w.~$])/" + "tmp/"
)
#: Tracker words in identifiers, comments and text ("issue 6", ``_ISSUE6_EDGES``).
TRACKER = re.compile(r"(?i)\bissue[ _-]?\d+|_issue\d")

RULES = {
    "citation of a document outside the repository": CITATION,
    "absolute path of a development machine": MACHINE,
    "tracker word": TRACKER,
}

#: (path, rule) pairs allowed to match, with the reason.
ALLOWED: dict[tuple[str, str], str] = {
    ("tests/test_repository_honesty.py", "*"): "defines the patterns it searches for",
}

_BINARY_SUFFIXES = {
    ".nc",
    ".png",
    ".jpg",
    ".jpeg",
    ".gif",
    ".ico",
    ".pdf",
    ".duckdb",
    ".parquet",
    ".npz",
    ".npy",
    ".gz",
    ".zip",
    ".woff",
    ".woff2",
}


def _files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return sorted(
        {
            f
            for f in out.split("\0")
            if f
            and Path(f).suffix.lower() not in _BINARY_SUFFIXES
            and (ROOT / f).is_file()
        }
    )


def _repo_has(path: str, citing: str, files: set[str]) -> bool:
    """Whether a cited ``*.md`` path names a file of the repository (as written, or
    relative to the citing file's folder or to ``docs/``)."""
    p = path.lstrip("./")
    if "/" not in path:
        return str(Path(citing).parent / path).lstrip("./") in files
    return (
        p in files
        or any(f.endswith("/" + p) for f in files)
        or str(Path(citing).parent / path) in files
    )


def findings(files: list[str] | None = None) -> list[str]:
    """``file:line: rule: text`` for every line that breaks a rule."""
    present = set(_files())
    files = sorted(present) if files is None else files
    out = []
    for f in files:
        raw = (ROOT / f).read_bytes()
        if b"\0" in raw[:8192]:
            continue
        for i, line in enumerate(raw.decode("utf-8", "replace").splitlines(), 1):
            for rule, pat in RULES.items():
                if (f, "*") in ALLOWED or (f, rule) in ALLOWED:
                    continue
                for m in pat.finditer(line):
                    if (
                        pat is CITATION
                        and m.group("path")
                        and _repo_has(m.group("path"), f, present)
                    ):
                        continue
                    out.append(f"{f}:{i}: {rule}: {line.strip()[:120]}")
                    break
    return out


def test_patterns_catch_what_they_should():
    def hit(rule, text):
        return RULES[rule].search(text) is not None

    cite = "citation of a document outside the repository"
    assert hit(cite, f"see {_SHARED}/privacy{_MD} section 2")
    assert hit(cite, f"(pk_models{_MD} section 1)")
    assert hit(cite, f"contract issue5{_MD}")
    assert not hit(cite, "Sweeney, IJUFKS 2002;10(5):571-588")
    tmp, work = "/" + "tmp/", "/" + "work/"
    assert hit("absolute path of a development machine", f'open("{tmp}x.png")')
    assert hit("absolute path of a development machine", f"see {work}notes/a{_MD}")
    assert not hit("absolute path of a development machine", "tmp_path / 'x'")
    assert hit("tracker word", "(issue 6, section 1)")
    assert hit("tracker word", "_ISSUE6_EDGES = ...")
    assert not hit("tracker word", "an issue with the fit")


def test_a_cited_file_of_the_repository_is_fine():
    page = "privacy" + _MD
    files = {f"docs/api/{page}", "mkdocs.yml", "docs/index.md"}
    assert _repo_has(f"api/{page}", "mkdocs.yml", files)
    assert not _repo_has(page, "docs/index.md", files)
    assert not _repo_has(f"shared/{page}", "docs/index.md", files)


@pytest.mark.parametrize(
    "area",
    [
        "phems_clinical",
        "configs",
        "data_schemas",
        "experiments",
        "tests",
        "docs",
        "other",
    ],
)
def test_no_external_citations_machine_paths_or_tracker_words(area):
    tops = {"phems_clinical", "configs", "data_schemas", "experiments", "tests", "docs"}
    files = [
        f
        for f in _files()
        if (
            f.split("/", 1)[0] == area
            if area != "other"
            else f.split("/", 1)[0] not in tops
        )
    ]
    bad = findings(files)
    assert not bad, "\n".join(bad)
