"""JAX settings for the programs a user starts (command line, web app, the Flower
apps' processes, which Flower starts anew for every message).

* float64: PK parameters are estimated and root-found in double precision;
* the user's cache folder (:func:`cache_dir`): ``$PHEMS_CACHE_DIR``, else
  ``$XDG_CACHE_HOME/phems_clinical/jax``, else ``~/.cache/phems_clinical/jax``;
  ``PHEMS_CACHE_DIR=off`` disables it. It holds JAX's persistent compilation cache
  (so that a new process reuses compiled code instead of compiling it again) and,
  in ``programs/``, the traced dosing programs
  (:mod:`phems_clinical.pk.export_cache`, so that a new process does not trace
  them either). Deleting the folder clears both; it is rebuilt on the next run.

This module imports nothing heavy: the command line imports it before parsing.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

#: Environment variable naming the cache folder (``off`` disables caching).
CACHE_ENV = "PHEMS_CACHE_DIR"


def cache_dir() -> Path | None:
    """The cache folder, or ``None`` when ``PHEMS_CACHE_DIR=off``."""
    where = os.environ.get(CACHE_ENV, "").strip()
    if where.lower() == "off":
        return None
    if where:
        return Path(where).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "phems_clinical" / "jax"


def configure_jax() -> None:
    """Enable x64 and the persistent compilation cache (idempotent).

    Before JAX is imported, this only sets JAX's environment variables (read when
    it is imported), so that commands that never use JAX do not import it."""
    path = cache_dir()
    if path is not None:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError:
            path = None  # read-only home: run without the cache
    settings = {"jax_enable_x64": True}
    if path is not None:
        # min time 0: a cold start loads even small programs instead of compiling
        settings.update(
            jax_compilation_cache_dir=str(path),
            jax_persistent_cache_min_compile_time_secs=0.0,
        )
    if "jax" not in sys.modules:
        for name, value in settings.items():
            os.environ[name.upper()] = str(int(value) if value is True else value)
        return
    import jax

    for name, value in settings.items():
        jax.config.update(name, value)
