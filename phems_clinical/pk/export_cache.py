"""Compiled programs kept between processes, so that ``phems dose`` does not trace.

Tracing the dosing programs (MAP fit, prior predictive, per-draw forecasts,
regimens) takes several seconds per process; JAX's persistent compilation cache
(:func:`phems_clinical.runtime.configure_jax`) spares only the XLA compilation
after it. :func:`persistent` wraps a jitted function so that the first process
that calls it with given argument shapes exports the traced program
(``jax.export``) into ``<cache>/programs/`` and later processes load that program
and call it, without tracing. Every call, first or later, runs the exported
program, so results do not depend on whether the cache was warm (bit for bit).

The key of a program is a SHA-256 of: the tag, the model's specification
(:func:`model_digest`), the argument tree, shapes and dtypes, the package's
source code (:func:`source_digest`) and version, the jax/jaxlib versions, the
backend and the x64 flag. Each file holds a header with that key and a SHA-256 of
its payload: a truncated, corrupted or mismatched file is ignored and rebuilt,
never run. Files are written atomically (temporary file, then rename).

The payload is a pickle (``Exported.serialize`` needs the optional
``flatbuffers`` package), so the folder must be as trusted as JAX's own
compilation cache beside it, which holds executables: it is the user's own cache
folder (``PHEMS_CACHE_DIR``, default ``$XDG_CACHE_HOME/phems_clinical/jax`` or
``~/.cache/phems_clinical/jax``; ``PHEMS_CACHE_DIR=off`` disables both caches).
Delete the folder to clear it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pickle
import weakref
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import jax
import jaxlib
import numpy as np

import phems_clinical
from phems_clinical.runtime import cache_dir

log = logging.getLogger(__name__)

#: First line of every program file (format version).
MAGIC = b"phems-exported-program 1\n"


@cache
def source_digest() -> str:
    """SHA-256 of the package's Python sources (an export is reused only for
    unchanged code)."""
    h = hashlib.sha256()
    root = Path(phems_clinical.__file__).resolve().parent
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _canonical(value: Any) -> Any:
    """``value`` as JSON-able data that determines it (dataclasses, arrays,
    containers, numbers by their exact ``repr``)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            "__class__": f"{type(value).__module__}.{type(value).__qualname__}",
            **{
                f.name: _canonical(getattr(value, f.name))
                for f in dataclasses.fields(value)
            },
        }
    if isinstance(value, np.ndarray | np.generic) or hasattr(value, "__array__"):
        arr = np.asarray(value)
        return {
            "__array__": str(arr.dtype),
            "shape": list(arr.shape),
            "sha256": hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest(),
        }
    if isinstance(value, dict):
        return {
            "__dict__": sorted(
                ([repr(k), _canonical(v)] for k, v in value.items()),
                key=lambda kv: kv[0],
            )
        }
    if isinstance(value, list | tuple):
        return [type(value).__name__, [_canonical(v) for v in value]]
    if isinstance(value, float):
        return {"__float__": value.hex()}
    if value is None or isinstance(value, bool | int | str):
        return value
    return {"__repr__": f"{type(value).__qualname__}:{value!r}"}


def model_digest(model: Any) -> str:
    """SHA-256 of a model specification (every field of the ``PopModel``
    dataclass, arrays by their bytes)."""
    return hashlib.sha256(
        json.dumps(_canonical(model), sort_keys=True).encode()
    ).hexdigest()


def _aval(x: Any) -> str:
    if isinstance(x, bool | int | float | complex):
        return f"py:{type(x).__name__}"
    return (
        f"{tuple(np.shape(x))}:{x.dtype}"
        f"{':weak' if getattr(x, 'weak_type', False) else ''}"
    )


def _key(parts: tuple, leaves: list, tree: Any) -> str:
    text = json.dumps(
        [
            list(map(str, parts)),
            str(tree),
            [_aval(x) for x in leaves],
            phems_clinical.__version__,
            source_digest(),
            jax.__version__,
            jaxlib.__version__,
            jax.default_backend(),
            # jax.config sets its flags as attributes at run time
            bool(jax.config.jax_enable_x64),  # type: ignore[attr-defined]
        ]
    )
    return hashlib.sha256(text.encode()).hexdigest()


def _read(path: Path, key: str):
    """``(out_tree, Exported)`` from ``path`` when its header names ``key`` and
    its payload is intact; else ``None``."""
    try:
        blob = path.read_bytes()
    except OSError:
        return None
    try:
        magic, header, payload = blob[: len(MAGIC)], *blob[len(MAGIC) :].split(b"\n", 1)
        meta = json.loads(header)
        if (
            magic != MAGIC
            or meta.get("key") != key
            or meta.get("sha256") != hashlib.sha256(payload).hexdigest()
        ):
            raise ValueError("header or checksum mismatch")
        out_tree, program = pickle.loads(payload)  # noqa: S301 - own cache, checked
        return out_tree, program
    except Exception as err:  # noqa: BLE001 - any damage: rebuild
        log.info("ignoring cached program %s (%s); rebuilding", path, err)
        return None


