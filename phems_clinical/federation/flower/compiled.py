"""A site's ``local_update`` without re-tracing it in every Flower app process.

Flower runs every message in a new ``flwr-clientapp`` process. JAX's persistent
compilation cache spares the XLA compilation there, but not the tracing, which for
a FOCEI site update takes several seconds per round. So the first process that
meets a given (algorithm, shapes, source code, JAX version) exports the traced
program (``jax.export``) into the node's cache folder and later processes load it
and call it: the same StableHLO, compiled once (persistent cache), giving results
bit for bit equal to ``jax.jit(algorithm.local_update)``.

The export is stored with ``pickle`` (``Exported.serialize`` needs the optional
``flatbuffers`` package), so the cache folder must be as trusted as JAX's own
compilation cache, which also holds executables: it is the node's own
``$PHEMS_CACHE_DIR``. Any problem with the cache falls back to ``jax.jit``.

A long-lived process (the warm ClientApp host, :mod:`.host`) also keeps what it
built between messages, in memory: the loaded program and its compiled call
(:func:`call_cached`), and whatever the ClientApp memoises with :func:`memoised`
(the algorithm, the site's cohort). Everything is kept for one *scope* (the FAB
hash, run config and node config of the message, :func:`warm_scope`) and dropped
when the scope changes. In Flower's own process-per-message mode the memo lives
and dies with the one message.

Nodes that share one machine and cache folder (loopback tests, a hospital running
several nodes) compile a program once: the first process to meet a key holds an
exclusive lock on it (``<key>.lock`` beside the export, :func:`_first_compile`)
while it exports, compiles and runs it; the others wait, then load the export and
find the executable in JAX's persistent cache. Five sites on 2 cores took 81 s for
a first FOCEI Newton round that compiled five times at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import os
import pickle
import time
from collections.abc import Callable, Hashable, Sequence
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import jax
import jaxlib

import phems_clinical

T = TypeVar("T")

_MEMO: dict[tuple[str, Hashable], Any] = {}
"""What this process built for the current scope: ``(kind, key) -> value``."""

_SCOPE: list[Hashable] = []
"""The current scope (empty: none set yet)."""


def memoised(kind: str, key: Hashable, build: Callable[[], T]) -> T:
    """``build()``, kept in this process under ``(kind, key)`` until the scope
    changes (:func:`warm_scope`) or :func:`clear_memo`.

    ``key`` must name everything ``build`` depends on besides the scope (e.g. the
    run settings and ``n_occ`` for an algorithm; the site, the product and the
    event table's ``stat`` for a cohort), so that a value is never reused for
    other inputs even within one scope.
    """
    try:
        return _MEMO[kind, key]
    except KeyError:
        value = _MEMO[kind, key] = build()
        return value


def clear_memo() -> int:
    """Drop everything kept (memoised values and loaded programs); returns how
    many entries were dropped."""
    n = len(_MEMO) + len(_PROGRAMS)
    _MEMO.clear()
    _PROGRAMS.clear()
    return n


def warm_scope(scope: Hashable) -> bool:
    """Enter ``scope`` (e.g. FAB hash, run config, node config); when it differs
    from the current one everything kept is dropped first. Returns True when
    it was dropped (a new scope), False when the scope is unchanged."""
    if _SCOPE and _SCOPE[0] == scope:
        return False
    clear_memo()
    _SCOPE[:] = [scope]
    return True


def memo_info() -> dict[str, int]:
    """How many values and programs are kept (for logs and tests)."""
    return {"values": len(_MEMO), "programs": len(_PROGRAMS)}


@cache
def source_digest(extra_files: tuple[str, ...] = ()) -> str:
    """SHA-256 of the package's Python sources and ``extra_files`` (e.g. the
    product's model file): an export is reused only for unchanged code."""
    h = hashlib.sha256()
    root = Path(phems_clinical.__file__).resolve().parent
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    for name in extra_files:
        h.update(Path(name).read_bytes())
    return h.hexdigest()


def _signature(leaves: Sequence[Any]) -> str:
    return ";".join(
        f"{getattr(x, 'shape', ())}:{getattr(x, 'dtype', type(x))}" for x in leaves
    )


def cache_folder() -> Path | None:
    """Where exports live (``$PHEMS_CACHE_DIR/flower_exports``); ``None`` when the
    cache is off or ``PHEMS_CACHE_DIR`` is unset."""
    where = os.environ.get("PHEMS_CACHE_DIR", "")
    if not where or where.lower() == "off":
        return None
    return Path(where) / "flower_exports"


def call_cached(
    fn: Callable,
    args: tuple,
    *,
    tag: str,
    extra_files: Sequence[str | Path] = (),
    folder: Path | None = None,
    info: dict | None = None,
) -> Any:
    """``jax.jit(fn)(*args)``, tracing ``fn`` only when no export of it exists.

    Parameters
    ----------
    fn : callable
        A jittable function of ``args`` (e.g. ``algorithm.local_update``).
    tag : str
        What ``fn`` is, beyond the shapes of ``args`` (e.g. algorithm, product and
        ``n_occ``); it is part of the cache key, with the shapes and dtypes of the
        arguments, the package source digest and the JAX version.
    extra_files : paths
        Further files ``fn`` depends on (hashed into the key).
    folder : path, optional
        Cache folder (default :func:`cache_folder`); ``None`` and no default means
        plain ``jax.jit``.
    info : dict, optional
        Filled with ``key`` (the export's cache key) and ``cache`` (``"memory"``:
        loaded earlier in this process, ``"hit"``, ``"exported"`` or ``"jit"``),
        for the site's log.
    """
    info = {} if info is None else info
    folder = folder if folder is not None else cache_folder()
    leaves, tree = jax.tree.flatten(args)
    if folder is None:
        info["cache"] = "jit"
        return jax.jit(fn)(*args)
    # jax.config sets its flags as attributes at run time (hence the ignore)
    x64 = str(jax.config.jax_enable_x64)  # type: ignore[attr-defined]
    parts = [
        tag,
        _signature(leaves),
        str(tree),
        jax.__version__,
        jaxlib.__version__,
        jax.default_backend(),
        x64,
        source_digest(tuple(str(f) for f in extra_files)),
    ]
    key = hashlib.sha256("|".join(parts).encode()).hexdigest()
    path = folder / f"{key[:32]}.pkl"
    info.update(key=key[:32], cache="hit")
    kept = _PROGRAMS.get(key)
    if kept is not None:  # loaded earlier in this process (and scope)
        info["cache"] = "memory"
        out_tree, call = kept
        return jax.tree.unflatten(out_tree, call(*leaves))
    with _first_compile(folder / f"{key[:32]}.lock", info):
        exported = _load(path)
        if exported is None:
            info["cache"] = "exported"
            exported = _export(fn, tree, leaves, path)
            if exported is None:
                info["cache"] = "jit"
                return jax.jit(fn)(*args)
        out_tree, program = exported
        out = program.call(*leaves)  # compiles (or loads from JAX's cache)
    _PROGRAMS[key] = out_tree, program.call
    return jax.tree.unflatten(out_tree, out)


LOCK_WAIT_SECONDS = 900.0
"""How long a process waits for another one's first compile of the same program
before it compiles on its own."""


@contextlib.contextmanager
def _first_compile(lock: Path, info: dict, wait: float | None = None):
    """Hold an exclusive ``flock`` on ``lock`` (created as needed) for the block,
    so that processes sharing a cache folder compile a program one at a time and
    the later ones hit JAX's persistent cache. Waits at most ``wait`` s
    (:data:`LOCK_WAIT_SECONDS`), then goes on unlocked; a folder that cannot hold
    the lock file means no lock. Records the seconds waited in ``info``."""
    wait = LOCK_WAIT_SECONDS if wait is None else wait
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fh = lock.open("a")
    except OSError:
        yield
        return
    t0, held = time.monotonic(), False
    try:
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = True
                break
            except BlockingIOError:
                if time.monotonic() - t0 >= wait:
                    break
                time.sleep(0.05)
        if time.monotonic() - t0 >= 0.05:
            info["waited_s"] = round(time.monotonic() - t0, 2)
        yield
    finally:
        if held:
            fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


_PROGRAMS: dict[str, tuple[Any, Callable]] = {}
"""Programs loaded in this process: export cache key -> (output tree, call)."""


def _load(path: Path):
    try:
        with path.open("rb") as fh:
            return pickle.load(fh)
    except Exception:  # missing, truncated or from another JAX: export again
        return None


def _export(fn: Callable, tree, leaves, path: Path):
    out_tree = []

    def flat(*xs):
        out, structure = jax.tree.flatten(fn(*jax.tree.unflatten(tree, xs)))
        out_tree.append(structure)
        return out

    try:
        program = jax.export.export(jax.jit(flat))(*leaves)
        # The VJP hook is a local closure (not picklable) and unused here.
        program = dataclasses.replace(program, _get_vjp=None)
        blob = pickle.dumps((out_tree[0], program))
    except Exception:
        return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(blob)
        tmp.replace(path)
    except OSError:
        pass
    return out_tree[0], program


__all__ = [
    "cache_folder",
    "call_cached",
    "clear_memo",
    "memo_info",
    "memoised",
    "source_digest",
    "warm_scope",
]
