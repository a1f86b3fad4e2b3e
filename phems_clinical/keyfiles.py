"""Files that hold secrets (keys, site secrets): owner-only from their creation.

A secret file is created exclusively (an existing key is never overwritten), with
mode 0600 from the first byte (never created readable and tightened later), and
flushed to disk before it is used. A reader refuses a key file that group or
others may read or write (:func:`owner_only_problem`).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["create_secret_file", "owner_only_problem"]


def create_secret_file(path: str | os.PathLike, data: bytes) -> Path:
    """Create ``path`` (mode 0600, exclusively: ``FileExistsError`` if it exists)
    holding ``data``, fsynced; parent folders are made as needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return path


def owner_only_problem(path: str | os.PathLike) -> str | None:
    """None when only the owner may read or write ``path``; else what is wrong
    (its mode), for the caller's error message."""
    mode = stat.S_IMODE(Path(path).stat().st_mode)
    if mode & 0o077:
        return f"the key file has mode {mode:o}; expected 600 (owner only)"
    return None