def _write(path: Path, key: str, out_tree: Any, program: Any) -> None:
    try:
        payload = pickle.dumps((out_tree, program))
    except Exception as err:  # noqa: BLE001 - not storable: keep it in memory only
        log.info("program %s not stored (%s)", path.name, err)
        return
    header = json.dumps({"key": key, "sha256": hashlib.sha256(payload).hexdigest()})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(MAGIC + header.encode() + b"\n" + payload)
        tmp.replace(path)
    except OSError as err:  # read-only cache: run without storing
        log.info("program %s not stored (%s)", path.name, err)


def _export(fn: Callable, tree: Any, leaves: list):
    out_tree: list = []

    def flat(*xs):
        out, structure = jax.tree.flatten(fn(*jax.tree.unflatten(tree, xs)))
        out_tree.append(structure)
        return out

    program = jax.export.export(jax.jit(flat))(*leaves)
    # The VJP hook is a local closure (not picklable); these programs are not
    # differentiated.
    return out_tree[0], dataclasses.replace(program, _get_vjp=None)


class Persistent:
    """A jitted function whose traced programs are exported to and loaded from
    the cache folder (one per argument signature); see the module doc."""

    def __init__(
        self, fn: Callable, tag: str, parts: tuple, folder: Path | None = None
    ):
        self.fn, self.tag, self.parts = fn, tag, parts
        self.folder = folder
        self._programs: dict[tuple, tuple[Any, Callable]] = {}
        #: how each signature was obtained: "loaded", "exported" or "jit"
        self.sources: dict[tuple, str] = {}
        _INSTANCES.add(self)

    def __call__(self, *args: Any) -> Any:
        leaves, tree = jax.tree.flatten(args)
        if any(isinstance(x, jax.core.Tracer) for x in leaves):
            return self.fn(*args)  # inside another transformation: inline it
        sig = (tree, tuple(_aval(x) for x in leaves))
        hit = self._programs.get(sig)
        if hit is None:
            hit = self._programs[sig] = self._obtain(sig, tree, leaves)
        out_tree, call = hit
        if out_tree is None:
            return call(*args)
        return jax.tree.unflatten(out_tree, call(*leaves))

    def _obtain(self, sig: tuple, tree: Any, leaves: list):
        folder = self.folder if self.folder is not None else program_folder()
        key = _key((self.tag, *self.parts), leaves, tree)
        path = None if folder is None else folder / f"{self.tag}-{key[:40]}.jaxexp"
        got = None if path is None else _read(path, key)
        self.sources[sig] = "loaded"
        if got is None:
            try:
                got = _export(self.fn, tree, leaves)
            except Exception as err:  # noqa: BLE001 - not exportable: plain jit
                log.info("%s: not exportable (%s); using jax.jit", self.tag, err)
                self.sources[sig] = "jit"
                return None, self.fn
            self.sources[sig] = "exported"
            if path is not None:
                _write(path, key, *got)
        out_tree, program = got
        return out_tree, jax.jit(program.call)


_INSTANCES: weakref.WeakSet[Persistent] = weakref.WeakSet()


def forget_programs() -> None:
    """Drop the programs every :class:`Persistent` holds in memory, as a new
    process starts: the next calls load them from the cache folder (tests)."""
    for fn in list(_INSTANCES):
        fn._programs.clear()
        fn.sources.clear()


def program_folder() -> Path | None:
    """``<cache>/programs`` (see :func:`phems_clinical.runtime.cache_dir`), or
    ``None`` when the cache is off."""
    root = cache_dir()
    return None if root is None else root / "programs"


def persistent(value: Any, model: Any, tag: tuple) -> Any:
    """``value`` (a jitted function, or a tuple of them) wrapped in
    :class:`Persistent`, keyed by ``model``'s specification and ``tag``."""
    name = "-".join(str(t) for t in tag[:1]) or "program"
    parts = (model_digest(model), repr(tag))
    if isinstance(value, tuple):
        return tuple(Persistent(v, f"{name}{i}", parts) for i, v in enumerate(value))
    return Persistent(value, name, parts)


def persistent_jit(fn: Callable, tag: tuple) -> Persistent:
    """``jax.jit(fn)`` as a :class:`Persistent`, for a program that depends on no
    model; ``tag`` names it and everything it closes over (e.g. a draw count)."""
    return Persistent(jax.jit(fn), str(tag[0]), (repr(tag),))


__all__ = [
    "Persistent",
    "forget_programs",
    "model_digest",
    "persistent",
    "persistent_jit",
    "program_folder",
    "source_digest",
]
