"""MkDocs hook: the pages read the same on GitHub and on the built site.

Pages link to repository files outside ``docs/`` with plain relative Markdown
links, which GitHub follows. For the site, this hook

- copies the study write-ups (every ``experiments/**/*.md`` and the figures
  they show) into the site at the same relative path, so those links point to
  built pages;
- turns a link to any other existing repository file into a link to it on the
  repository host (``repo_url``), or into its plain text when no ``repo_url``
  is configured;
- reports a link whose target does not exist, which fails ``--strict``;
- expands ``<!-- api: submodules of PACKAGE -->`` in an API page into one
  mkdocstrings block per public module of PACKAGE, found at build time, so the
  reference follows the package as modules are added, split or renamed.

MkDocs hooks: https://www.mkdocs.org/user-guide/configuration/#hooks
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from mkdocs.structure.files import File

log = logging.getLogger("mkdocs.hooks.repository_links")

MIRRORED = ("experiments",)
MIRRORED_SUFFIXES = {".md", ".png", ".svg"}
LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)


def _repo_root(config) -> Path:
    return Path(config["config_file_path"]).resolve().parent


def on_files(files, config):
    root = _repo_root(config)
    for top in MIRRORED:
        for path in sorted((root / top).rglob("*")):
            if path.is_file() and path.suffix in MIRRORED_SUFFIXES:
                uri = path.relative_to(root).as_posix()
                files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


def _rewrite(markdown: str, page, config) -> str:
    root = _repo_root(config)
    docs = Path(config["docs_dir"]).resolve()
    source = Path(page.file.abs_src_path).resolve()
    page_dir = os.path.dirname(page.file.src_uri)
    repo_url = (config.get("repo_url") or "").rstrip("/")

    def sub(match: re.Match) -> str:
        bang, label, target = match.groups()
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            return match.group(0)
        path, _, fragment = target.partition("#")
        resolved = (source.parent / path).resolve()
        if resolved.is_relative_to(docs) or not resolved.is_relative_to(root):
            return match.group(0)
        rel = resolved.relative_to(root).as_posix()
        if not resolved.exists():
            log.warning("%s links to %s, which does not exist", page.file.src_uri, rel)
            return match.group(0)
        if rel.split("/")[0] in MIRRORED and resolved.suffix in MIRRORED_SUFFIXES:
            new = os.path.relpath(rel, page_dir or ".")
            return f"{bang}[{label}]({new}{'#' + fragment if fragment else ''})"
        if repo_url:
            kind = "tree" if resolved.is_dir() else "blob"
            return f"{bang}[{label}]({repo_url}/{kind}/main/{rel})"
        return label

    # leave fenced code blocks untouched
    out, last = [], 0
    for fence in FENCE.finditer(markdown):
        out.append(LINK.sub(sub, markdown[last : fence.start()]))
        out.append(fence.group(0))
        last = fence.end()
    out.append(LINK.sub(sub, markdown[last:]))
    return "".join(out)


API_MARKER = re.compile(r"^<!-- api: submodules of ([\w.]+) -->$", re.M)


def _submodules(root: Path, package: str) -> list[str]:
    base = root.joinpath(*package.split("."))
    names = []
    for path in sorted(base.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        inner = parts[len(package.split(".")) :]
        if inner and not any(p.startswith("_") for p in inner):
            names.append(".".join(parts))
    return names


def _expand_api(markdown: str, config) -> str:
    root = _repo_root(config)

    def sub(match: re.Match) -> str:
        modules = _submodules(root, match.group(1))
        if not modules:
            log.warning("no public modules under %s", match.group(1))
        return "\n\n".join(f"::: {m}" for m in modules)

    return API_MARKER.sub(sub, markdown)


def on_page_markdown(markdown, page, config, files):
    return _rewrite(_expand_api(markdown, config), page, config)
