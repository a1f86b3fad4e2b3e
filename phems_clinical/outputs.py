"""Outputs that are never half-written or silently replaced.

Every command that writes results goes through this module:

* :func:`staged_dir` writes a whole output folder into a temporary sibling and
  renames it into place only when everything succeeded. A failure leaves the
  previous folder (if any) exactly as it was and no partial new one. A folder
  that exists and is not empty is refused unless ``overwrite=True``
  (the commands' ``--overwrite``), and then replaced as a whole: no stale file
  of an earlier run survives beside the new ones.
* :func:`write_atomic` replaces one file: temporary file in the same folder,
  ``fsync``, ``os.replace``, ``fsync`` of the folder. A reader sees the old file
  or the new one, never a mixture, even after a crash.

Examples
--------
>>> import tempfile, pathlib
>>> root = pathlib.Path(tempfile.mkdtemp())
>>> with staged_dir(root / "fit") as tmp:
...     _ = (tmp / "a.txt").write_text("1")
>>> sorted(p.name for p in (root / "fit").iterdir())
['a.txt']
>>> try:
...     with staged_dir(root / "fit") as tmp:
...         pass
... except OutputExistsError as err:
...     print(str(err).split(":")[0])
--out
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "OutputExistsError",
    "check_out",
    "replaced_file",
    "staged_dir",
    "strict_json",
    "write_atomic",
    "write_json_atomic",
]


class OutputExistsError(ValueError):
    """An output would replace earlier results without ``--overwrite``."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory handles
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_out(
    out: str | Path, *, overwrite: bool = False, option: str = "--out"
) -> Path:
    """Refuse ``out`` before any work starts when it would be replaced silently.

    ``out`` may be missing or an empty folder; a non-empty folder needs
    ``overwrite``; a file (not a folder) is always refused. The message names
    ``option``. Returns ``out`` as a :class:`~pathlib.Path`.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{option}: {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"{option}: {out} already holds results; choose a new folder or pass "
            f"--overwrite to replace it as a whole"
        )
    return out


@contextlib.contextmanager
def staged_dir(
    out: str | Path, *, overwrite: bool = False, option: str = "--out"
) -> Iterator[Path]:
    """Yield a temporary folder next to ``out``; on success it becomes ``out``.

    The temporary folder is ``.<name>.partial-<random>`` in ``out``'s parent (the
    same file system, so the final rename is atomic). On an exception it is
    removed and ``out`` is untouched. With ``overwrite`` an existing ``out`` is
    moved aside, the new folder renamed in, and the old one removed.
    """
    out = check_out(out, overwrite=overwrite, option=option)
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    tag = secrets.token_hex(4)
    tmp = parent / f".{out.name}.partial-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if out.exists():
            check_out(out, overwrite=overwrite, option=option)  # changed meanwhile?
            old = parent / f".{out.name}.old-{tag}"
            os.replace(out, old)
        os.replace(tmp, out)
        _fsync_dir(parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def replaced_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for a writer (e.g. ``to_netcdf``);
    on success it is fsynced and renamed over ``path`` (old or new, never half);
    on an exception it is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{secrets.token_hex(4)}")
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_atomic(path: str | Path, data: bytes | str) -> Path:
    """Replace ``path`` with ``data`` atomically and durably (see module doc)."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with replaced_file(path) as tmp:
        tmp.write_bytes(raw)
    return Path(path)


def write_json_atomic(path: str | Path, obj: Any, **dump_kwargs: Any) -> Path:
    """:func:`write_atomic` of ``json.dumps(obj, allow_nan=False)``: JSON has no
    NaN or infinity, so a non-finite number is an error here, not a file that
    other readers reject."""
    dump_kwargs.setdefault("indent", 2)
    return write_atomic(path, json.dumps(obj, allow_nan=False, **dump_kwargs) + "\n")


def strict_json(x: Any, *, keep_nonfinite: bool = False) -> Any:
    """``x`` as plain JSON values: NaN and infinities become ``None`` (JSON has
    neither; a reader must see "no value", never a number), mappings get string
    keys, NamedTuples become objects, tuples and arrays lists, numpy scalars
    Python numbers, dates ISO 8601 text; anything else its ``str``.

    ``keep_nonfinite=True`` keeps NaN and infinities as floats, for files only
    this package reads back (Python's ``json`` writes and reads them as the
    ``NaN``/``Infinity`` extension), e.g. checkpoints that must round-trip exactly.

    >>> strict_json({"a": float("nan"), 1: (np.float64(2.5), np.inf)})
    {'a': None, '1': [2.5, None]}
    >>> strict_json([np.float32(np.nan)], keep_nonfinite=True)
    [nan]
    """

    def go(v: Any) -> Any:
        if isinstance(v, Mapping):
            return {str(k): go(w) for k, w in v.items()}
        if isinstance(v, tuple) and hasattr(type(v), "_fields"):
            return {k: go(w) for k, w in v._asdict().items()}
        if isinstance(v, list | tuple):
            return [go(w) for w in v]
        if isinstance(v, bool | np.bool_):
            return bool(v)
        if isinstance(v, int | np.integer):
            return int(v)
        if isinstance(v, float | np.floating):
            return float(v) if keep_nonfinite or np.isfinite(v) else None
        if v is None or isinstance(v, str):
            return v
        if isinstance(v, np.ndarray) or hasattr(v, "__array__"):
            return go(np.asarray(v).tolist())
        if hasattr(v, "isoformat"):
            return v.isoformat()
        return str(v)

    return go(x)
